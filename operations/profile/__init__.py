"""
Storage profiles: a layout as a tree of data, validated before any command runs.

A profile is a YAML file (``profiles/<name>.yaml``) describing disks -> GPT partitions -> content,
where content is a filesystem, a LUKS container (holding more content), swap, or a ZFS pool
member; ZFS pools with their datasets, tmpfs and bind mounts hang in the same tree. Each layer
module in ``operations/`` knows how to create, mount and render into NixOS config the nodes it owns.

Profiles declare ``vars`` with defaults (``~`` for "none"; ``REQUIRED`` when inventory data must
supply the value, as ``tabula_vars``).
Any string in the profile may reference ``${var}``; a string that is exactly ``${var}`` takes the
var's value with its type (so ``pbkdf_iterations: ${luks_pbkdf_iterations}`` stays an int or null).
Derived vars: ``hash`` (first 8 hex chars of sha256 of the host name) and ``host_id``.

    from operations.profile import load_profile
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/nvme-...", "hostname": "g16"})
"""

from __future__ import annotations

from operations.profile.common import ProfileError, host_hash, parse_size
from operations.profile.load import PROFILE_DIR, REQUIRED, available_profiles, load_profile, profile_path
from operations.profile.model import Profile
from operations.profile.storage import (Bind, Content, Dataset, DatasetEncryption, Disk, ExtraMount, Filesystem, Luks,
                                        Mount, Partition, Pool, Subvolume, Swap, Swapfile, Tmpfs, Vdev, ZfsMember)
from operations.profile.system import NixosSettings, Persistence

__all__ = ["ProfileError", "host_hash", "parse_size", "PROFILE_DIR", "REQUIRED", "available_profiles", "load_profile",
           "profile_path", "Profile", "Bind", "Content", "Dataset", "DatasetEncryption", "Disk", "ExtraMount",
           "Filesystem", "Luks", "Mount", "Partition", "Pool", "Subvolume", "Swap", "Swapfile", "Tmpfs", "Vdev",
           "ZfsMember", "NixosSettings", "Persistence"]
