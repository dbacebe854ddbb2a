"""
The nixos layer: the NixOS configuration rendered from the profile (the flake, configuration.nix,
impermanence.nix), nixos-generate-config's hardware-configuration.nix patched with the profile's
storage (real UUIDs from the target), and nixos-install run once per configuration.

Rendering is pure (``render_files``) so ``tools/render.py`` shows the files without a disk
(``operations.nixfiles``). This layer only assembles: each layer of the run's registry renders
its own ``NixFragments`` (luks: the initrd's devices; mounts: fileSystems and swapDevices; btrfs
and zfs: the rollback service, pool import, maintenance; filesystems: initrd modules), and they
are put into the templates and into nixos-generate-config's hardware-configuration.nix here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jinja2
from pyinfra import logger
from pyinfra.api import FactBase, FunctionCommand, QuoteString, StringCommand
from pyinfra.api.util import print_host_combined_output

from operations import persist
from operations.adoptlit import adopt_system, system_reads
from operations.contract import Layer, Target
from operations.errors import TabulaError
from operations.nixlit import DeviceIds, MissingDeviceIds, NixFragments, nix_attr, nix_string
from operations.nixpatch import is_valid, patch_hardware_configuration
from operations.profile import Profile
from operations.run import FactBatch, FactRequest, Made, Run, operation
from operations.target import (INSTALL_ROOT, BlockDeviceIds, DirectoryDigest, FileText, PathExists, PathsState,
                               digest_script, is_file_with, under, write_files_command)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
ROOT = INSTALL_ROOT
# Where a successful nixos-install leaves the digest of the configuration it installed: on the
# target's /nix, so it lives exactly as long as the installed system does.
INSTALL_STAMP = f"{ROOT}/nix/var/lib/tabula/installed-config.sha256"


# --- device identities (facts) -------------------------------------------------------------------


class DmiProductName(FactBase):
    """The machine's DMI product name (``/sys/class/dmi/id/product_name``), "" if unknown."""

    def command(self) -> str:
        return "cat /sys/class/dmi/id/product_name 2>/dev/null || true"

    def process(self, output):
        return "\n".join(output).strip()

    @staticmethod
    def default():
        return ""


# --- storage rendering ------------------------------------------------------------------------


class MemoryBytes(FactBase):
    """The target's memory (MemTotal of /proc/meminfo), in bytes."""

    def command(self) -> str:
        # in KiB as the kernel says it (mawk prints a product over 2^31 as 4.10235e+09)
        return "awk '/^MemTotal:/ { print $2 }' /proc/meminfo"

    def process(self, output):
        return int(output[0]) * 1024 if output and output[0].strip().isdigit() else None


def hibernation_warning(profile: Profile, memory: int | None) -> str | None:
    """A hibernation image is the RAM in use, compressed: a swap smaller than the memory may not
    hold it, and the hibernation then fails. Warned, not refused (the image is often smaller)."""
    swap = profile.resume_swap_bytes()
    if not profile.nixos.hibernate or swap is None or memory is None or swap >= memory:
        return None
    gib = 1 << 30
    return (f"hibernate: the swap to resume from ({profile.resume_swap()[0]}, {swap / gib:.2f} GiB) is smaller than "
            f"the memory ({memory / gib:.2f} GiB): a hibernation image of fuller RAM will not fit, and hibernating then "
            "fails; make the swap at least as large as the memory (swap_size)")


def id_devices(profile: Profile) -> list[str]:
    """Partition devices whose UUID/PARTUUID the rendered configuration needs."""
    return profile.id_devices()


# --- hardware module --------------------------------------------------------------------------

# DMI model codes -> nixos-hardware module. The guide's gu605my is the 2024 G16; the 2025 G16
# (RTX 50 series) is GU605CW.
KNOWN_MODELS = {
    "GU605CW": "asus-zephyrus-gu605cw",
    "GU605MY": "asus-zephyrus-gu605my",
    "GU603H": "asus-zephyrus-gu603h",
    "GA401": "asus-zephyrus-ga401",
    "GA402": "asus-zephyrus-ga402",
    "GA403": "asus-zephyrus-ga403",
    "GA502": "asus-zephyrus-ga502",
    "GA503": "asus-zephyrus-ga503",
}


def model_module(product_name: str) -> str | None:
    """nixos-hardware module for a DMI product name such as 'ROG Zephyrus G16 GU605CW_GU605CW'."""
    for token in re.split(r"[\s_]+", product_name.upper()):
        for code, module in KNOWN_MODELS.items():
            if token.startswith(code):
                return module
    return None


