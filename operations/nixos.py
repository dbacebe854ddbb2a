"""
NixOS configuration: render the flake, configuration.nix and impermanence.nix from the profile,
patch nixos-generate-config's hardware-configuration.nix with the profile's storage (real UUIDs
from the target), and run nixos-install once per configuration.

    from operations import nixos
    nixos.apply(profile, settings)      # generate + patch + write /mnt/etc/nixos
    nixos.install(profile, settings)    # nixos-install --flake, skipped when already installed

Rendering is pure (``render_files``) so ``tools/render.py`` shows the files without a disk.
Storage layers add their Nix through ``LAYER_RENDERERS``: each returns ``NixFragments`` for
configuration.nix and impermanence.nix (btrfs: the rollback service; a ZFS layer appends its
``boot.supportedFilesystems``, ``networking.hostId`` and dataset rollback the same way).
"""

from __future__ import annotations

import base64
import hashlib
import io
import posixpath
import re
import shlex
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jinja2
from pyinfra import host, logger
from pyinfra.api import FactBase, FunctionCommand, QuoteString, StringCommand

from operations.errors import TabulaError
from operations.nixpatch import is_valid, patch_hardware_configuration
from operations.profile import Filesystem, Luks, Profile, Subvolume, Swap
from operations.roundtrips import created_this_run, is_fresh, operation, read, read_many, record_created, record_fresh

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
ROOT = "/mnt"
CONFIG_DIR = f"{ROOT}/etc/nixos"
# Where a successful nixos-install leaves the digest of the configuration it installed: on the
# target's /nix, so it lives exactly as long as the installed system does.
INSTALL_STAMP = f"{ROOT}/nix/var/lib/tabula/installed-config.sha256"
ROLLBACK_MOUNTDIR = "/run/tabula-rollback"


# --- Nix text ----------------------------------------------------------------------------------


