"""
The order of the stages. Each layer module owns its facts, operations, NixOS fragment and
checks; this file only says which runs when, on a ``Run`` it builds for the host (settings,
secrets read once, the facts and what the run made). Checks that refuse a run happen first, from
facts only. Imports read top-down: stages -> layers -> shared modules (tests/unit/test_layers.py).
"""

from __future__ import annotations

from pyinfra import host, logger

from operations import btrfs, disks, filesystems, gaps, gpt, luks, mounts, nixeval, nixos, persist, zfs
from operations.errors import TabulaError
from operations.run import Run
from operations.secrets import read_secrets
from operations.settings import Settings


def deploy(settings: Settings) -> Run:
    run = Run(host, settings)
    disks.guard(run)                        # refuse wrong/in-use/foreign disks, missing tools: facts only
    nixeval.precheck(run)                   # the NixOS configuration evaluates, before any disk change
    run.secrets = read_secrets(secrets_needed(run, rescue=False))   # once, before the first step using one
    gpt.apply(run)                          # partition tables by partlabel, udev settled
    luks.apply(run)                         # luksFormat (new only) + open
    filesystems.apply(run)                  # mkfs where no signature is present
    zfs.apply(run)                          # pools imported/created (read-only when converged and exported), datasets, @empty, keys
    btrfs.apply(run)                        # subvolumes, blank snapshot
    mounts.apply(run)                       # everything under /mnt, parents first
    btrfs.apply_swapfiles(run)              # swapfiles after their subvolume is mounted
    nixos.apply(run)                        # nixos-generate-config, patched storage, flake + modules
    persist.apply(run)                      # secrets, SSH host keys, machine-id, initrd SSH key
    if settings.tabula_install:
        nixos.install(run)                  # nixos-install --flake, skipped when already installed
    persist.copy_configuration(run)         # with the flake.lock the install wrote: pinned inputs
    if settings.tabula_export_pools:
        zfs.export(run)                     # at the very end: unmounted and exported for first boot
    return run


def secrets_needed(run: Run, rescue: bool) -> dict[str, bool]:
    """{secret name: required} of the layers this run goes through, in stage order."""
    profile = run.profile
    wanted = {}
    if profile.luks_devices():
        wanted[luks.PASSPHRASE] = True
    if any(ds.encryption for pool in profile.pools.values() for ds in pool.datasets):
        wanted[zfs.KEY] = True
    if not rescue:
        wanted.update({name: run.settings.tabula_install for name in persist.PASSWORD_SECRETS})
    return wanted


def gaps_report(settings: Settings) -> Run:
    """gaps.py: what the ephemeral root holds since the last boot that nothing keeps (read only)."""
    run = Run(host, settings)
    gaps.show(run)
    return run


# --- rescue -------------------------------------------------------------------------------------


def rescue(settings: Settings) -> Run | None:
    """From the live system, for a machine that no longer boots: its root put back to the state
    the boot-time rollback restores, everything mounted under /mnt as the install left it."""
    run = Run(host, settings)
    profile = settings.profile
    btrfs_roots = btrfs.rollback_targets(profile)
    zfs_temps = zfs.temp_datasets(profile)
    tmpfs_root = any(m.mountpoint == "/" and m.fstype == "tmpfs" for m in profile.all_mounts())
    if tmpfs_root:
        logger.warning(f"{run.prefix}profile {profile.name}: / is a tmpfs, empty at every boot: it needs no rescue")
    if not btrfs_roots and not zfs_temps:
        if tmpfs_root:
            return None
        raise TabulaError(f"profile {profile.name}: no subvolume with a blank snapshot and no dataset with @empty: "
                          "nothing to rescue")
    # The same checks as the install's, facts only; never a wipe, whatever tabula_confirm_wipe says.
    disks.guard(run, rescue=True)
    run.secrets = read_secrets(secrets_needed(run, rescue=True))
    luks.rescue(run)                        # open each container (passphrase on stdin), never luksFormat
    zfs.rescue(run)                         # pools imported (never created), keys, temp datasets back to @empty
    btrfs.rescue(run)                       # the top level mounted, @root restored from @root-blank
    mounts.apply(run)                       # everything under /mnt, parents first, as the install does
    persist.restore_configuration(run)      # /mnt/etc/nixos from the persisted copy
    if settings.tabula_export_pools:
        zfs.export(run)                     # at the very end: unmounted and exported for the next boot
    return run
