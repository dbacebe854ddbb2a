"""
What a run is asked to do, from pyinfra host data (group_data/, inventory.py, ``--data``):

    tabula_profile       profile name (profiles/<name>.yaml) or path           e.g. "zephyrus-btrfs"
    tabula_vars          values for the profile's vars                          e.g. {"disk": "/dev/disk/by-id/nvme-..."}
    tabula_confirm_wipe  stable ids (by-id path or serial) of disks the user confirms may be wiped
    tabula_install       run nixos-install at the end (default True)
    tabula_export_pools  export the ZFS pools at the end, ready for the first boot (default True;
                         false keeps them imported and mounted under /mnt for inspection)
    tabula_nix_check     evaluate the NixOS configuration before any disk is touched: "auto"
                         (default: on the controller when tabula_nix_inputs is given, else on
                         the target when it has nix, else skipped and said so), "target",
                         "controller", or false (offline installs)
    tabula_nix_inputs    flake input name -> folder on the controller to evaluate with
                         (``--override-input``), e.g. {"nixpkgs": "/srv/nixpkgs", ...}
    tabula_root          where the installed system is, for the day-two tools (gaps.py): "auto"
                         (default: /mnt when something is mounted there, else /), "/" or "/mnt"

Everything is validated here, before any command runs; errors name the data key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from operations.errors import TabulaError
from operations.profile import Profile, load_profile


@dataclass(frozen=True)
class Settings:
    profile: Profile
    confirm_wipe: tuple[str, ...] = ()
    install: bool = True
    export_pools: bool = True
    nix_check: str | bool = "auto"
    nix_inputs: dict[str, str] = field(default_factory=dict)
    root: str = "auto"
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
    nix_check = get("tabula_nix_check", "auto")
    if nix_check is True:
        nix_check = "auto"
    if nix_check not in ("auto", "target", "controller", False):
        raise TabulaError(f"tabula_nix_check: must be \"auto\", \"target\", \"controller\" or false, got {nix_check!r}")
    nix_inputs = get("tabula_nix_inputs", {})
    if not isinstance(nix_inputs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in nix_inputs.items()):
        raise TabulaError("tabula_nix_inputs: must be a mapping of flake input names to folders on the controller")
    for input_name, folder in nix_inputs.items():
        if not Path(folder).is_dir():
            raise TabulaError(f"tabula_nix_inputs[{input_name!r}]: {folder} is not a folder on this controller")
    root = get("tabula_root", "auto")
    if root not in ("auto", "/", "/mnt"):
        raise TabulaError(f"tabula_root: must be \"auto\", \"/\" or \"/mnt\", got {root!r}")
    profile = load_profile(profile_name, variables)
    return Settings(profile=profile, confirm_wipe=tuple(confirm), install=install, export_pools=export_pools,
                    nix_check=nix_check, nix_inputs=dict(nix_inputs), root=root)
