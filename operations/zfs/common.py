"""
What every part of the zfs layer shares: the one-time properties, the name of the empty
snapshot and of the key secret, the layer's error, and how the profile's pools are walked.
"""

from __future__ import annotations

from operations.errors import TabulaError
from operations.profile import Dataset, Pool, Profile

# Properties that can only be chosen at creation: a difference is reported, never "fixed".
ONE_TIME_PROPERTIES = frozenset({
    "encryption", "keyformat", "pbkdf2iters", "casesensitivity", "normalization", "utf8only",
    "volblocksize", "ashift",
})
EMPTY_SNAPSHOT = "empty"
# The secret (run.secrets) the encrypted datasets are made and unlocked with.
KEY = "ZFS_KEY"
# Values zfs accepts but shows under another name (zfs get prints the canonical one).
VALUE_ALIASES = {
    "acltype": {"posixacl": "posix", "noacl": "off"},
}


def canonical(prop: str, value: str) -> str:
    """The value as ``zfs get`` shows it: acltype=posixacl reads back as posix."""
    return VALUE_ALIASES.get(prop, {}).get(value, value)


class ZfsError(TabulaError):
    """A pool or dataset on the target differs from the profile in a way tabula will not change."""



def member_devices(profile: Profile, pool_key: str) -> dict[str, str]:
    """partlabel -> member device of every partition of the pool."""
    return {part.label: device for device, part in profile.pool_members(pool_key)}


def search_dirs(devices: dict[str, str]) -> tuple[str, ...]:
    """The folders ``zpool import -d`` looks for the members in (their by-partlabel folder)."""
    return tuple(sorted({path.rsplit("/", 1)[0] for path in devices.values()}))


def ordered_datasets(pool: Pool) -> list[Dataset]:
    """Parents before children (every parent is declared: the profile checks it at load)."""
    return sorted(pool.datasets, key=lambda d: d.name.count("/"))


def temp_datasets(profile: Profile) -> list[str]:
    """Full names of the datasets rolled back to @empty at boot."""
    return [f"{p.name}/{d.name}" for p in profile.pools.values() for d in p.datasets if d.empty_snapshot]


def encryption_roots(pool: Pool) -> tuple[str, ...]:
    """The pool's encrypted datasets (each is its own encryption root)."""
    return tuple(f"{pool.name}/{ds.name}" for ds in pool.datasets if ds.encryption)
