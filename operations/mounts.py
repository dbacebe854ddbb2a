"""
Mounts of the system being installed, under /mnt, parents first: btrfs subvolumes, vfat, f2fs,
ext4, ZFS legacy datasets (``mount -t zfs pool/ds``), tmpfs and bind mounts (whose source is a
path of the installed system, so it lives under /mnt too and is created when missing).

A mount point that is already mounted is checked (source, type, options as /proc/mounts shows
them) instead of mounted again; a mismatch is drift and stops the run.
"""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase, QuoteString, StringCommand
from operations.run import Made, Run, one_command, operation

from operations.errors import TabulaError
from operations.nixlit import NixFragments, nix_list, nix_string, stable_device
from operations.profile import Mount, Profile, parse_size
from operations.settings import Settings
from operations.target import (CanonicalPath, Written, decode_octal, install_path, listing_command, parse_listing, read_fact,
                               under)

# Options mount(8) consumes itself: never shown in /proc/mounts.
USERSPACE_OPTIONS = {"bind", "rbind", "defaults", "nofail", "noauto", "auto", "user", "users", "_netdev", "zfsutil"}
# Options the kernel reports with a normalised value: only their presence is compared.
VALUE_NORMALISED = {"size", "nr_inodes", "nr_blocks"}


# --- facts ------------------------------------------------------------------------------------


class Mounts(FactBase):
    """
    Current mounts from ``/proc/mounts`` by mount point (the last mount on a point wins), with
    octal escapes decoded.

    .. code:: python

        {"/mnt": {"device": "/dev/mapper/cryptroot", "fstype": "btrfs",
                  "options": ["rw", "noatime", "compress=zstd:3", "subvol=/@root"]}}
    """

    default = dict

    def command(self) -> str:
        return "cat /proc/mounts"

    def process(self, output):
        return parse_proc_mounts(output)


def parse_proc_mounts(lines) -> dict:
    mounts = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        device, target, fstype, options = parts[:4]
        mounts[decode_octal(target)] = {
            "device": decode_octal(device),
            "fstype": fstype,
            "options": options.split(","),
        }
    return mounts


# --- comparing --------------------------------------------------------------------------------


def option_problems(wanted: tuple[str, ...] | list[str], actual: list[str]) -> list[str]:
    """The wanted options /proc/mounts does not show (kernel spellings taken into account)."""
    have = {}
    for opt in actual:
        key, _, value = opt.partition("=")
        have[key] = value
    missing = []
    for opt in wanted:
        key, sep, value = opt.partition("=")
        if key in USERSPACE_OPTIONS or key.startswith("x-"):
            continue
        if key not in have:
            missing.append(opt)
        elif not sep or key in VALUE_NORMALISED:
            continue
        elif key == "subvol":
            if have[key].lstrip("/") != value.lstrip("/"):
                missing.append(opt)
        elif key == "compress" or key == "compress-force":
            if have[key] != value and not have[key].startswith(value + ":"):   # zstd -> zstd:3
                missing.append(opt)
        elif have[key] != value:
            missing.append(opt)
    return missing


def mount_command(mount: Mount, target: str) -> list[StringCommand]:
    options = [o for o in mount.options if o != "bind"]
    if mount.fstype == "none" and "bind" in mount.options:
        source = install_path(mount.device)
        commands = [StringCommand("mkdir", "-p", QuoteString(source), QuoteString(target)),
                    StringCommand("mount", "--bind", QuoteString(source), QuoteString(target))]
        if options:
            commands.append(StringCommand("mount", "-o", QuoteString(",".join(["remount", "bind", *options])),
                                          QuoteString(target)))
        return commands
    args: list = ["mount", "-t", mount.fstype]
    if options:
        args += ["-o", QuoteString(",".join(options))]
    source = "tmpfs" if mount.fstype == "tmpfs" else mount.device
    args += [QuoteString(source), QuoteString(target)]
    return [StringCommand("mkdir", "-p", QuoteString(target)), StringCommand(*args)]


# --- operations -------------------------------------------------------------------------------


