"""
The order of the stages. Each layer module owns its facts, operations, NixOS fragment and
checks; this file only says which runs when. Checks that refuse a run happen first, from facts
only. Imports read top-down: stages -> layers -> shared modules (tests/unit/test_layers.py).
"""

from __future__ import annotations

import dataclasses

from pyinfra import host, logger

from operations import btrfs, disks, filesystems, gaps, gpt, luks, mounts, nixeval, nixos, persist, zfs
from operations.errors import TabulaError
from operations.settings import Settings


def deploy(settings: Settings) -> None:
    profile = settings.profile
    disks.guard(profile, settings)          # refuse wrong/in-use/foreign disks, missing tools: facts only
    nixeval.precheck(profile, settings)     # the NixOS configuration evaluates, before any disk change
    gpt.apply(profile)                      # partition tables by partlabel, udev settled
    luks.apply(profile)                     # luksFormat (new only) + open
    filesystems.apply(profile)              # mkfs where no signature is present
    zfs.apply(profile, settings)            # pools imported/created (read-only when converged and exported), datasets, @empty, keys
    btrfs.apply(profile)                    # subvolumes, blank snapshot
    mounts.apply(profile)                   # everything under /mnt, parents first
    btrfs.apply_swapfiles(profile)          # swapfiles after their subvolume is mounted
    nixos.apply(profile, settings)          # nixos-generate-config, patched storage, flake + modules
    persist.apply(profile, settings)        # secrets, SSH host keys, machine-id, initrd SSH key
    if settings.install:
        nixos.install(profile, settings)    # nixos-install --flake, skipped when already installed
    persist.copy_configuration(profile)     # with the flake.lock the install wrote: pinned inputs
    if settings.export_pools:
        zfs.export(profile)                 # at the very end: unmounted and exported for first boot


def gaps_report(settings: Settings) -> None:
    """gaps.py: what the ephemeral root holds since the last boot that nothing keeps (read only)."""
    gaps.show(settings.profile, settings.root)


# --- rescue -------------------------------------------------------------------------------------


def rescue(settings: Settings) -> None:
    """From the live system, for a machine that no longer boots: its root put back to the state
    the boot-time rollback restores, everything mounted under /mnt as the install left it."""
    profile = settings.profile
    btrfs_roots = btrfs.rollback_targets(profile)
    zfs_temps = zfs.temp_datasets(profile)
    tmpfs_root = any(m.mountpoint == "/" and m.fstype == "tmpfs" for m in profile.all_mounts())
    if tmpfs_root:
        logger.warning(f"{host.print_prefix}profile {profile.name}: / is a tmpfs, empty at every boot: it needs no rescue")
    if not btrfs_roots and not zfs_temps:
        if tmpfs_root:
            return
        raise TabulaError(f"profile {profile.name}: no subvolume with a blank snapshot and no dataset with @empty: "
                          "nothing to rescue")
    # The same checks as the install's, facts only; never a wipe, whatever tabula_confirm_wipe says.
    disks.guard(profile, dataclasses.replace(settings, confirm_wipe=(), install=False))
    luks.rescue(profile)                    # open each container (passphrase on stdin), never luksFormat
    zfs.rescue(profile, settings)           # pools imported (never created), keys, temp datasets back to @empty
    btrfs.rescue(profile)                   # the top level mounted, @root restored from @root-blank
    mounts.apply(profile)                   # everything under /mnt, parents first, as the install does
    persist.restore_configuration(profile)  # /mnt/etc/nixos from the persisted copy
    if settings.export_pools:
        zfs.export(profile)                 # at the very end: unmounted and exported for the next boot