def choose_hardware_module(profile: Profile, product_name: str) -> tuple[str | None, str]:
    """(module to use, a note saying why). The profile decides; "auto" means the DMI match."""
    wanted = profile.nixos.hardware_module
    detected = model_module(product_name) if product_name else None
    if wanted == "auto":
        if detected:
            return detected, f"DMI product {product_name!r}: using nixos-hardware module {detected}"
        return None, f"DMI product {product_name or 'unknown'!r} matches no known nixos-hardware module: none used"
    if detected and wanted and detected != wanted:
        return wanted, (f"the profile asks for nixos-hardware module {wanted}, but this machine is "
                        f"{product_name!r}: {detected} matches it (set tabula_vars hardware_module={detected})")
    if detected and not wanted:
        return None, f"DMI product {product_name!r} has nixos-hardware module {detected}; the profile uses none"
    return wanted, f"nixos-hardware module: {wanted or 'none'}"


# --- rendering all files ----------------------------------------------------------------------

HARDWARE_SKELETON = """\
# Review copy: nixos-generate-config writes this file on the target (kernel modules, microcode,
# host platform); tabula then puts the storage bindings below in place of what it detected.
{ config, lib, pkgs, modulesPath, ... }:

{
  imports =
    [ (modulesPath + "/installer/scan/not-detected.nix")
    ];

  nixpkgs.hostPlatform = lib.mkDefault "x86_64-linux";
}
"""


def fragments(layers: tuple, profile: Profile, devices: DeviceIds) -> list[NixFragments]:
    """Every layer's fragment, in the registry's (stage) order."""
    return [layer.nix(profile, devices) for layer in layers]


def extra_config_name(extra_config: str) -> str:
    """The file name the profile's extra module gets in /etc/nixos (a template name or a path)."""
    return Path(extra_config).name


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["nix"] = nix_string
    env.filters["nix_attr"] = nix_attr
    return env


def _tmpfiles_dirs(root: str) -> list[str]:
    return [root, f"{root}/etc", f"{root}/var", f"{root}/var/lib"]


def render_files(profile: Profile, parts: list[NixFragments], generated_hardware: str | None,
                 hardware_module: str | None = None) -> dict[str, str]:
    """Every file of /etc/nixos: name -> text.

    + parts: the layers' fragments (``fragments``), with the devices' ids they were rendered with
    + generated_hardware: nixos-generate-config's hardware-configuration.nix (None: a skeleton)
    + hardware_module: nixos-hardware module for the flake (see choose_hardware_module)
    """
    env = _environment()
    n = profile.nixos
    persist_root = profile.persistence.root
    common = dict(profile=profile, n=n, persist_root=persist_root, persistence=profile.persistence,
                  persist=persist.paths(profile))
    storage = "\n\n".join(f.hardware.rstrip("\n") for f in parts if f.hardware) + "\n"
    out = {
        "flake.nix": env.get_template("flake.nix.j2").render(**common, hardware_module=hardware_module),
        "configuration.nix": env.get_template("configuration.nix.j2").render(
            **common, imports=([extra_config_name(n.extra_config)] if n.extra_config else [])
            + [name for f in parts for name, _ in f.files],
            layer_fragments=[f.configuration.rstrip("\n") for f in parts if f.configuration]),
        "impermanence.nix": env.get_template("impermanence.nix.j2").render(
            **common, tmpfiles_dirs=_tmpfiles_dirs(persist_root),
            layer_fragments=[f.impermanence.rstrip("\n") for f in parts if f.impermanence]),
        "hardware-configuration.nix": patch_hardware_configuration(
            generated_hardware if generated_hardware is not None else HARDWARE_SKELETON, storage),
    }
    for fragment in parts:
        out.update(dict(fragment.files))
    if n.extra_config:
        extra = TEMPLATE_DIR / n.extra_config     # an absolute path stays as it is
        if not extra.is_file():
            raise TabulaError(f"nixos.extra_config: no template {n.extra_config!r} in {TEMPLATE_DIR}, nor such a file")
        out[extra_config_name(n.extra_config)] = extra.read_text()
    return out


def rendered_with(layers: tuple, profile: Profile, generated: str | None, ids: dict | None,
                  hardware_module: str | None = None, placeholder: bool = False,
                  facts: dict | None = None) -> dict[str, str]:
    """``render_files`` with every layer's fragment for these ids (and what their ``nix_reads`` read)."""
    devices = DeviceIds(ids, placeholder, facts)
    return render_files(profile, fragments(layers, profile, devices), generated, hardware_module)