@operation()
def mounted(run: Run, mounts: list[Mount]):
    """
    Mount the installed system's filesystems under /mnt, parents first, creating the mount
    points, in one round trip. Mounts already in place are checked against the profile (source,
    type, options); one that differs is drift and stops the run before anything is mounted.

    + run: the run (facts, what it made)
    + mounts: the profile's Mounts in order (mount point of the installed system, device, type, options)

    **Example:**

    .. code:: python

        mounts.mounted(run, [Mount(mountpoint="/home", device="/dev/mapper/cryptroot", fstype="btrfs",
                              options=("subvol=@home", "noatime"))])
    """
    current = run.read(Mounts)
    commands, present, fresh, plans = [], [], {}, []
    for mount in mounts:
        target = install_path(mount.mountpoint)
        if target in current:
            check_mounted(run, mount, target, current[target])
            present.append(target)
            fresh[target] = False
        else:
            commands += mount_command(mount, target)
            plans.append(mount)
            fresh[target] = is_empty_when_mounted(run, mount)
            if "bind" in mount.options:
                fresh[install_path(mount.device)] = False   # seen through the bind too: no shortcut
    for path, empty in fresh.items():
        run.record_fresh(path, empty)
    if commands:
        for mount in plans:
            run.tell(f"mount {describe(mount)}")
        if present:
            run.tell(f"{', '.join(present)} {'are' if len(present) > 1 else 'is'} already mounted as the profile says")
        yield one_command(*commands)
    else:
        run.noop(f"{', '.join(present)} {'are' if len(present) > 1 else 'is'} already mounted as the profile says")


def subvolume_option(options) -> str | None:
    """The btrfs subvolume a mount's options name (``subvol=@home`` in a profile, ``subvol=/@home``
    in /proc/mounts: both "@home"), or None."""
    return next((o.split("=", 1)[1].lstrip("/") for o in options if o.startswith("subvol=")), None)


def is_empty_when_mounted(run: Run, mount: Mount) -> bool:
    """Whether this mount shows an empty filesystem: a tmpfs, or a filesystem, btrfs subvolume or
    ZFS dataset this same run just created (the later steps then have nothing to read below it)."""
    if mount.fstype == "tmpfs":
        return True
    if mount.fstype == "btrfs":
        subvol = subvolume_option(mount.options)
        return subvol is not None and run.created_this_run(Made.subvolume(mount.device, subvol))
    if mount.fstype == "zfs":
        return run.created_this_run(Made.dataset(mount.device))
    return mount.fstype != "none" and run.created_this_run(Made.filesystem(mount.device))


def check_mounted(run: Run, mount: Mount, target: str, current: dict) -> None:
    """Stop (TabulaError) when ``target`` is mounted differently from ``mount`` (drift)."""
    problems = []
    is_bind = "bind" in mount.options
    if not is_bind and mount.fstype != current["fstype"]:
        problems.append(f"type {current['fstype']}, not {mount.fstype}")
    if mount.fstype == "zfs" and current["device"] != mount.device:
        problems.append(f"source {current['device']}, not {mount.device}")
    elif mount.device.startswith("/dev/") and current["device"] != mount.device:
        want, have = run.read_many([(CanonicalPath, {"path": mount.device}), (CanonicalPath, {"path": current["device"]})])
        if want != have:
            problems.append(f"source {current['device']} ({have}), not {mount.device} ({want})")
    missing = option_problems(mount.options, current["options"])
    if missing:
        problems.append(f"options {','.join(current['options'])} lack {','.join(missing)}")
    if problems:
        raise TabulaError(f"{target} is already mounted, but differently (drift): " + "; ".join(problems) +
                          f". Unmount it (umount -R {shlex.quote(target)}) and run again.")


def describe(mount: Mount) -> str:
    return f"{mount.mountpoint} at {install_path(mount.mountpoint)} ({mount.fstype} {mount.device} {','.join(mount.options)})"


def apply(run: Run) -> None:
    wanted = run.profile.all_mounts()
    if wanted:
        mounted(run, mounts=wanted, name=f"Mounts under {install_path('/')}")


# --- NixOS ------------------------------------------------------------------------------------


def nix_fragments(profile: Profile, ids: dict | None = None, placeholder: bool = False) -> NixFragments:
    """hardware-configuration.nix: every mount as ``fileSystems`` (devices by UUID, options,
    neededForBoot) and every swap partition and swapfile as ``swapDevices``."""
    parts: list[str] = []
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
    for _, fs in profile.filesystems():
        for sub in fs.subvolumes:
            if sub.swapfile and sub.mountpoint:
                size_mib = sub.swapfile.size_bytes // (1024 * 1024)
                swaps.append(f"{{ device = {nix_string(sub.swapfile_path)}; size = {size_mib}; }}")
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
    return NixFragments(hardware="\n\n".join(parts))


