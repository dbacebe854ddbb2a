"""
The filesystems layer: filesystems (vfat, btrfs, f2fs, ext4) and swap partitions, mkfs/mkswap
only where the device carries no signature. A device that already holds the wanted filesystem is reused, never
re-formatted; one holding something else is drift and stops the run.
"""

from __future__ import annotations

import shlex

from pyinfra.api import QuoteString, StringCommand

from operations.adoptlit import EPHEMERAL_ROOTS, mounted_at
from operations.contract import Layer, Target
from operations.diskolit import bind_hooks, mounted
from operations.errors import TabulaError
from operations.nixlit import DeviceIds, NixFragments, nix_string
from operations.profile import Filesystem, Profile, Swap
from operations.run import FactRequest, Made, Run, one_command, operation, script
from operations.target import SIGNATURE_FOUND_ADVICE, WholeDiskSignature

# mkfs program and its "label" flag, by format.
MKFS = {
    "vfat": ("mkfs.vfat", "-n"),
    "btrfs": ("mkfs.btrfs", "-L"),
    "f2fs": ("mkfs.f2fs", "-l"),
    "ext4": ("mkfs.ext4", "-L"),
}


def mkfs_command(device: str, fs: Filesystem) -> StringCommand:
    program, label_flag = MKFS[fs.format]
    args: list = [program, *(QuoteString(o) for o in fs.mkfs_options)]
    if fs.fs_label:
        args += [label_flag, QuoteString(fs.fs_label)]
    if fs.format == "ext4":
        args.append("-q")
    args.append(QuoteString(device))
    return script(blank_guard(device) + " ".join(str(a) if not isinstance(a, QuoteString) else shlex.quote(a.obj)
                                                 for a in args))


def blank_guard(device: str) -> str:
    """Shell that stops unless the device exists and carries no signature: checked again in the
    formatting command itself, so nothing is formatted over a signature the facts missed (or did
    not read, on a device this run just made)."""
    quoted = shlex.quote(device)
    return (f"udevadm settle; [ -b {quoted} ] && [ -z \"$(blkid -p -o value -s TYPE {quoted})\" ] || "
            f"{{ echo 'tabula: {device} is missing or already carries a signature: not formatting it "
            f"{SIGNATURE_FOUND_ADVICE}' >&2; exit 1; }}; ")


def filesystem_check(device: str, fs: Filesystem, found: dict) -> tuple[StringCommand | None, str]:
    """(mkfs command, "") where the device is blank, (None, what is there) where the wanted
    filesystem is already there; TabulaError on anything else (drift, never re-formatted)."""
    kind = found.get("TYPE")
    if kind == fs.format:
        if fs.fs_label and found.get("LABEL") != fs.fs_label:
            raise TabulaError(f"{device} holds {kind} labelled {found.get('LABEL')!r}, the profile wants "
                              f"{fs.fs_label!r} (drift): relabel it or fix the profile")
        label = f" labelled {found['LABEL']!r}" if found.get("LABEL") else ""
        return None, f"{device} already holds {kind}{label} (UUID {found.get('UUID')})"
    if kind or found.get("PTTYPE"):
        raise TabulaError(f"refusing to make {fs.format} on {device}: it holds {kind or found['PTTYPE'] + ' partition table'}"
                          " (drift: never re-formatted)")
    return mkfs_command(device, fs), ""


def swap_check(device: str, swap: Swap, found: dict) -> tuple[StringCommand | None, str]:
    """As ``filesystem_check`` for a swap partition (random-key swap needs no signature: NixOS
    re-encrypts it with a new key at every boot)."""
    if swap.random_encryption:
        return None, f"{device} is swap with a random key at every boot: nothing to format"
    if found.get("TYPE") == "swap":
        return None, f"{device} already holds a swap signature (UUID {found.get('UUID')})"
    if found.get("TYPE") or found.get("PTTYPE"):
        raise TabulaError(f"refusing to mkswap {device}: it holds {found.get('TYPE') or found.get('PTTYPE')}")
    return script(blank_guard(device) + f"mkswap {shlex.quote(device)}"), ""


