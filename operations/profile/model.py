"""
A profile: the tree of storage and system nodes, its one walk (a LUKS container's content sits on
its mapping), and the checks across the tree, with the field named.
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from operations.profile.common import _Node, host_hash
from operations.profile.storage import (Content, Disk, ExtraMount, Filesystem, Luks, Mount, Partition, Pool, Subvolume,
                                        Swap, ZfsMember)
from operations.profile.system import NixosSettings, Persistence


class Profile(_Node):
    name: str
    """The profile's name."""
    description: str = ""
    """What the layout is, in a line."""
    nixos: NixosSettings
    """The installed system."""
    disks: dict[str, Disk]
    """The disks, by key (``disks.<key>`` in messages)."""
    pools: dict[str, Pool] = {}
    """ZFS pools, by key (members say ``pool: <key>``)."""
    mounts: list[ExtraMount] = []
    """tmpfs and bind mounts."""
    persistence: Persistence = Persistence()
    """What persists, and where."""
    vars: dict[str, Any] = {}
    """(set by the loader: the resolved vars, kept for reference)"""

    # --- walking the tree -------------------------------------------------------------------

    def partitions(self) -> list[tuple[str, Disk, Partition]]:
        return [(key, disk, part) for key, disk in self.disks.items() for part in disk.partitions]

    def partition(self, label: str) -> Partition:
        for _, _, part in self.partitions():
            if part.label == label:
                return part
        raise KeyError(label)

    def walk(self) -> list[tuple[Partition, "Content", str]]:
        """Every content node with the block device it sits on, in disk order: a partition's
        content on the partition, and a LUKS container's content on its opened mapping."""
        found = []
        for _, _, part in self.partitions():
            content, device = part.content, part.device
            while content is not None:
                found.append((part, content, device))
                content, device = (content.content, content.device) if isinstance(content, Luks) else (None, "")
        return found

    def luks_devices(self) -> list[tuple[Partition, Luks]]:
        return [(part, node) for part, node, _ in self.walk() if isinstance(node, Luks)]

    def filesystems(self) -> list[tuple[str, Filesystem]]:
        """(block device, filesystem) for every filesystem, inside LUKS or directly on a partition."""
        return [(device, node) for _, node, device in self.walk() if isinstance(node, Filesystem)]

    def swaps(self) -> list[tuple[str, Swap]]:
        return [(device, node) for _, node, device in self.walk() if isinstance(node, Swap)]

    def pool_members(self, pool_key: str) -> list[tuple[str, Partition]]:
        """(device to hand to zpool, partition) of every partition that belongs to a pool."""
        return [(device, part) for part, node, device in self.walk()
                if isinstance(node, ZfsMember) and node.pool == pool_key]

    def id_devices(self) -> list[str]:
        """Partitions whose UUID (or PARTUUID) the NixOS configuration names."""
        return [part.device for _, _, part in self.partitions() if part.content is not None and part.content.needs_ids]

    def all_mounts(self) -> list[Mount]:
        """Every mount of the installed system, parents before children."""
        mounts = [mount for _, node, device in self.walk() for mount in node.mounts(device)]
        mounts += [mount for pool in self.pools.values() for ds in pool.datasets
                   if (mount := ds.mount(pool.name)) is not None]
        mounts += [extra.mount() for extra in self.mounts]
        return sorted(mounts, key=lambda m: (m.mountpoint != "/", m.mountpoint.count("/"), m.mountpoint))

    def resume_swap(self) -> tuple[str, Subvolume | None, Swap | None] | None:
        """Where a hibernated system resumes from: (block device, the subvolume holding the btrfs
        swapfile, None) or (swap partition, None, its Swap); the first swapfile, else the first swap
        partition with a stored (not random) key; None when there is none."""
        for device, fs in self.filesystems():
            for sub in fs.subvolumes:
                if sub.swapfile and sub.mountpoint:
                    return device, sub, None
        for device, swap in self.swaps():
            if not swap.random_encryption:
                return device, None, swap
        return None

    def resume_swap_bytes(self) -> int | None:
        """The size of the swap a hibernated system resumes from (None: none, or a partition sized
        ``rest``, known only once the disk is)."""
        found = self.resume_swap()
        if found is None:
            return None
        device, subvolume, _swap = found
        if subvolume is not None:
            return subvolume.swapfile.size_bytes
        return next((part.size_bytes for _, _, part in self.partitions() if part.device == device), None)

    @property
    def hash(self) -> str:
        return host_hash(self.nixos.hostname)

    @property
    def host_id(self) -> str:
        # networking.hostId: 8 hex digits, stable per host name (ZFS refuses to import a pool
        # last used by another hostId without -f, so it must not change between installs).
        return self.hash

    # --- checks across the tree ---------------------------------------------------------------

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        labels = [p.label for _, _, p in self.partitions()]
        dupes = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
        if dupes:
            raise ValueError(f"partition labels used twice: {dupes}")
        devices = [d.device for d in self.disks.values()]
        if len(set(devices)) != len(devices):
            raise ValueError(f"two disks name the same device: {devices}")
        mappers = [luks.mapper for _, luks in self.luks_devices()]
        if len(set(mappers)) != len(mappers):
            raise ValueError(f"LUKS mapper names used twice: {mappers}")

        for key, pool in self.pools.items():
            members = {part.label for _, part in self.pool_members(key)}
            for label in pool.members:
                if label not in labels:
                    raise ValueError(f"pools.{key}: member {label!r} is not a partition label of this profile")
                if label not in members:
                    raise ValueError(f"pools.{key}: partition {label!r} has no content 'type: zfs, pool: {key}'")
            unused = members - set(pool.members)
            if unused:
                raise ValueError(f"pools.{key}: partitions {sorted(unused)} say they belong to this pool but no vdev uses them")
            names = [d.name for d in pool.datasets]
            if len(set(names)) != len(names):
                raise ValueError(f"pools.{key}: dataset names used twice")
        for part, node, _ in self.walk():
            if isinstance(node, ZfsMember) and node.pool not in self.pools:
                raise ValueError(f"partition {part.label}: pool {node.pool!r} is not declared under pools")

        mountpoints = [m.mountpoint for m in self.all_mounts()]
        for mp in mountpoints:
            if not mp.startswith("/") or (mp != "/" and mp.endswith("/")) or "//" in mp or "/../" in f"{mp}/":
                raise ValueError(f"mount point {mp!r} must be an absolute path without trailing '/' or '..'")
        dupes = sorted({mp for mp in mountpoints if mountpoints.count(mp) > 1})
        if dupes:
            raise ValueError(f"mount points used twice (overlapping mounts): {dupes}")
        if "/" not in mountpoints:
            raise ValueError("no file system is mounted at '/'")
        if self.nixos.hibernate and self.resume_swap() is None:
            random = [device for device, swap in self.swaps() if swap.random_encryption]
            if random:
                raise ValueError(f"nixos.hibernate (tabula_vars['hibernate']) with swap on {', '.join(random)} "
                                 "encrypted with a new random key at every boot "
                                 "(tabula_vars['swap_random_encryption']): the image written at hibernation could "
                                 "never be read back; set one of the two to false")
            raise ValueError("nixos.hibernate (tabula_vars['hibernate']): the profile has no swap to hibernate to "
                             "(a btrfs swapfile or a swap partition); add one or set it to false")
        return self