# --- gaps: what a tmpfs holds ---------------------------------------------------------------------


class FilesystemListing(FactBase):
    """Everything below a folder on its own filesystem (``target.listing_command``'s lines)."""

    def command(self, path: str) -> StringCommand:
        return StringCommand("sh", "-c", QuoteString(f'[ -d "$1" ] || exit 0; {listing_command()}'), "list",
                             QuoteString(path))

    def process(self, output):
        return list(output)

    @staticmethod
    def default():
        return []


def written_since_boot(run: Run, root: str) -> tuple[list[Written], list[str]]:
    """(everything on the profile's tmpfs mounts, with its installed path; how that was found):
    a tmpfs starts empty at every boot, so all it holds was written since."""
    written, how = [], []
    for mount in run.profile.all_mounts():
        if mount.fstype == "tmpfs":
            here = root.rstrip("/") + mount.mountpoint if mount.mountpoint != "/" else (root or "/")
            found = parse_listing(run.read(FilesystemListing, path=here), mount.mountpoint)
            written += [entry for entry, _ in found.values()]
            how.append(f"the files on the tmpfs at {here}")
    return written, how


# --- checks -------------------------------------------------------------------------------------


def checks(host, settings: Settings, root: str) -> list[str]:
    """Every mount of the profile where the installed system has it (under ``root``), as the
    kernel shows it in /proc/mounts: type, source and options (a tmpfs's size bound compared by
    value); on the booted system (``root`` = /) every swap the profile declares is active. One
    line per mismatch.

    + host: a testinfra host (``read_fact`` runs this layer's facts through it)
    """
    failures = []
    current = read_fact(host, Mounts)
    for mount in settings.profile.all_mounts():
        target = under(root, mount.mountpoint)
        have = current.get(target)
        if have is None:
            failures.append(f"{target}: not mounted (the profile mounts {mount.fstype} {mount.device} there)")
            continue
        if "bind" not in mount.options and have["fstype"] != mount.fstype:
            failures.append(f"{target}: type {have['fstype']}, the profile wants {mount.fstype}")
        if mount.fstype == "zfs" and have["device"] != mount.device:
            failures.append(f"{target}: source {have['device']}, the profile wants {mount.device}")
        elif mount.device.startswith("/dev/") and have["device"] != mount.device:
            want, found = (read_fact(host, CanonicalPath, path=mount.device),
                           read_fact(host, CanonicalPath, path=have["device"]))
            if want != found:
                failures.append(f"{target}: source {have['device']} ({found}), the profile wants {mount.device} ({want})")
        missing = option_problems(mount.options, have["options"]) + size_problems(mount.options, have["options"])
        if missing:
            failures.append(f"{target}: options {','.join(have['options'])} lack {','.join(missing)}")
    if root == "/":
        failures += swap_problems(host, settings.profile)
    return failures


def size_problems(wanted: tuple[str, ...] | list[str], actual: list[str]) -> list[str]:
    """A tmpfs size bound the kernel shows in KiB (size=2G as size=2097152k) that is not the
    wanted one (a percentage of RAM is only shown as its value: not compared)."""
    have = dict(opt.partition("=")[::2] for opt in actual)
    problems = []
    for opt in wanted:
        key, _, value = opt.partition("=")
        if key != "size" or value.endswith("%") or not have.get("size", "").endswith("k"):
            continue
        try:
            if parse_size(value) != int(have["size"][:-1]) * 1024:
                problems.append(opt)
        except ValueError:
            problems.append(opt)
    return problems


def swap_problems(host, profile: Profile) -> list[str]:
    """The booted system's swapDevices (this module renders them) active in /proc/swaps."""
    active = {decode_octal(line.split()[0]) for line in host.run("cat /proc/swaps").stdout.splitlines()[1:]
              if line.strip()}
    canonical = {read_fact(host, CanonicalPath, path=path) or path for path in active}
    problems = []
    for _, fs in profile.filesystems():
        for sub in fs.subvolumes:
            if sub.swapfile and sub.mountpoint and sub.swapfile_path not in active:
                problems.append(f"{sub.swapfile_path}: not active swap")
    for device, swap in profile.swaps():
        if swap.random_encryption:
            continue        # swapped through a mapping with a new key at every boot
        if read_fact(host, CanonicalPath, path=device) not in canonical:
            problems.append(f"{device}: not active swap")
    return problems