# --- operations -------------------------------------------------------------------------------


def layer_nix_reads(layers: tuple, profile: Profile, root: str) -> dict[str, FactRequest]:
    """What the layers' Nix fragments read besides the devices' ids, by key (``Layer.nix_reads``)."""
    return {key: request for layer in layers for key, request in layer.nix_reads(profile, root).items()}


def configuration_reads(run: Run, config_dir: str, files_in_place: bool = True) -> list[FactRequest]:
    """What rendering the configuration reads from the target, asked in one round trip: the
    generated hardware configuration, the devices' UUIDs, the DMI name, what the layers' Nix
    fragments read (``layer_nix_reads``, in its order) and the files in place."""
    reads: list[FactRequest] = [(FileText, {"path": f"{config_dir}/hardware-configuration.nix"}),
                                (BlockDeviceIds, {"devices": id_devices(run.profile)}),
                                (DmiProductName, {})]
    reads += layer_nix_reads(run.layers, run.profile, config_dir.removesuffix("/etc/nixos")).values()
    if files_in_place:
        names = rendered_with(run.layers, run.profile, None, None, placeholder=True)     # the file names only
        reads.append((PathsState, {"paths": [f"{config_dir}/{name}" for name in names]}))
    return reads


@operation()
def generate_config(run: Run, root: str = ROOT):
    """
    Run nixos-generate-config once: it detects the hardware into hardware-configuration.nix.

    + run: the run (its profile; what the next step reads is read together with the check)
    + root: the mounted target (``--root``)

    .. code:: python

        nixos.generate_config(run, root="/mnt")
    """
    config_dir = f"{root}/etc/nixos"
    hardware = f"{config_dir}/hardware-configuration.nix"
    # On a root this run just made and mounted empty there is nothing to read. A file that does
    # not parse was cut short by an interrupted run: the tool writes it again (it always
    # overwrites hardware-configuration.nix, never a configuration.nix in place).
    generated = None if run.is_fresh(config_dir) else run.read_many(configuration_reads(run, config_dir))[0]
    if generated is not None and is_valid(generated):
        run.noop(f"{hardware} is already generated")
        return
    run.tell(f"detect the hardware into {hardware}" + (" (the one in place does not parse)" if generated is not None else ""))
    run.record_fresh(config_dir, False)
    run.record_created(Made.generated(config_dir))
    # What the next step reads is what this command leaves: its own output, not another round trip.
    yield FunctionCommand(_generate_and_read, (run, root, configuration_reads(run, config_dir, files_in_place=False)), {})


def generate_command(root: str, reads: list[FactRequest]) -> tuple[StringCommand, FactBatch]:
    """nixos-generate-config (its own output on stderr), then the facts ``reads`` in the same
    command: (the command, the batch that reads its output)."""
    batch = FactBatch()
    return StringCommand(f"nixos-generate-config --root {shlex.quote(root)} >&2 && {batch.command(reads)}"), batch


def _generate_and_read(state, host, run: Run, root: str, reads: list[FactRequest]) -> bool:
    command, batch = generate_command(root, reads)
    status, output = host.run_shell_command(command, print_output=state.print_output, print_input=state.print_input)
    if not status:
        if not state.print_output:
            print_host_combined_output(host, output)
        return False
    run.remember(reads, batch.process(output.stdout_lines))
    return True


