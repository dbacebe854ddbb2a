"""Evaluating Tabula's NixOS files against the offline kit (``../shared/nix``): shared by the Nix
tests and the e2e tests that evaluate what a deploy wrote on the target.

One ``nix eval`` per configuration reads the system's toplevel drvPath (what nixos-install
evaluates before it builds) together with the values the tests assert on, so the evaluated
config, not the text, is what they check.
"""
from __future__ import annotations

import re
from pathlib import Path

from operations.nixeval import Evaluation, evaluate
from tools import nixkit

# The values read back from the evaluated system (sys: the nixosSystem result).
READ_BACK = """sys: let
  c = sys.config;
  lib = sys.pkgs.lib;
  pick = names: set: lib.filterAttrs (n: _: builtins.elem n names) set;
in {
  drvPath = c.system.build.toplevel.drvPath;
  fileSystems = lib.mapAttrs (_: fs: pick [ "device" "fsType" "options" "neededForBoot" ] fs) c.fileSystems;
  swapDevices = map (s: { inherit (s) device; randomEncryption = s.randomEncryption.enable; size = s.size; }) c.swapDevices;
  luks = lib.mapAttrs (_: d: pick [ "device" "allowDiscards" "bypassWorkqueues" "crypttabExtraOpts" ] d) c.boot.initrd.luks.devices;
  initrdSystemd = c.boot.initrd.systemd.enable;
  initrdTpm2 = c.boot.initrd.systemd.enableTpm2;
  initrdTpmModules = builtins.filter (m: lib.hasPrefix "tpm" m) c.boot.initrd.availableKernelModules;
  initrdServices = lib.mapAttrs (_: s: pick [ "after" "requires" "before" "wantedBy" ] s) c.boot.initrd.systemd.services;
  resumeDevice = c.boot.resumeDevice;
  kernelParams = c.boot.kernelParams;
  zfsAllowHibernation = if c.boot.zfs.enabled then c.boot.zfs.allowHibernation else null;
  hostId = c.networking.hostId;
  hostName = c.networking.hostName;
  supportedFilesystems = lib.attrNames (lib.filterAttrs (_: v: v) c.boot.supportedFilesystems);
  zfsRequestCredentials = if c.boot.zfs.enabled then c.boot.zfs.requestEncryptionCredentials else null;
  passwordFiles = lib.mapAttrs (_: u: u.hashedPasswordFile)
    (lib.filterAttrs (_: u: u.hashedPasswordFile != null) c.users.users);
  mutableUsers = c.users.mutableUsers;
  persistence = lib.mapAttrs (_: p: {
    directories = map (d: d.directory) p.directories;
    files = map (f: f.file) p.files;
  }) c.environment.persistence;
  allowUnfree = c.nixpkgs.config.allowUnfree or false;
  powerProfilesDaemon = c.services.power-profiles-daemon.enable;
  tuned = c.services.tuned.enable or null;
  sshKeys = map (k: k.path) c.services.openssh.hostKeys;
  sshd = pick [ "PermitRootLogin" "PasswordAuthentication" ] c.services.openssh.settings;
  authorizedKeys = lib.mapAttrs (_: u: u.openssh.authorizedKeys.keys)
    (lib.filterAttrs (_: u: u.openssh.authorizedKeys.keys != [ ]) c.users.users);
  initrdSsh = if c.boot.initrd.network.ssh.enable then {
    inherit (c.boot.initrd.network.ssh) port hostKeys authorizedKeys;
    network = c.boot.initrd.systemd.network.enable;
  } else null;
}"""


class EvaluationError(AssertionError):
    """Nix refused the configuration, or the evaluation printed a warning."""


def kit_evaluate(files: dict[str, str] | Path, hostname: str, hardware_module: str | None,
                 apply: str = READ_BACK, extra_modules: tuple[str, ...] = ()) -> dict:
    """Evaluate against the kit; any error or evaluation warning (but the kit's one known
    trace) fails with Nix's own words. ``extra_modules``: module files added to the system
    (absolute paths), after the kit's compat modules."""
    setup = nixkit.setup_for(hardware_module)
    result: Evaluation = evaluate(files, hostname, setup.inputs, apply=apply,
                                  extra_modules=setup.compat_modules + tuple(extra_modules), json_output=True)
    if not result.ok:
        raise EvaluationError(f"the configuration does not evaluate:\n{result.error[-6000:]}")
    warnings = setup.unexpected_traces(result.traces)
    if warnings:
        raise EvaluationError("the evaluation printed warnings:\n" + "\n".join(warnings))
    return result.json()


def installed_config(read_on_target, dest: Path, config_dir: str = "/mnt/etc/nixos") -> Path:
    """The configuration a deploy wrote on the target (real UUIDs, the real generator's output,
    patched), copied back into ``dest`` to be evaluated here.

    + read_on_target: runs a shell command on the target, returns its output (text)

    A flake.lock is left behind: the nixos-install stand-in's pins nothing real, and the kit
    overrides every input anyway.
    """
    import base64
    import io
    import tarfile

    archive = base64.b64decode(read_on_target(f"tar -C {config_dir} --exclude=./flake.lock -cf - . | base64 -w0"))
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def evaluate_installed(read_on_target, dest: Path, profile) -> dict:
    """Evaluate what the deploy wrote, for the nixos-hardware module its flake names."""
    folder = installed_config(read_on_target, dest)
    flake = (folder / "flake.nix").read_text()
    module = re.search(r"nixos-hardware\.nixosModules\.([\w-]+)", flake)
    return kit_evaluate(folder, profile.nixos.hostname, module.group(1) if module else None)