@operation()
def formatted(run: Run, filesystems: list[tuple[str, Filesystem]], swaps: list[tuple[str, Swap]]):
    """
    Make the filesystems and swap signatures on the devices that have no signature yet, all in
    one round trip (signatures read in one too). A device that already holds the wanted
    filesystem is reused; one holding anything else stops the run before any mkfs.

    + run: the run (facts, what it made)
    + filesystems: ``(device, Filesystem)`` pairs (format, label, mkfs options)
    + swaps: ``(device, Swap)`` pairs

    **Example:**

    .. code:: python

        filesystems.formatted(run, filesystems=[("/dev/mapper/cryptroot", Filesystem(format="btrfs", fs_label="nixos"))],
                              swaps=[])
    """
    devices = [device for device, _ in filesystems] + [device for device, _ in swaps]
    # Devices this run just made are not read: each mkfs command checks its device is blank itself.
    to_read = [] if run.before_wipe() else [device for device in devices if not run.created_this_run(Made.device(device))]
    found = {device: {} for device in devices}
    found.update(zip(to_read, run.read_many([(WholeDiskSignature, {"device": device}) for device in to_read])))
    checks = [filesystem_check(device, fs, found[device]) for device, fs in filesystems]
    checks += [swap_check(device, swap, found[device]) for device, swap in swaps]
    commands = [command for command, _ in checks if command is not None]
    if commands:
        plans = [f"make {fs.format} on {device}" + (f", labelled {fs.fs_label!r}" if fs.fs_label else "")
                 for device, fs in filesystems] + [f"make swap on {device}" for device, _ in swaps]
        for (command, kept), plan in zip(checks, plans):
            run.tell(plan if command is not None else kept)
        run.record_created(*(Made.filesystem(device) for (device, _), (command, _) in zip(filesystems, checks) if command))
        yield one_command(*commands)
    else:
        run.noop("; ".join(kept for _, kept in checks))


# --- the layer ------------------------------------------------------------------------------------


def mkfs_arguments(fs: Filesystem) -> list[str]:
    """mkfs's options and label flag as ``mkfs_command`` passes them (the disko export too)."""
    return [*fs.mkfs_options, *([MKFS[fs.format][1], fs.fs_label] if fs.fs_label else [])]


def formatted_node(node: dict, fs: Filesystem) -> dict:
    """A disko filesystem node's mkfs arguments and own mount."""
    if mkfs_arguments(fs):
        node["extraArgs"] = mkfs_arguments(fs)
    node.update(mounted(fs.mountpoint, fs.mount_options))
    return node