@operation()
def configuration(run: Run, root: str = ROOT):
    """
    Write the profile's NixOS files to ``<root>/etc/nixos``: the generated hardware configuration
    patched with the profile's storage (real UUIDs), the flake, configuration.nix,
    impermanence.nix and the profile's extra module. Unchanged files are left alone.

    + run: the run (its profile, facts, what it made)
    + root: the mounted target

    .. code:: python

        nixos.configuration(run, root="/mnt")
    """
    profile = run.profile
    config_dir = f"{root}/etc/nixos"
    # Right after this run's nixos-generate-config, none of the files can be ours yet: all are written.
    just_generated = run.created_this_run(Made.generated(config_dir))
    keys = list(layer_nix_reads(run.layers, profile, root))
    if just_generated and not run.executing:
        generated, ids, product_name, facts = None, {}, "", {}     # (planned: the generator has not run yet)
    else:
        values = run.read_many(configuration_reads(run, config_dir, not just_generated))
        generated, ids, product_name = values[:3]
        facts = dict(zip(keys, values[3:3 + len(keys)]))
    missing = [d for d in id_devices(profile) if not ids.get(d, {}).get("UUID") and not ids.get(d, {}).get("PARTUUID")]
    if generated is None or missing:
        # Prepare time on blank disks: nothing to read yet; this runs again at execution.
        waiting = ", ".join(missing) if missing else "hardware-configuration.nix"
        run.noop(f"NixOS files render once {waiting} exist{'s' if not missing else ''}")
        if run.executing:
            raise MissingDeviceIds(f"cannot render the NixOS configuration: {waiting} missing on the target")
        return

    module, note = choose_hardware_module(profile, product_name)
    if run.executing:
        logger.info(f"{run.prefix}{note}")
    try:
        rendered = rendered_with(run.layers, profile, generated, ids, hardware_module=module, facts=facts)
    except MissingDeviceIds as missing:
        # e.g. a swapfile this run makes again (its resume offset): planned now, read at execution
        if run.executing:
            raise
        run.noop(f"NixOS files render once this exists: {missing}")
        return
    present = {} if just_generated else run.read(PathsState, paths=[f"{config_dir}/{name}" for name in rendered])
    stale = {name: text for name, text in rendered.items()
             if not is_file_with(present.get(f"{config_dir}/{name}"), text, "644")}
    if not stale:
        run.noop(f"{config_dir} already holds the rendered {', '.join(rendered)} (mode 0644)")
        return
    run.tell(f"write {', '.join(stale)} to {config_dir} (mode 0644)")
    run.record_fresh(config_dir, False)
    yield write_files_command(config_dir, stale, mode="644")


def _install_reads(config_dir: str, stamp: str, root: str) -> list[FactRequest]:
    """What tells whether the system is installed from the current files."""
    return [(DirectoryDigest, {"path": config_dir}), (FileText, {"path": stamp}),
            (PathExists, {"path": f"{root}/nix/var/nix/profiles/system"})]


def _stream(state, host, command: StringCommand) -> bool:
    # print_output=True: the connector echoes each line as it arrives, whatever the verbosity.
    status, _ = host.run_shell_command(command, print_output=True)
    return status


@operation()
def nixos_install(run: Run, hostname: str, root: str = ROOT, stamp: str = INSTALL_STAMP):
    """
    Install the flake's system with ``nixos-install --no-root-passwd``, output streamed live;
    skipped when the installed system was built from the same configuration files.

    + run: the run (facts)
    + hostname: the flake's nixosConfigurations attribute
    + root: the mounted target
    + stamp: where the digest of the installed configuration is recorded

    .. code:: python

        nixos.nixos_install(run, "zephyrus", root="/mnt")
    """
    config_dir = f"{root}/etc/nixos"
    current, installed, system = run.read_many(_install_reads(config_dir, stamp, root))
    installed = (installed or "").strip()
    if current and installed == current and system:
        run.noop(f"the system in {root} is already installed from the current {config_dir} ({current[:12]})")
        return
    run.tell(f"install the system {config_dir}#{hostname} into {root}"
         + (" (its configuration changed since the last install)" if installed else ""))
    command = StringCommand("nixos-install", "--root", QuoteString(root),
                            "--flake", QuoteString(f"{config_dir}#{hostname}"), "--no-root-passwd")
    yield FunctionCommand(_stream, (command,), {})
    # Record what was installed; the digest is taken again now, after the install ran.
    record = f'd=$({digest_script()}) && mkdir -p "$(dirname "$2")" && printf "%s\\n" "$d" > "$2"'
    yield StringCommand("sh", "-c", QuoteString(record), "stamp", QuoteString(config_dir), QuoteString(stamp))


# --- the layer ------------------------------------------------------------------------------------


