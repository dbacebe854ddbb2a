"""
The order of the stages. Each layer (``operations.layers.LAYERS``, in stage order) owns its
facts, operations, NixOS fragment and checks, and takes part in the steps it needs; this file
only says which step runs when, on a ``Run`` it builds for the host (settings, secrets read
once, the facts and what the run made). Checks that refuse a run happen first, from facts only.
Imports read top-down: stages -> layers -> shared modules (tests/unit/test_layers.py).
"""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.context import ctx_host

from operations import adopt as adoption
from operations import disks, gaps, nixeval
from operations.errors import TabulaError
from operations.layers import LAYERS
from operations.run import Run
from operations.secrets import read_secrets
from operations.settings import Settings

# The steps of an install, in order; each layer takes part in those it needs (operations.contract):
#   make     partition tables, LUKS (format + open), filesystems, ZFS pools and datasets, btrfs subvolumes
#   mount    everything under /mnt, parents first
#   fill     swapfiles, the NixOS configuration, the persisted secrets, host keys and machine-id
#   install  nixos-install (tabula_install), then the configuration's copy with the flake.lock it wrote
#   close    ZFS pools exported, ready for the first boot (tabula_export_pools)
STEPS = ("make", "mount", "fill", "install", "close")


def this_host():
    """The host pyinfra runs the deploy file for (the Host itself, not the context's proxy, which
    follows whichever host pyinfra works on: a run belongs to one host)."""
    return ctx_host.get() if ctx_host.isset() else host


def deploy(settings: Settings) -> Run:
    run = Run(this_host(), settings, LAYERS)
    disks.guard(run)                        # refuse wrong/in-use/foreign disks, missing tools: facts only
    nixeval.precheck(run)                   # the NixOS configuration evaluates, before any disk change
    run.secrets = read_secrets(secrets_needed(run, rescue=False))   # once, before the first step using one
    for step in STEPS:
        for layer in run.layers:
            getattr(layer, step)(run)
    return run


def secrets_needed(run: Run, rescue: bool) -> dict[str, bool]:
    """{secret name: required} of the layers, in stage order."""
    return {name: required for layer in run.layers for name, required in layer.secrets(run.settings, rescue).items()}


def gaps_report(settings: Settings) -> Run:
    """gaps.py: what the ephemeral root holds since the last boot that nothing keeps (read only)."""
    run = Run(this_host(), settings, LAYERS)
    gaps.show(run)
    return run


def adopt(settings) -> Run:
    """adopt.py: a profile read from the target's disks, each layer describing its own nodes
    (read only; ``settings``: ``operations.adopt.AdoptSettings``)."""
    run = Run(this_host(), None, LAYERS)
    adoption.adopt(run, settings)
    return run


def rescue(settings: Settings) -> Run | None:
    """From the live system, for a machine that no longer boots: its root put back to the state
    the boot-time rollback restores, everything mounted under /mnt as the install left it."""
    run = Run(this_host(), settings, LAYERS)
    profile = settings.profile
    blank = any(sub.blank_snapshot for _, fs in profile.filesystems() for sub in fs.subvolumes)
    empty = any(ds.empty_snapshot for pool in profile.pools.values() for ds in pool.datasets)
    tmpfs_root = any(m.mountpoint == "/" and m.fstype == "tmpfs" for m in profile.all_mounts())
    if tmpfs_root:
        logger.warning(f"{run.prefix}profile {profile.name}: / is a tmpfs, empty at every boot: it needs no rescue")
    if not blank and not empty:
        if tmpfs_root:
            return None
        raise TabulaError(f"profile {profile.name}: no subvolume with a blank snapshot and no dataset with @empty: "
                          "nothing to rescue")
    # The same checks as the install's, facts only; never a wipe, whatever tabula_confirm_wipe says.
    disks.guard(run, rescue=True)
    run.secrets = read_secrets(secrets_needed(run, rescue=True))
    for layer in run.layers:
        layer.rescue(run)                   # containers opened, pools imported, the root restored, mounted, /etc/nixos back
    for layer in run.layers:
        layer.close(run)                    # at the very end: pools exported for the next boot
    return run
