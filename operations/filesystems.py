"""
Filesystems (vfat, btrfs, f2fs, ext4) and swap partitions: mkfs/mkswap only where the device
carries no signature. A device that already holds the wanted filesystem is reused, never
re-formatted; one holding something else is drift and stops the run.
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation

from operations.disks import WholeDiskSignature, before_wipe
from operations.errors import TabulaError
from operations.profile import Filesystem, Profile, Swap

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
    # Checked again in the same command: never format over a signature the facts missed.
    quoted = shlex.quote(device)
    guard = (f"udevadm settle; [ -b {quoted} ] && [ -z \"$(blkid -p -o value -s TYPE {quoted})\" ] || "
             f"{{ echo 'tabula: {device} is missing or already carries a signature: not formatting it' >&2; exit 1; }}; ")
    return StringCommand("sh", "-c", QuoteString(guard + " ".join(str(a) if not isinstance(a, QuoteString)
                                                                  else shlex.quote(a.obj) for a in args)))


def _existing(device: str) -> dict:
    return {} if before_wipe() else host.get_fact(WholeDiskSignature, device=device)


@operation()
def filesystem(device: str, fs: Filesystem):
    """
    Make a filesystem on a device that has no signature yet.

    + device: the block device (/dev/disk/by-partlabel/... or /dev/mapper/...)
    + fs: the profile's Filesystem node (format, label, mkfs options)

    **Example:**

    .. code:: python

        filesystems.filesystem(device="/dev/mapper/cryptroot", fs=Filesystem(format="btrfs", fs_label="nixos"))
    """
    found = _existing(device)
    kind = found.get("TYPE")
    if kind == fs.format:
        if fs.fs_label and found.get("LABEL") != fs.fs_label:
            raise TabulaError(f"{device} holds {kind} labelled {found.get('LABEL')!r}, the profile wants "
                              f"{fs.fs_label!r} (drift): relabel it or fix the profile")
        label = f" labelled {found['LABEL']!r}" if found.get("LABEL") else ""
        host.noop(f"{device} already holds {kind}{label} (UUID {found.get('UUID')})")
        return
    if kind or found.get("PTTYPE"):
        raise TabulaError(f"refusing to make {fs.format} on {device}: it holds {kind or found['PTTYPE'] + ' partition table'}"
                          " (drift: never re-formatted)")
    yield mkfs_command(device, fs)


@operation()
def swap_partition(device: str, swap: Swap):
    """
    Write a swap signature on a swap partition (random-key swap needs none: NixOS re-encrypts it
    with a new key at every boot).

    + device: the swap partition (/dev/disk/by-partlabel/...)
    + swap: the profile's Swap node

    **Example:**

    .. code:: python

        filesystems.swap_partition(device="/dev/disk/by-partlabel/swap", swap=Swap())
    """
    if swap.random_encryption:
        host.noop(f"{device} is swap with a random key at every boot: nothing to format")
        return
    found = _existing(device)
    if found.get("TYPE") == "swap":
        host.noop(f"{device} already holds a swap signature (UUID {found.get('UUID')})")
        return
    if found.get("TYPE") or found.get("PTTYPE"):
        raise TabulaError(f"refusing to mkswap {device}: it holds {found.get('TYPE') or found.get('PTTYPE')}")
    yield StringCommand("mkswap", QuoteString(device))


def apply(profile: Profile) -> None:
    for device, fs in profile.filesystems():
        filesystem(device=device, fs=fs, name=f"{fs.format} filesystem on {device}")
    for device, swap in profile.swaps():
        swap_partition(device=device, swap=swap, name=f"Swap on {device}")
