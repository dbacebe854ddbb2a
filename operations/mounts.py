"""
The mounts layer: the mounts of the system being installed, under /mnt, parents first (btrfs
subvolumes, vfat, f2fs,
ext4, ZFS legacy datasets (``mount -t zfs pool/ds``), tmpfs and bind mounts (whose source is a
path of the installed system, so it lives under /mnt too and is created when missing).

A mount point that is already mounted is checked (source, type, options as /proc/mounts shows
them: ``mount_problems``, the rule verify applies too) instead of mounted again; a mismatch is
drift and stops the run. Swap: the installed system's swapDevices, and whether they are active.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable

from pyinfra.api import FactBase, QuoteString, StringCommand

from operations.adoptlit import NOT_NEEDED_FOR_BOOT, user_options
from operations.contract import Layer, Target
from operations.diskolit import bind_hooks
from operations.errors import TabulaError
from operations.nixlit import DeviceIds, NixFragments, nix_list, nix_string
from operations.profile import Mount, Profile, Tmpfs, parse_size
from operations.run import FactRequest, Made, Run, one_command, operation
from operations.target import CanonicalPath, Written, decode_octal, install_path, listing_command, parse_listing, under

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


class ActiveSwaps(FactBase):
    """Active swap devices and files (``/proc/swaps``), as the kernel names them."""

    default = list

    def command(self) -> str:
        return "cat /proc/swaps"

    def process(self, output):
        return [decode_octal(line.split()[0]) for line in output[1:] if line.strip()]


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
    # Every source this run has just made (a first run): none of it can be mounted yet, so what
    # was mounted at the start of the run is all there is to check; the command checks again.
    new = all(is_empty_when_mounted(run, m) for m in mounts if m.fstype not in ("tmpfs", "none"))
    current = run.read_at_start(Mounts) if new else None
    if current is None:
        new, current = False, run.read(Mounts)
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
        yield one_command(free_command([install_path(m.mountpoint) for m in plans]) if new else None, *commands)
    else:
        run.noop(f"{', '.join(present)} {'are' if len(present) > 1 else 'is'} already mounted as the profile says")


def free_command(targets: list[str]) -> StringCommand:
    """Shell that stops unless nothing is mounted at any of the targets (one awk over /proc/mounts,
    which escapes a space as \\040: the targets are compared so)."""
    wanted = "".join(f"want[{json.dumps(_escaped(t))}] = 1; " for t in targets)
    program = f"BEGIN {{ {wanted}}} ($2 in want) {{ print $2 }}"
    script = (f"taken=$(awk {shlex.quote(program)} /proc/mounts); "
              '[ -z "$taken" ] || { echo "tabula: $taken already mounted, by something this run did not mount: '
              'unmount it (umount -R) and run again" >&2; exit 1; }')
    return StringCommand(script)


def _escaped(path: str) -> str:
    """A path as /proc/mounts writes it (space, tab, newline and backslash octal-escaped)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


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


def mount_problems(mount: Mount, have: dict, canonical: Callable[[str, str], tuple[str, str]],
                   sizes: bool = False) -> list[str]:
    """How the mount in place (``have``, from /proc/mounts) differs from the profile's: type,
    source (devices compared by where they point: ``canonical(wanted, found)``, read only when
    the names differ), options as the kernel shows them (with ``sizes``, a tmpfs size bound by
    value too). The one rule of the mount step's drift refusal and of verify."""
    problems = []
    if "bind" not in mount.options and mount.fstype != have["fstype"]:
        problems.append(f"type {have['fstype']}, the profile wants {mount.fstype}")
    if mount.fstype == "zfs" and have["device"] != mount.device:
        problems.append(f"source {have['device']}, the profile wants {mount.device}")
    elif mount.device.startswith("/dev/") and have["device"] != mount.device:
        want, found = canonical(mount.device, have["device"])
        if want != found:
            problems.append(f"source {have['device']} ({found}), the profile wants {mount.device} ({want})")
    missing = option_problems(mount.options, have["options"]) + (size_problems(mount.options, have["options"])
                                                                  if sizes else [])
    if missing:
        problems.append(f"options {','.join(have['options'])} lack {','.join(missing)}")
    return problems


