"""The per-profile test data of ``tests/profile_cases.yaml``, for the tests that run over every
profile: a new profile is picked up from data (its YAML and its entry there), with no Python."""
from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Callable

import yaml

from operations.profile import load_profile

CASES_FILE = Path(__file__).with_name("profile_cases.yaml")
# hardware_modules absent: one Nix case with the module the profile itself chooses
PROFILE_DEFAULT = "profile's own"


@cache
def _data() -> dict:
    return yaml.safe_load(CASES_FILE.read_text())


def shared_test_key() -> str:
    """The test-only SSH public key (test_authorized_key)."""
    return _data()["test_authorized_key"]


def profile_names() -> list[str]:
    """Every profile that has test data, sorted."""
    return sorted(_data()["profiles"])


def _entry(profile: str) -> dict:
    try:
        return _data()["profiles"][profile]
    except KeyError:
        raise KeyError(f"profile {profile!r} has no test data in {CASES_FILE}") from None


def render_vars(profile: str) -> dict:
    """tabula_vars to render and evaluate the profile without disks."""
    return dict(_entry(profile)["vars"])


def verified_layers(profile: str) -> list[str]:
    """The layers the verification checks on the profile, in order (written by hand)."""
    return list(_entry(profile)["verified_layers"])


def proofs(profile: str) -> dict[str, str]:
    """{"gap_report": test node id, "drift": test node id} of the profile (written by hand)."""
    return dict(_entry(profile).get("proofs") or {})


def rollback_services(profile: str) -> set[str]:
    """The initrd services that empty the profile's root at boot (written by hand)."""
    return set(_entry(profile)["rollback_services"])


def hardware_modules(profile: str) -> list:
    """The nixos-hardware modules the profile's Nix cases use: names, None (no module), or
    PROFILE_DEFAULT (the profile's own choice)."""
    return list(_entry(profile).get("hardware_modules", [PROFILE_DEFAULT]))


def nix_cases() -> list[tuple[str, str | None]]:
    """(profile, nixos-hardware module) for every Nix evaluation case."""
    return [(name, module) for name in profile_names() for module in hardware_modules(name)]


def vm_vars(profile: str, stable_path: Callable[[str], str], snapshot: bool = False) -> dict:
    """tabula_vars for the live VM; ``stable_path(serial)`` gives a VM disk's by-id path.
    ``snapshot``: the disks of the profile's installed state (``snapshot_disks``, else ``disks``)."""
    vm = _entry(profile)["vm"]
    disks = vm.get("snapshot_disks", vm["disks"]) if snapshot else vm["disks"]
    return {**{var: stable_path(serial) for var, serial in disks.items()}, **vm.get("vars", {})}


def vm_disks(profile: str) -> dict[str, str]:
    """The profile's disk keys (as in its ``disks:``) -> the serial of the VM disk each one is."""
    variables = vm_vars(profile, lambda serial: f"/dev/disk/by-id/virtio-{serial}")
    by_path = {f"/dev/disk/by-id/virtio-{serial}": serial for serial in vm_serials(profile)}
    return {key: by_path[disk.device] for key, disk in load_profile(profile, variables).disks.items()}


def foreign_disk(profile: str) -> str:
    """Serial of the VM disk the dry-plan test puts foreign data on (one of the profile's)."""
    return _entry(profile)["vm"]["foreign_disk"]


def vm_serials(profile: str) -> list[str]:
    return list(_entry(profile)["vm"]["disks"].values())


def dry_plan(profile: str) -> dict:
    """The hand-written dry plan from blank disks: {"steps": [...], "tells": [...]}."""
    return dict(_entry(profile)["vm"]["plan"])
