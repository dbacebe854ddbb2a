"""
The rescue of a machine that no longer boots, from the live system: the subvolume with a blank
snapshot (@root) put back to a copy of that snapshot (@root-blank), its nested subvolumes
deleted first, as the initrd's rollback does at boot. Nothing but that subvolume is ever touched.
"""

from __future__ import annotations

from operations.btrfs.facts import BtrfsRootLeftovers, BtrfsSubvolumes
from operations.btrfs.rollback import BlankProblem, blank_problems, restore_command
from operations.errors import TabulaError
from operations.mounts import Mounts, subvolume_option
from operations.profile import Subvolume
from operations.run import Made, Run, operation
from operations.target import describe_leftovers, install_footprint, install_path

# What the rescue adds when it refuses a blank snapshot ("its blank snapshot X is <problem>").
REFUSED = {
    BlankProblem.MISSING: ", so there is no empty state to restore; nothing was changed",
    BlankProblem.WRITABLE: ", so it may not be blank any more; nothing was changed. Check it (ls -A {top}/{blank}), "
                           "then set it read-only: btrfs property set -ts {top}/{blank} ro true",
    BlankProblem.NOT_EMPTY: "; nothing was changed",
}


@operation()
def restored(run: Run, top: str, subvolume: Subvolume, device: str, mountpoints: tuple[str, ...] = ()):
    """
    Put a subvolume with a blank snapshot back to a copy of it: nested subvolumes deleted, the
    subvolume deleted and snapshotted again from the read-only blank (the initrd's rollback).
    Refused when the blank snapshot is missing, writable or not empty. Nothing to do when the
    subvolume holds no nested subvolume and nothing but the install's footprint (its mount
    points and etc/nixos).

    + run: the run (facts, what it made)
    + top: where the filesystem's top level is mounted (``top_level``)
    + subvolume: the profile's Subvolume (with ``blank_snapshot``)
    + device: the filesystem's block device
    + mountpoints: every mount point of the installed system (for the footprint)

    **Example:**

    .. code:: python

        btrfs.restored(run, top="/run/tabula/btrfs/nixos", subvolume=Subvolume(path="@root", mountpoint="/",
                       blank_snapshot="@root-blank"), device="/dev/mapper/cryptroot", mountpoints=("/", "/nix"))
    """
    sub, blank_name = subvolume.path, subvolume.blank_snapshot
    mounts = run.read(Mounts)
    if top not in mounts:
        if run.executing:
            raise TabulaError(f"the top level of {device} is not mounted at {top}: cannot restore {sub}")
        # Planning with the container still closed: nothing to read yet; the command checks again.
        run.tell(f"{sub} on {device}: read once {device} is open; if it holds more than "
                    f"the install left, its nested subvolumes and {sub} are deleted and {sub} restored from "
                    f"{blank_name} (refused if {blank_name} is missing, writable or not empty)")
        run.record_created(Made.subvolume(device, sub))
        yield restore_command(top, sub, blank_name)
        return
    folders, config = install_footprint(subvolume.mountpoint or "/", list(mountpoints))
    path = f"{top}/{sub}"
    existing, leftovers = run.read_many([(BtrfsSubvolumes, {"path": top}),
                                     (BtrfsRootLeftovers, {"path": path, "folders": folders, "config": config})])
    for problem in blank_problems(existing.get(blank_name)):
        raise TabulaError(f"refusing to restore {sub} on {device}: its blank snapshot {blank_name} is {problem.said}"
                          + REFUSED[problem].format(top=top, blank=blank_name))
    nested = sorted(p for p in existing if p.startswith(f"{sub}/"))
    current = existing.get(sub)
    if current is not None and not current["ro"] and not nested and leftovers == []:
        run.noop(f"{sub} holds no nested subvolume and nothing but the install's mount points"
                  + (f" and {config}" if config else "") + f": as restored from {blank_name}")
        return
    found = []
    if current is None:
        found.append(f"{sub} is missing")
    elif current["ro"]:
        found.append(f"{sub} is read-only")
    if nested:
        found.append(f"nested subvolumes {', '.join(nested)}")
    if leftovers:
        found.append(f"{sub} holds {describe_leftovers(leftovers)}")
    run.tell(f"{sub} on {device}: {'; '.join(found)}: restoring it from {blank_name}")
    # Where the old subvolume is mounted (the install tree under /mnt) goes first.
    target = install_path(subvolume.mountpoint) if subvolume.mountpoint else None
    mounted = mounts.get(target) if target else None
    unmount = (target,) if mounted and mounted["fstype"] == "btrfs" and subvolume_option(mounted["options"]) == sub else ()
    run.record_created(Made.subvolume(device, sub))     # a copy of the blank: empty
    yield restore_command(top, sub, blank_name, unmount)