class FilesystemsLayer(Layer):
    name = "filesystems"
    absent = "no filesystem or swap partition"

    def make(self, run: Run) -> None:
        wanted, swaps = list(run.profile.filesystems()), list(run.profile.swaps())
        if wanted or swaps:
            formatted(run, filesystems=wanted, swaps=swaps, name="Filesystems")

    def adopt(self, found, draft) -> None:
        """Each filesystem on a partition or an opened container: its format, label, mount point
        and options; swap (a swap partition without a signature is keyed at random at boot). A
        filesystem mounted whole at / is refused: nothing rolls it back at boot."""
        for device in draft.adopted_devices():
            seen = found.device(device) or {}
            fstype, mounts = seen.get("fstype"), found.mounts_of(device)
            code = (draft.gpt_code(device) or "").upper()
            if draft.contents.get(device, {}).get("type") == "luks":
                continue                                  # an open container: the luks layer's
            if fstype == "swap" or (code == "8200" and fstype in (None, "crypto_LUKS")):
                node = {"type": "swap"}
                if fstype != "swap":
                    node["random_encryption"] = True
                    draft.infer(f"{device}: a swap partition without a swap signature: swap keyed at random at "
                                "every boot (random_encryption)")
                draft.content(device, node)
                continue
            if fstype in (None, "crypto_LUKS", "zfs_member"):
                continue                                  # left empty, or the luks and zfs layers'
            if fstype not in MKFS:
                draft.refuse(device, f"{fstype}: not a filesystem a profile describes "
                                     f"({', '.join(sorted(MKFS))}, swap, LUKS, ZFS)")
                continue
            node = {"type": "filesystem", "format": fstype}
            if seen.get("label"):
                node["fs_label"] = seen["label"]
            if fstype == "vfat":
                node["mkfs_options"] = ["-F", "32"]
                draft.infer(f"{device}: FAT32 (mkfs_options -F 32)")
            whole = {mp: m for mp, m in mounts.items() if m["root"] == "/"}
            if whole:
                mountpoint, mount = sorted(whole.items())[0]
                if mountpoint == "/":
                    draft.refuse(device, f"a plain {fstype} root: nothing rolls it back at boot (an ephemeral "
                                         f"root is {EPHEMERAL_ROOTS})")
                    continue
                node.update(mounted_at(mountpoint, mount["options"]))
            draft.content(device, node)

    def applies(self, profile: Profile) -> bool:
        return bool(profile.filesystems() or profile.swaps())

    def owns(self, node) -> bool:
        # (a btrfs with subvolumes is the btrfs layer's node in the disko export)
        return isinstance(node, Swap) or (isinstance(node, Filesystem) and node.format != "btrfs")

    def tools(self, profile: Profile) -> dict[str, str]:
        needed = {}
        for part, node, _ in profile.walk():
            if isinstance(node, Filesystem):
                needed[MKFS[node.format][0]] = f"{node.format} on {part.label}"
            elif isinstance(node, Swap):
                needed["mkswap"] = f"swap partition {part.label}"
        return needed

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        return {}

    def observe(self, run: Run) -> list[FactRequest]:
        devices = [device for device, _ in run.profile.filesystems()] + [device for device, _ in run.profile.swaps()]
        return [(WholeDiskSignature, {"device": device}) for device in devices]

    def problems(self, target: Target) -> list[str]:
        """Each filesystem's type and label as blkid probes them on its device, and each swap
        partition's signature (none to find on a swap with a new random key at every boot)."""
        failures = []
        for device, fs in target.settings.profile.filesystems():
            found = target.read(WholeDiskSignature, device=device)
            if found.get("TYPE") != fs.format:
                failures.append(f"{device}: filesystem {found.get('TYPE') or 'none'}, the profile wants {fs.format}")
            elif fs.fs_label and found.get("LABEL") != fs.fs_label:
                failures.append(f"{device}: label {found.get('LABEL')!r}, the profile wants {fs.fs_label!r}")
        for device, swap in target.settings.profile.swaps():
            if swap.random_encryption:
                continue
            found = target.read(WholeDiskSignature, device=device)
            if found.get("TYPE") != "swap":
                failures.append(f"{device}: {found.get('TYPE') or 'no signature'}, the profile wants swap")
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        """configuration.nix: the f2fs module in the initrd when an f2fs is needed for boot (the
        temproot notes: it must sometimes be there explicitly to mount /.local); with hibernation
        to a swap partition, the partition to resume from."""
        configuration = ""
        if any(fs.format == "f2fs" and fs.needed_for_boot for _, fs in profile.filesystems()):
            configuration += '  boot.initrd.kernelModules = [ "f2fs" ];\n'
        resume = profile.resume_swap() if profile.nixos.hibernate else None
        if resume and resume[2] is not None:
            # by partlabel: the label is the profile's, its UUID changes with every mkswap
            configuration += ("  # Hibernation: resume from the swap partition.\n"
                              f"  boot.resumeDevice = {nix_string(resume[0])};\n")
        return NixFragments(configuration=configuration)

    def gaps(self, run: Run, root: str) -> tuple[list, list[str]]:
        return [], []

    def disko(self, profile: Profile, context) -> dict:
        return {}

    def disko_node(self, node, device: str, part, context) -> dict | None:
        if isinstance(node, Swap):
            made = {"type": "swap"}
            if node.random_encryption:
                made["randomEncryption"] = True
            return made
        made = formatted_node({"type": "filesystem", "format": node.format}, node)
        made.update(bind_hooks(context.profile, [node.mountpoint] if node.mountpoint else []))
        return made


LAYER = FilesystemsLayer()
