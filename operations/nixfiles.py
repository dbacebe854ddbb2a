"""
The NixOS files of a profile with every layer's fragment (the registry's), for review and
evaluation without a run: ``tools/render.py``, the evaluation before the install's first step
is given its run's layers instead. The nixos layer assembles them (``nixos.render_files``).

    from operations.nixfiles import render_files
    files = render_files(profile, None, None, placeholder=True)     # name -> text
"""

from __future__ import annotations

from operations import nixos
from operations.layers import LAYERS
from operations.nixlit import DeviceIds
from operations.nixos import HARDWARE_SKELETON, choose_hardware_module, id_devices
from operations.profile import Profile

__all__ = ["HARDWARE_SKELETON", "choose_hardware_module", "id_devices", "render_files", "render_storage"]


def render_files(profile: Profile, generated_hardware: str | None, ids: dict | None,
                 hardware_module: str | None = None, placeholder: bool = False,
                 facts: dict | None = None) -> dict[str, str]:
    """Every file of /etc/nixos: name -> text (``nixos.render_files`` with every layer's fragment).

    + generated_hardware: nixos-generate-config's hardware-configuration.nix (None: a skeleton)
    + ids: BlockDeviceIds of the profile's partitions (UUIDs)
    + hardware_module: nixos-hardware module for the flake (see choose_hardware_module)
    + placeholder: partitions without ids keep by-partlabel paths (review without disks)
    + facts: what the layers' ``nix_reads`` read (a swapfile's resume offset), by key
    """
    return nixos.rendered_with(LAYERS, profile, generated_hardware, ids, hardware_module, placeholder, facts)


def render_storage(profile: Profile, ids: dict | None, placeholder: bool = False) -> str:
    """The layers' hardware-configuration.nix bindings (the storage), in stage order."""
    parts = nixos.fragments(LAYERS, profile, DeviceIds(ids, placeholder))
    return "\n\n".join(f.hardware.rstrip("\n") for f in parts if f.hardware) + "\n"
