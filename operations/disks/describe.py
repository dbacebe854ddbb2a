"""
How the guard names what it finds on a disk, so a person recognises their data: type, label,
UUID and size; a LUKS header by its version, UUID and label; a ZFS member by its pool, the
pool's id and state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from operations.profile import Disk


@dataclass
class DiskCheck:
    """What the guard learned about one profile disk."""

    key: str
    disk: Disk
    device: str                       # the kernel device, e.g. /dev/nvme0n1
    serial: str | None
    tree: list[dict] = field(default_factory=list)   # the disk, its partitions, stacked devices
    foreign: list[str] = field(default_factory=list)  # why its content does not match the profile


def human_size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def describe_signature(signature: dict, size: int | None, pools: dict | None = None) -> str:
    """
    What a person recognises their data by, from ``blkid -p -o export``: type, label, UUID and
    size; for LUKS the header's version, UUID and label; for a ZFS member its pool, the pool's id
    and state (``ZfsPoolsFound``).

        ext4 filesystem labelled 'family-photos', UUID 5c1f..., 16.0 GiB
        LUKS2 header UUID 9a7e..., label 'vault', 1.0 GiB
        member of ZFS pool 'tank' (pool id 1311..., ONLINE, exported: importable), 4.0 GiB
    """
    kind = signature.get("TYPE")
    label = signature.get("LABEL")
    uuid = signature.get("UUID")
    if kind == "crypto_LUKS":
        header = f"LUKS{signature.get('VERSION', '')} header UUID {uuid or '(none)'}"
        return f"{header}, label {label!r}, {human_size(size)}" if label else f"{header}, no label, {human_size(size)}"
    if kind == "zfs_member":
        pool = (pools or {}).get(uuid or "")
        if pool is None:
            state = "state unknown: zpool import does not list it (damaged, or the zfs module is not loaded)"
        elif pool["imported"]:
            state = f"imported, {pool['state']}"
        else:
            state = f"{pool['state']}, exported: importable"
        return f"member of ZFS pool {label!r} (pool id {uuid}, {state}), {human_size(size)}"
    if kind:
        what = "swap" if kind == "swap" else f"{kind} filesystem"
        named = f" labelled {label!r}" if label else " without a label"
        return f"{what}{named}, UUID {uuid or '(none)'}, {human_size(size)}"
    if signature.get("PTTYPE"):
        return f"{signature['PTTYPE']} partition table (UUID {signature.get('PTUUID', '(none)')}), {human_size(size)}"
    return f"no signature blkid knows, {human_size(size)}"


def found_on_disk(check: DiskCheck, signatures: dict[str, dict], pools: dict | None = None) -> list[str]:
    """One line per device of the disk (the disk, then each partition) saying what is on it."""
    lines = []
    for dev in check.tree:
        if dev["type"] not in ("disk", "part"):
            continue
        where = dev["name"] + (f" (partlabel {dev['partlabel']!r})" if dev.get("partlabel") else "")
        lines.append(f"{where}: {describe_signature(signatures.get(dev['name'], {}), dev.get('size'), pools)}")
    return lines