def nix_string(value: object) -> str:
    """A Nix double-quoted string literal."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{text}"'


def nix_attr(value: str) -> str:
    """An attribute name: bare when it is an identifier, quoted otherwise."""
    return value if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'-]*", value) else nix_string(value)


def nix_indented_string(text: str, indent: str = "      ") -> str:
    """A Nix ''-string holding ``text`` verbatim (``''`` and ``${`` escaped)."""
    escaped = text.replace("''", "'''").replace("${", "''${")
    body = "".join(f"{indent}{line}\n" if line else "\n" for line in escaped.splitlines())
    return f"''\n{body}{indent[:-2]}''"


def nix_list(items) -> str:
    return "[ " + "".join(f"{nix_string(i)} " for i in items) + "]"


def systemd_escape(value: str, path: bool = False) -> str:
    """systemd-escape [--path]: the unit name part for an instance or a path."""
    if path:
        value = value.strip("/") or "-"
        if value == "-":
            return value
    out = []
    for i, ch in enumerate(value):
        if ch == "/" and path:
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode()))
    return "".join(out)


# --- device identities (facts) -------------------------------------------------------------------


class BlockDeviceIds(FactBase):
    """
    blkid's view of block devices: ``{device: {"UUID": ..., "PARTUUID": ..., "TYPE": ...}}``.
    Devices that do not exist yet are absent from the result (not an error).

    .. code:: python

        ids = read(BlockDeviceIds, devices=["/dev/disk/by-partlabel/EFI"])
    """

    def command(self, devices) -> StringCommand:
        script = 'for d in "$@"; do [ -b "$d" ] || continue; echo "DEVICE=$d"; blkid -o export "$d" || true; done'
        return StringCommand("sh", "-c", QuoteString(script), "ids", *[QuoteString(d) for d in devices])

    def process(self, output):
        found: dict[str, dict[str, str]] = {}
        current = None
        for line in output:
            key, _, value = line.partition("=")
            if key == "DEVICE":
                current = found.setdefault(value, {})
            elif current is not None and key:
                current[key] = value
        return found

    @staticmethod
    def default():
        return {}


class DmiProductName(FactBase):
    """The machine's DMI product name (``/sys/class/dmi/id/product_name``), "" if unknown."""

    def command(self) -> str:
        return "cat /sys/class/dmi/id/product_name 2>/dev/null || true"

    def process(self, output):
        return "\n".join(output).strip()

    @staticmethod
    def default():
        return ""


class FileText(FactBase):
    """A text file's exact content, or None when it does not exist (base64 keeps bytes intact)."""

    def command(self, path) -> StringCommand:
        return StringCommand("sh", "-c", QuoteString('[ -f "$1" ] && { echo present; base64 -w0 "$1"; echo; } || true'),
                             "filetext", QuoteString(path))

    def process(self, output):
        if not output or output[0] != "present":
            return None
        return base64.b64decode("".join(output[1:])).decode()

    @staticmethod
    def default():
        return None


class DirectoryDigest(FactBase):
    """sha256 over the names and contents of every file below a directory, "" if it is absent."""

    def command(self, path) -> StringCommand:
        script = ('[ -d "$1" ] || exit 0; cd "$1" && find . -type f -print0 | LC_ALL=C sort -z '
                  '| xargs -0r sha256sum | sha256sum | cut -d" " -f1')
        return StringCommand("sh", "-c", QuoteString(script), "digest", QuoteString(path))

    def process(self, output):
        return "\n".join(output).strip()

    @staticmethod
    def default():
        return ""


class PathExists(FactBase):
    """Whether a path exists (any type; symlinks count even when dangling)."""

    def command(self, path) -> StringCommand:
        return StringCommand("sh", "-c", QuoteString('{ [ -e "$1" ] || [ -L "$1" ]; } && echo yes || echo no'),
                             "exists", QuoteString(path))

    def process(self, output):
        return output[-1:] == ["yes"]

    @staticmethod
    def default():
        return False


class PathsState(FactBase):
    """
    What is at each of several paths, in one round trip; absent paths are left out.

    .. code:: python

        read(PathsState, paths=["/mnt/etc/nixos", "/mnt/etc/nixos/flake.nix"])
        {"/mnt/etc/nixos": {"type": "directory", "mode": "755", "user": "root", "sha256": ""},
         "/mnt/etc/nixos/flake.nix": {"type": "file", "mode": "644", "user": "root", "sha256": "9f…"}}
    """

    def command(self, paths) -> StringCommand:
        script = (
            'for p in "$@"; do '
            'if [ -L "$p" ]; then t=link; elif [ -d "$p" ]; then t=directory; elif [ -f "$p" ]; then t=file; '
            'elif [ -e "$p" ]; then t=other; else continue; fi; '
            's=; [ $t = file ] && s=$(sha256sum < "$p" | cut -c1-64); '
            'printf "%s\t%s\t%s\t%s\n" "$t" "$(stat -c "%a %U" "$p")" "$s" "$p"; done'
        )
        return StringCommand("sh", "-c", QuoteString(script), "paths", *[QuoteString(p) for p in paths])

    def process(self, output):
        return parse_paths_state(output)

    @staticmethod
    def default():
        return {}


def parse_paths_state(lines) -> dict:
    found = {}
    for line in lines:
        parts = line.split("\t", 3)
        if len(parts) != 4:
            continue
        kind, mode_user, digest, path = parts
        mode, _, user = mode_user.partition(" ")
        found[path] = {"type": kind, "mode": mode, "user": user, "sha256": digest}
    return found


def is_file_with(state: dict | None, text: str, mode: str) -> bool:
    """Whether PathsState shows a regular file with exactly this text and mode."""
    return bool(state) and state["type"] == "file" and state["mode"] == mode and \
        state["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def files_tar(files: dict[str, str], mode: str = "644", mtime: int = 0) -> bytes:
    """``{relative name: text}`` as one tar, each file with this mode and mtime."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = len(data), int(mode, 8), mtime
            tar.addfile(member, io.BytesIO(data))
    return archive.getvalue()


def write_files_command(directory: str, files: dict[str, str], mode: str = "644") -> StringCommand:
    """One command writing ``{relative name: text}`` below ``directory``, contents on stdin.

    The files go as one base64 tar (modes set in it), unpacked into a folder beside their place
    and renamed into it, one ``mv`` per folder: an interrupted write never leaves a half file
    under a name, and a handful of processes write them all (each costs ~30 ms on a slow target).
    """
    archive = files_tar(files, mode, mtime=int(time.time()))
    folders: dict[str, list[str]] = {}
    for name in files:
        folders.setdefault(posixpath.dirname(name), []).append(name)
    moves = []
    for folder, names in folders.items():
        place = shlex.quote(folder or ".")
        staged = " ".join(f'"$s/"{shlex.quote(name)}' for name in names)
        moves.append(f'mkdir -p "$d/"{place}; mv -f {staged} "$d/"{place}; ')
    script = (f'set -e; d={shlex.quote(directory)}; s="$d/.tabula-new"; rm -rf "$s"; mkdir -p "$s"; '
              'base64 -d | tar -x -C "$s"; ' + "".join(moves) + 'rm -rf "$s"')
    return StringCommand("sh", "-c", QuoteString(script),
                         _stdin=base64.encodebytes(archive).decode().splitlines())


# --- storage rendering ------------------------------------------------------------------------


class MissingDeviceIds(TabulaError):
    """A device the configuration names by UUID does not exist (yet)."""


def id_devices(profile: Profile) -> list[str]:
    """Partition devices whose UUID/PARTUUID the rendered configuration needs."""
    needed = []
    for _, _, part in profile.partitions():
        if isinstance(part.content, (Luks, Filesystem, Swap)):
            needed.append(part.device)
    return needed


def _lookup(ids: dict | None, device: str, key: str, placeholder: bool) -> str:
    value = (ids or {}).get(device, {}).get(key)
    if value:
        return value
    if placeholder:
        return ""
    raise MissingDeviceIds(f"{device}: no {key} yet (the device does not exist or has no signature)")


def stable_device(device: str, ids: dict | None, key: str = "UUID", placeholder: bool = False) -> str:
    """The path the installed system uses: by-uuid (or by-partuuid) for partitions.

    With ``placeholder`` (review without disks) a partition without known ids keeps its
    by-partlabel path, which is just as stable; the installed config always gets the UUID.
    """
    if not device.startswith("/dev/disk/by-partlabel/"):
        return device  # /dev/mapper/<name>, a ZFS dataset, tmpfs "none" or a bind source
    value = _lookup(ids, device, key, placeholder)
    if not value:
        return device
    folder = "by-uuid" if key == "UUID" else "by-partuuid"
    return f"/dev/disk/{folder}/{value}"


def render_storage(profile: Profile, ids: dict | None, placeholder: bool = False) -> str:
    """The profile's storage as hardware-configuration.nix bindings (two-space indent)."""
    parts: list[str] = []
    for part, luks in profile.luks_devices():
        lines = [f"  boot.initrd.luks.devices.{nix_string(luks.mapper)} = {{",
                 f"    device = {nix_string(stable_device(part.device, ids, 'UUID', placeholder))};"]
        if luks.allow_discards:
            lines.append("    allowDiscards = true;")
        if luks.bypass_workqueues:
            lines.append("    bypassWorkqueues = true;")
        lines.append("  };")
        parts.append("\n".join(lines))

    for mount in profile.all_mounts():
        lines = [f"  fileSystems.{nix_string(mount.mountpoint)} = {{",
                 f"    device = {nix_string(stable_device(mount.device, ids, 'UUID', placeholder))};",
                 f"    fsType = {nix_string(mount.fstype)};"]
        if mount.options:
            lines.append(f"    options = {nix_list(mount.options)};")
        if mount.needed_for_boot:
            lines.append("    neededForBoot = true;")
        lines.append("  };")
        parts.append("\n".join(lines))

    swaps = []
    for device, fs in profile.filesystems():
        for sub in fs.subvolumes:
            if sub.swapfile and sub.mountpoint:
                size_mib = sub.swapfile.size_bytes // (1024 * 1024)
                swaps.append(f"{{ device = {nix_string(swapfile_path(sub))}; size = {size_mib}; }}")
    for device, swap in profile.swaps():
        if swap.random_encryption:
            # A fresh key at every boot leaves no signature to find by UUID: name the partition.
            path = stable_device(device, ids, "PARTUUID", placeholder)
            swaps.append(f"{{ device = {nix_string(path)}; randomEncryption.enable = true; }}")
        else:
            swaps.append(f"{{ device = {nix_string(stable_device(device, ids, 'UUID', placeholder))}; }}")
    if swaps:
        parts.append("  swapDevices = [\n" + "".join(f"    {s}\n" for s in swaps) + "  ];")
    else:
        parts.append("  swapDevices = [ ];")
    return "\n\n".join(parts) + "\n"


def swapfile_path(sub: Subvolume) -> str:
    return f"{sub.mountpoint.rstrip('/')}/swapfile"


# --- layers: btrfs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NixFragments:
    """Bindings (two-space indented) a storage layer adds to the rendered modules."""

    configuration: str = ""
    impermanence: str = ""
    files: tuple[tuple[str, str], ...] = ()  # (file name, module text): written and imported


def btrfs_rollback_targets(profile: Profile) -> list[tuple[str, Filesystem, Subvolume]]:
    return [(device, fs, sub) for device, fs in profile.filesystems()
            for sub in fs.subvolumes if sub.blank_snapshot]


def btrfs_rollback_script(device: str, subvolume: str, blank: str, mountdir: str = ROLLBACK_MOUNTDIR) -> str:
    """The bash the initrd runs to put ``subvolume`` back to ``blank``; the e2e test runs it too.

    Nested subvolumes go first (systemd creates some, e.g. /var/lib/machines): a subvolume that
    still holds one cannot be deleted. ``btrfs subvolume list`` prints subvolumes by ID, and a
    nested subvolume is always newer than the one it sits in, so deleting in reverse order takes
    the deepest first. Without the blank snapshot nothing is deleted: a root that cannot be
    restored is better left as it is.
    """
    return f"""\
mnt={mountdir}
mkdir -p "$mnt"
mount -t btrfs -o subvol=/ {device} "$mnt"
if [ -d "$mnt/{blank}" ]; then
  nested=()
  while read -r line; do
    path="${{line#* path }}"
    case "$path" in
      {subvolume}/*) nested+=("$path") ;;
    esac
  done < <(btrfs subvolume list "$mnt")
  for ((i = ${{#nested[@]}} - 1; i >= 0; i--)); do
    echo "deleting nested subvolume ${{nested[i]}}"
    btrfs subvolume delete "$mnt/${{nested[i]}}"
  done
  if [ -d "$mnt/{subvolume}" ]; then
    echo "deleting {subvolume}"
    btrfs subvolume delete "$mnt/{subvolume}"
  fi
  echo "restoring {subvolume} from {blank}"
  btrfs subvolume snapshot "$mnt/{blank}" "$mnt/{subvolume}"
else
  echo "{blank} is missing: {subvolume} is left as it is" >&2
fi
umount "$mnt"
"""


def _device_units(device: str) -> list[str]:
    """Units that must be up before the device can be mounted in the initrd."""
    units = []
    if device.startswith("/dev/mapper/"):
        units.append(f"systemd-cryptsetup@{systemd_escape(device.removeprefix('/dev/mapper/'))}.service")
    units.append(f"{systemd_escape(device, path=True)}.device")
    return units


def btrfs_fragments(profile: Profile, ids: dict | None, placeholder: bool = False) -> NixFragments:
    impermanence, scrub = [], []
    targets = btrfs_rollback_targets(profile)
    for index, (device, fs, sub) in enumerate(targets):
        path = stable_device(device, ids, "UUID", placeholder)
        units = _device_units(path)
        service = "rollback" if len(targets) == 1 else f"rollback-{index + 1}"
        script = btrfs_rollback_script(path, sub.path, sub.blank_snapshot)
        impermanence.append(f"""\
  # Rollback service: {sub.path} is restored from {sub.blank_snapshot} at every boot, after the
  # device is opened and before the root is mounted (systemd stage 1).
  boot.initrd.systemd.services.{nix_attr(service)} = {{
    description = {nix_string(f"Rollback btrfs subvolume {sub.path} to {sub.blank_snapshot}")};
    wantedBy = [ "initrd.target" ];
    requires = {nix_list(units[-1:])};
    after = {nix_list(units)};
    before = [ "sysroot.mount" ];
    unitConfig.DefaultDependencies = "no";
    serviceConfig.Type = "oneshot";
    script = {nix_indented_string(script)};
  }};
""")
    for device, fs in profile.filesystems():
        if fs.format == "btrfs":
            mountpoints = [s.mountpoint for s in fs.subvolumes if s.mountpoint] + ([fs.mountpoint] if fs.mountpoint else [])
            if mountpoints:
                scrub.append(sorted(mountpoints, key=len)[0])
    configuration = ""
    if scrub:
        configuration = f"""\
  # Btrfs maintenance
  services.btrfs.autoScrub = {{
    enable = true;
    interval = "monthly";
    fileSystems = {nix_list(scrub)};
  }};
"""
    return NixFragments(configuration=configuration, impermanence="\n".join(impermanence))


def zfs_fragments(profile: Profile, ids: dict | None, placeholder: bool = False) -> NixFragments:
    """The ZFS layer's bindings (operations/zfs.py renders them: hostId, pool import, rollback)."""
    if not profile.pools:
        return NixFragments()
    from operations import zfs

    return zfs.nix_fragments(profile, ids, placeholder)


# Per-layer renderers, in stage order: (profile, ids, placeholder) -> NixFragments.
LAYER_RENDERERS: list[Callable[[Profile, dict | None, bool], NixFragments]] = [btrfs_fragments, zfs_fragments]


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


def render_files(profile: Profile, generated_hardware: str | None, ids: dict | None,
                 hardware_module: str | None = None, placeholder: bool = False) -> dict[str, str]:
    """Every file of /etc/nixos: name -> text.

    + generated_hardware: nixos-generate-config's hardware-configuration.nix (None: a skeleton)
    + ids: BlockDeviceIds of the profile's partitions (UUIDs)
    + hardware_module: nixos-hardware module for the flake (see choose_hardware_module)
    + placeholder: partitions without ids keep by-partlabel paths (review without disks)
    """
    fragments = [render(profile, ids, placeholder) for render in LAYER_RENDERERS]
    env = _environment()
    n = profile.nixos
    persist_root = profile.persistence.root
    common = dict(profile=profile, n=n, persist_root=persist_root, persistence=profile.persistence)
    out = {
        "flake.nix": env.get_template("flake.nix.j2").render(**common, hardware_module=hardware_module),
        "configuration.nix": env.get_template("configuration.nix.j2").render(
            **common, imports=([extra_config_name(n.extra_config)] if n.extra_config else [])
            + [name for f in fragments for name, _ in f.files],
            layer_fragments=[f.configuration.rstrip("\n") for f in fragments if f.configuration]),
        "impermanence.nix": env.get_template("impermanence.nix.j2").render(
            **common, tmpfiles_dirs=_tmpfiles_dirs(persist_root),
            layer_fragments=[f.impermanence.rstrip("\n") for f in fragments if f.impermanence]),
        "hardware-configuration.nix": patch_hardware_configuration(
            generated_hardware if generated_hardware is not None else HARDWARE_SKELETON,
            render_storage(profile, ids, placeholder)),
    }
    for fragment in fragments:
        out.update(dict(fragment.files))
    if n.extra_config:
        extra = TEMPLATE_DIR / n.extra_config     # an absolute path stays as it is
        if not extra.is_file():
            raise TabulaError(f"nixos.extra_config: no template {n.extra_config!r} in {TEMPLATE_DIR}, nor such a file")
        out[extra_config_name(n.extra_config)] = extra.read_text()
    return out


def config_digest(rendered: dict[str, str]) -> str:
    """The digest DirectoryDigest computes on the target for these files (for tests and review)."""
    lines = "".join(f"{hashlib.sha256(text.encode()).hexdigest()}  ./{name}\n" for name, text in sorted(rendered.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# --- operations -------------------------------------------------------------------------------


def configuration_reads(profile: Profile, config_dir: str, files_in_place: bool = True) -> list[tuple[type, dict]]:
    """What rendering the configuration reads from the target, asked in one round trip: the
    generated hardware configuration, the devices' UUIDs, the DMI name and the files in place."""
    reads = [(FileText, {"path": f"{config_dir}/hardware-configuration.nix"}),
             (BlockDeviceIds, {"devices": id_devices(profile)}),
             (DmiProductName, {})]
    if files_in_place:
        names = render_files(profile, None, None, placeholder=True)     # the file names only
        reads.append((PathsState, {"paths": [f"{config_dir}/{name}" for name in names]}))
    return reads


@operation()
def generate_config(profile: Profile, root: str = ROOT):
    """
    Run nixos-generate-config once: it detects the hardware into hardware-configuration.nix.

    + profile: the loaded profile (what the next step reads is read together with the check)
    + root: the mounted target (``--root``)

    .. code:: python

        nixos.generate_config(profile, root="/mnt")
    """
    config_dir = f"{root}/etc/nixos"
    hardware = f"{config_dir}/hardware-configuration.nix"
    # On a root this run just made and mounted empty there is nothing to read. A file that does
    # not parse was cut short by an interrupted run: the tool writes it again (it always
    # overwrites hardware-configuration.nix, never a configuration.nix in place).
    generated = None if is_fresh(config_dir) else read_many(configuration_reads(profile, config_dir))[0]
    if generated is not None and is_valid(generated):
        host.noop(f"{hardware} is already generated")
        return
    record_fresh(config_dir, False)
    record_created(f"generated {config_dir}")
    yield StringCommand("nixos-generate-config", "--root", QuoteString(root))


@operation()
def configuration(profile: Profile, root: str = ROOT):
    """
    Write the profile's NixOS files to ``<root>/etc/nixos``: the generated hardware configuration
    patched with the profile's storage (real UUIDs), the flake, configuration.nix,
    impermanence.nix and the profile's extra module. Unchanged files are left alone.

    + profile: the loaded profile
    + root: the mounted target

    .. code:: python

        nixos.configuration(profile, root="/mnt")
    """
    config_dir = f"{root}/etc/nixos"
    # Right after this run's nixos-generate-config, none of the files can be ours yet: all are written.
    just_generated = created_this_run(f"generated {config_dir}")
    generated, ids, product_name = read_many(configuration_reads(profile, config_dir, not just_generated))[:3]
    missing = [d for d in id_devices(profile) if not ids.get(d, {}).get("UUID") and not ids.get(d, {}).get("PARTUUID")]
    if generated is None or missing:
        # Prepare time on blank disks: nothing to read yet; this runs again at execution.
        waiting = ", ".join(missing) if missing else "hardware-configuration.nix"
        host.noop(f"NixOS files render once {waiting} exist{'s' if not missing else ''}")
        if host.state.is_executing:
            raise MissingDeviceIds(f"cannot render the NixOS configuration: {waiting} missing on the target")
        return

    module, note = choose_hardware_module(profile, product_name)
    if host.state.is_executing:
        logger.info(f"{host.print_prefix}{note}")
    rendered = render_files(profile, generated, ids, hardware_module=module)
    present = {} if just_generated else read(PathsState, paths=[f"{config_dir}/{name}" for name in rendered])
    stale = {name: text for name, text in rendered.items()
             if not is_file_with(present.get(f"{config_dir}/{name}"), text, "644")}
    if not stale:
        host.noop(f"{config_dir} already holds the rendered {', '.join(rendered)} (mode 0644)")
        return
    record_fresh(config_dir, False)
    yield write_files_command(config_dir, stale, mode="644")


def _stream(state, host, command: StringCommand) -> bool:
    # print_output=True: the connector echoes each line as it arrives, whatever the verbosity.
    status, _ = host.run_shell_command(command, print_output=True)
    return status


@operation()
def nixos_install(hostname: str, root: str = ROOT, stamp: str = INSTALL_STAMP):
    """
    Install the flake's system with ``nixos-install --no-root-passwd``, output streamed live;
    skipped when the installed system was built from the same configuration files.

    + hostname: the flake's nixosConfigurations attribute
    + root: the mounted target
    + stamp: where the digest of the installed configuration is recorded

    .. code:: python

        nixos.nixos_install("zephyrus", root="/mnt")
    """
    config_dir = f"{root}/etc/nixos"
    current = read(DirectoryDigest, path=config_dir)
    installed = (read(FileText, path=stamp) or "").strip()
    system = read(PathExists, path=f"{root}/nix/var/nix/profiles/system")
    if current and installed == current and system:
        host.noop(f"the system in {root} is already installed from the current {config_dir} ({current[:12]})")
        return
    command = StringCommand("nixos-install", "--root", QuoteString(root),
                            "--flake", QuoteString(f"{config_dir}#{hostname}"), "--no-root-passwd")
    yield FunctionCommand(_stream, (command,), {})
    # Record what was installed; the digest is taken again now, after the install ran.
    record = ('d=$(cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum | sha256sum | cut -d" " -f1)'
              ' && mkdir -p "$(dirname "$2")" && printf "%s\\n" "$d" > "$2"')
    yield StringCommand("sh", "-c", QuoteString(record), "stamp", QuoteString(config_dir), QuoteString(stamp))


# --- stages -----------------------------------------------------------------------------------


def apply(profile: Profile, settings=None) -> None:
    """Generate, patch and write the NixOS configuration under /mnt/etc/nixos."""
    generate_config(profile, name="nixos-generate-config", root=ROOT)
    configuration(profile, name="NixOS configuration in /mnt/etc/nixos", root=ROOT)


def install(profile: Profile, settings=None) -> None:
    nixos_install(profile.nixos.hostname, name=f"nixos-install {profile.nixos.hostname}", root=ROOT)