def check_mounted(run: Run, mount: Mount, target: str, current: dict) -> None:
    """Stop (TabulaError) when ``target`` is mounted differently from ``mount`` (drift)."""
    problems = mount_problems(mount, current, lambda *paths: tuple(run.read_many(
        [(CanonicalPath, {"path": path}) for path in paths])))
    if problems:
        raise TabulaError(f"{target} is already mounted, but differently (drift): " + "; ".join(problems) +
                          f". Unmount it (umount -R {shlex.quote(target)}) and run again.")


def describe(mount: Mount) -> str:
    return f"{mount.mountpoint} at {install_path(mount.mountpoint)} ({mount.fstype} {mount.device} {','.join(mount.options)})"


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



# --- the layer ------------------------------------------------------------------------------------


# A tmpfs's options a profile keeps (the kernel shows others: inode64...).
TMPFS_OPTIONS = ("size", "nosuid", "nodev", "noexec", "noatime", "nr_inodes")


class MountsLayer(Layer):
    name = "mounts"
    absent = "no mount"

    def mount(self, run: Run) -> None:
        wanted = run.profile.all_mounts()
        if wanted:
            mounted(run, mounts=wanted, name=f"Mounts under {install_path('/')}")

    def rescue(self, run: Run) -> None:
        self.mount(run)         # everything under /mnt, parents first, as the install does

    def adopt(self, found, draft) -> None:
        """The tmpfs mounts of the installed system (its size bound, its mode), and the bind
        mounts of a folder of a filesystem mounted whole (``/.local/nix`` on ``/nix``)."""
        installed = found.installed_mounts()
        whole = {(found.real(m["device"]), m["fstype"]): mp for mp, m in sorted(installed.items()) if m["root"] == "/"}
        for mountpoint, mount in sorted(installed.items(), key=lambda item: (item[0] != "/", item[0])):
            if mount["fstype"] == "tmpfs":
                options = [o for o in user_options(mount["options"]) if o.partition("=")[0] in TMPFS_OPTIONS]
                mode = next((o for o in mount["options"] if o.startswith("mode=")), None)
                draft.mounts.append({"type": "tmpfs", "mountpoint": mountpoint,
                                     "options": ([mode] if mode else []) + options, "needed_for_boot": True})
            elif mount["root"] != "/" and mount["fstype"] not in ("btrfs", "zfs"):
                source = whole.get((found.real(mount["device"]), mount["fstype"]))
                if source is None:
                    draft.refuse(mountpoint, f"a bind mount of {mount['root']} on {mount['device']}, which is not "
                                             "mounted whole in the installed system")
                    continue
                draft.mounts.append({"type": "bind", "source": f"{source.rstrip('/')}{mount['root']}",
                                     "mountpoint": mountpoint, "options": user_options(mount["mount_options"]),
                                     "needed_for_boot": mountpoint not in NOT_NEEDED_FOR_BOOT})

    def applies(self, profile: Profile) -> bool:
        return bool(profile.all_mounts())

    def owns(self, node) -> bool:
        return False            # its mounts hang beside the partitions (Profile.mounts, all_mounts)

    def tools(self, profile: Profile) -> dict[str, str]:
        return {}               # mount, umount and mountpoint are every run's

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        return {}

    def observe(self, run: Run) -> list[FactRequest]:
        """/proc/mounts (read with the guard's first facts), and where the devices of the mounts
        in place point, when /proc/mounts names them otherwise than the profile."""
        current = run.read(Mounts)
        reads = []
        for mount in run.profile.all_mounts():
            have = current.get(install_path(mount.mountpoint))
            if have and mount.device.startswith("/dev/") and have["device"] != mount.device:
                reads += [(CanonicalPath, {"path": mount.device}), (CanonicalPath, {"path": have["device"]})]
        return reads

    def problems(self, target: Target) -> list[str]:
        """Every mount of the profile where the installed system has it (under ``root``), as the
        kernel shows it in /proc/mounts: type, source and options (a tmpfs's size bound compared
        by value); on the booted system (``root`` = /) every swap the profile declares is active."""
        failures = []
        current = target.read(Mounts)
        canonical = lambda *paths: tuple(target.read(CanonicalPath, path=path) for path in paths)  # noqa: E731
        for mount in target.settings.profile.all_mounts():
            where = under(target.root, mount.mountpoint)
            have = current.get(where)
            if have is None:
                failures.append(f"{where}: not mounted (the profile mounts {mount.fstype} {mount.device} there)")
                continue
            failures += [f"{where}: {problem}" for problem in mount_problems(mount, have, canonical, sizes=True)]
        if target.root == "/":
            failures += swap_problems(target)
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        """hardware-configuration.nix: every mount as ``fileSystems`` (devices by UUID, options,
        neededForBoot) and every swap partition and swapfile as ``swapDevices``."""
        parts: list[str] = []
        for mount in profile.all_mounts():
            lines = [f"  fileSystems.{nix_string(mount.mountpoint)} = {{",
                     f"    device = {nix_string(devices.path(mount.device))};",
                     f"    fsType = {nix_string(mount.fstype)};"]
            if mount.options:
                lines.append(f"    options = {nix_list(mount.options)};")
            if mount.needed_for_boot:
                lines.append("    neededForBoot = true;")
            lines.append("  };")
            parts.append("\n".join(lines))

        swaps = []
        for path, swapfile in swapfiles(profile):
            swaps.append(f"{{ device = {nix_string(path)}; size = {swapfile.size_bytes // (1024 * 1024)}; }}")
        for device, swap in profile.swaps():
            if swap.random_encryption:
                # A fresh key at every boot leaves no signature to find by UUID: name the partition.
                swaps.append(f"{{ device = {nix_string(devices.path(device, 'PARTUUID'))}; "
                             "randomEncryption.enable = true; }")
            else:
                swaps.append(f"{{ device = {nix_string(devices.path(device))}; }}")
        if swaps:
            parts.append("  swapDevices = [\n" + "".join(f"    {s}\n" for s in swaps) + "  ];")
        else:
            parts.append("  swapDevices = [ ];")
        return NixFragments(hardware="\n\n".join(parts))

    def gaps(self, run: Run, root: str) -> tuple[list[Written], list[str]]:
        return written_since_boot(run, root)

    def disko(self, profile: Profile, context) -> dict:
        """tmpfs mounts as ``nodev`` nodes; what disko cannot say as plain ``fileSystems`` beside
        disko.devices: the binds (no bind node) and neededForBoot (no such option)."""
        found: dict = {}
        nodev = {m.mountpoint: {**tmpfs_node(m), **bind_hooks(profile, [m.mountpoint])}
                 for m in profile.mounts if isinstance(m, Tmpfs)}
        if nodev:
            found["nodev"] = nodev
        beside: dict[str, dict] = {}
        binds = {m.mountpoint: m for m in profile.mounts if m.type == "bind"}
        for mount in profile.all_mounts():
            if mount.mountpoint in binds:
                bind = binds[mount.mountpoint]
                entry = {"device": bind.source, "fsType": "none", "options": ["bind", *bind.options]}
                if bind.needed_for_boot:
                    entry["neededForBoot"] = True
                beside[mount.mountpoint] = entry
            elif mount.needed_for_boot:
                beside[mount.mountpoint] = {"neededForBoot": True}
        if beside:
            found["fileSystems"] = beside
        return found

    def disko_node(self, node, device: str, part, context) -> dict | None:
        return None


def tmpfs_node(tmpfs: Tmpfs) -> dict:
    node = {"fsType": "tmpfs"}
    if tmpfs.options:
        node["mountOptions"] = list(tmpfs.options)
    return node


def swapfiles(profile: Profile) -> list:
    """(path in the installed system, Swapfile) of every swapfile: the swapDevices it renders."""
    return [(sub.swapfile_path, sub.swapfile) for _, fs in profile.filesystems() for sub in fs.subvolumes
            if sub.swapfile and sub.mountpoint]


def swap_problems(target: Target) -> list[str]:
    """The booted system's swapDevices (this layer renders them) active in /proc/swaps."""
    active = set(target.read(ActiveSwaps))
    canonical = {target.read(CanonicalPath, path=path) or path for path in active}
    problems = [f"{path}: not active swap" for path, _ in swapfiles(target.settings.profile) if path not in active]
    for device, swap in target.settings.profile.swaps():
        if swap.random_encryption:
            continue        # swapped through a mapping with a new key at every boot
        if target.read(CanonicalPath, path=device) not in canonical:
            problems.append(f"{device}: not active swap")
    return problems


LAYER = MountsLayer()
