"""
What a run is asked to do, from pyinfra host data (group_data/, inventory.py, ``--data``):

    tabula_profile       profile name (profiles/<name>.yaml) or path           e.g. "zephyrus-btrfs"
    tabula_vars          values for the profile's vars                          e.g. {"disk": "/dev/disk/by-id/nvme-..."}
    tabula_confirm_wipe  stable ids (by-id path or serial) of disks the user confirms may be wiped
    tabula_install       run nixos-install at the end (default True)
    tabula_export_pools  export the ZFS pools at the end, ready for the first boot (default True;
                         false keeps them imported and mounted under /mnt for inspection)

Everything is validated here, before any command runs; errors name the data key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from operations.errors import TabulaError
from operations.profile import Profile, load_profile


@dataclass(frozen=True)
class Settings:
    profile: Profile
    confirm_wipe: tuple[str, ...] = ()
    install: bool = True
    export_pools: bool = True
    data: dict[str, Any] = field(default_factory=dict)


def load_settings(host_data: Any) -> Settings:
    def get(key: str, default: Any) -> Any:
        value = host_data.get(key) if hasattr(host_data, "get") else getattr(host_data, key, None)
        return default if value is None else value

    profile_name = get("tabula_profile", None)
    if not isinstance(profile_name, str) or not profile_name:
        raise TabulaError("tabula_profile: no profile selected: set it in group_data/all.py, inventory.py or --data tabula_profile=NAME")
    variables = get("tabula_vars", {})
    if not isinstance(variables, dict):
        raise TabulaError(f"tabula_vars: must be a mapping of variable names to values, got {type(variables).__name__}")
    confirm = get("tabula_confirm_wipe", [])
    if isinstance(confirm, str):
        confirm = [confirm]
    if not isinstance(confirm, (list, tuple)) or not all(isinstance(c, str) for c in confirm):
        raise TabulaError("tabula_confirm_wipe: must be a list of disk ids (by-id paths or serials)")
    install = get("tabula_install", True)
    if not isinstance(install, bool):
        raise TabulaError(f"tabula_install: must be true or false, got {install!r}")
    export_pools = get("tabula_export_pools", True)
    if not isinstance(export_pools, bool):
        raise TabulaError(f"tabula_export_pools: must be true or false, got {export_pools!r}")
    profile = load_profile(profile_name, variables)
    return Settings(profile=profile, confirm_wipe=tuple(confirm), install=install, export_pools=export_pools)