class NixosLayer(Layer):
    name = "nixos"
    absent = "no NixOS configuration"

    def fill(self, run: Run) -> None:
        """Generate, patch and write the NixOS configuration under /mnt/etc/nixos."""
        generate_config(run, name="nixos-generate-config", root=ROOT)
        configuration(run, name="NixOS configuration in /mnt/etc/nixos", root=ROOT)

    def install(self, run: Run) -> None:
        """nixos-install --flake, skipped when already installed (``tabula_install``)."""
        if run.settings.tabula_install:
            hostname = run.profile.nixos.hostname
            nixos_install(run, hostname, name=f"nixos-install {hostname}", root=ROOT)

    def adopt_reads(self, found) -> list[FactRequest]:
        return system_reads(found)

    def adopt(self, found, draft) -> None:
        adopt_system(found, draft)          # the host, user... as /etc/nixos says them

    def applies(self, profile: Profile) -> bool:
        return True

    def owns(self, node) -> bool:
        return False

    def tools(self, profile: Profile) -> dict[str, str]:
        return {}               # nixos-generate-config is every run's; nixos-install the stages' (tabula_install)

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        return {}

    def refusal_reads(self, run: Run) -> list[FactRequest]:
        return [(MemoryBytes, {})] if run.profile.nixos.hibernate and run.profile.resume_swap_bytes() else []

    def refusals(self, run: Run) -> list[str]:
        """None; a swap too small to hibernate to is warned of, before any change."""
        if self.refusal_reads(run):
            warning = hibernation_warning(run.profile, run.read(MemoryBytes))
            if warning:
                logger.warning(f"{run.prefix}{warning}")
        return []

    def observe(self, run: Run) -> list[FactRequest]:
        reads = configuration_reads(run, f"{ROOT}/etc/nixos")
        if run.settings.tabula_install:
            reads += _install_reads(f"{ROOT}/etc/nixos", INSTALL_STAMP, ROOT)
        return reads

    def problems(self, target: Target) -> list[str]:
        """The generated files in ``<root>/etc/nixos``: each exactly what the profile renders with
        the target's real UUIDs (hardware-configuration.nix: nixos-generate-config's, its storage the
        profile's), mode 0644; when the run installs, the installed system's stamp naming these
        files. The first differing line quoted."""
        profile, root = target.settings.profile, target.root
        config_dir = under(root, "/etc/nixos")
        generated = target.read(FileText, path=f"{config_dir}/hardware-configuration.nix")
        if generated is None:
            return [f"{config_dir}/hardware-configuration.nix: missing (nixos-generate-config has not run)"]
        ids = target.read(BlockDeviceIds, devices=id_devices(profile))
        module, _ = choose_hardware_module(profile, target.read(DmiProductName))
        facts = {key: target.read(fact, **kwargs)
                 for key, (fact, kwargs) in layer_nix_reads(target.layers, profile, root).items()}
        try:
            rendered = rendered_with(target.layers, profile, generated, ids, hardware_module=module, facts=facts)
        except MissingDeviceIds as missing:
            # (a device the files name by its UUID lost its signature: the other layers say why)
            return [f"{config_dir}: the profile's files cannot be rendered to compare: {missing}"]
        present = target.read(PathsState, paths=[f"{config_dir}/{name}" for name in rendered])
        failures = []
        for name, text in rendered.items():
            path = f"{config_dir}/{name}"
            if path not in present:
                failures.append(f"{path}: missing")
            elif not is_file_with(present[path], text, "644"):
                have = target.read(FileText, path=path) or ""
                failures.append(f"{path}: {first_difference(have, text)}" if have != text else
                                f"{path}: mode {present[path]['mode']}, not 644")
        if target.settings.tabula_install:
            stamp = under(root, INSTALL_STAMP.removeprefix(ROOT))
            installed = (target.read(FileText, path=stamp) or "").strip()
            if not installed:
                failures.append(f"{stamp}: missing (nixos-install has not completed)")
            elif installed != target.read(DirectoryDigest, path=config_dir):
                failures.append(f"{stamp}: the installed system was built from other files than {config_dir}")
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        return NixFragments()   # its files are the documents the other layers' fragments go into

    def gaps(self, run: Run, root: str) -> tuple[list, list[str]]:
        return [], []

    def disko(self, profile: Profile, context) -> dict:
        return {}

    def disko_node(self, node, device: str, part, context) -> dict | None:
        return None


def first_difference(have: str, want: str) -> str:
    """Where a file first differs from the rendered text, quoted: one line."""
    have_lines, want_lines = have.splitlines(), want.splitlines()
    for number, (a, b) in enumerate(zip(have_lines, want_lines), start=1):
        if a != b:
            return (f"differs from the profile's rendering at line {number}: {_clip(a)!r}, "
                    f"the profile has {_clip(b)!r}")
    return (f"differs from the profile's rendering: {len(have_lines)} lines, the profile has {len(want_lines)}")


def _clip(line: str, width: int = 70) -> str:
    line = line.strip()
    return line if len(line) <= width else line[:width - 1] + "…"


LAYER = NixosLayer()
