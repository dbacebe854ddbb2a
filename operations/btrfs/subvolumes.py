"""
The top level of a btrfs filesystem, kept mounted at a private path (/run/tabula/btrfs/<label>)
for the whole install, where its subvolumes are created and read; the subvolumes, and the blank
snapshot (the guide's ``@root-blank``) taken read-only right after its subvolume is created
empty, never re-taken: if it exists writable or not empty, that is drift and stops the run.
"""

from __future__ import annotations

import shlex

from pyinfra.api import QuoteString, StringCommand

from operations.btrfs.facts import BtrfsSubvolumes
from operations.btrfs.rollback import BlankProblem, blank_problems
from operations.errors import TabulaError
from operations.mounts import Mounts
from operations.profile import Subvolume
from operations.run import Made, Run, one_command, operation, script
from operations.target import CanonicalPath


@operation()
def top_level(run: Run, device: str, path: str, options: tuple[str, ...] = ()):
    """
    Keep the top level (subvolid=5) of a btrfs filesystem mounted at a private path, where its
    subvolumes are created and inspected.

    + run: the run (facts, what it made)
    + device: the filesystem's block device, e.g. /dev/mapper/cryptroot
    + path: where to mount it, e.g. /run/tabula/btrfs/nixos
    + options: filesystem-wide mount options (compress=..., discard=...): btrfs applies those of the
      first mount of a filesystem to all its later subvolume mounts, so the top level, mounted
      first, must carry the profile's

    **Example:**

    .. code:: python

        btrfs.top_level(run, device="/dev/mapper/cryptroot", path="/run/tabula/btrfs/nixos")
    """
    # A filesystem this run just made cannot be mounted yet: the mount command checks the path.
    new = run.created_this_run(Made.filesystem(device))
    current = None if new else run.read(Mounts).get(path)
    if current:
        want = run.read(CanonicalPath, path=device)
        have = run.read(CanonicalPath, path=current["device"])
        if current["fstype"] != "btrfs" or want != have or "subvolid=5" not in current["options"]:
            raise TabulaError(f"{path} is mounted from {current['device']} ({current['fstype']}, "
                              f"{','.join(current['options'])}), not the top level of {device}: unmount it")
        run.noop(f"the top level of {device} is already mounted at {path}")
        return
    # (not read, so checked: nothing may be mounted there already)
    free = script(f"if mountpoint -q {shlex.quote(path)}; then echo 'tabula: {path} is already mounted: unmount it' >&2; "
                  "exit 1; fi") if new else None
    run.tell(f"mount the top level of {device} at {path}" + (f" ({','.join(options)})" if options else ""))
    yield one_command(StringCommand("mkdir", "-p", QuoteString(path)), free,
                      StringCommand("mount", "-t", "btrfs", "-o", QuoteString(",".join(["subvolid=5", *options])),
                                    QuoteString(device), QuoteString(path)))


@operation()
def subvolumes(run: Run, top: str, wanted: list[Subvolume], device: str = ""):
    """
    Create the missing top-level subvolumes; right after creating a subvolume that has a
    ``blank_snapshot``, take that read-only snapshot of it while it is still empty.

    + run: the run (facts, what it made)
    + top: where the filesystem's top level is mounted
    + wanted: the profile's subvolumes
    + device: the filesystem's block device (a filesystem this run just made has no subvolumes to
      read; btrfs itself refuses to create one that exists)

    **Example:**

    .. code:: python

        btrfs.subvolumes(run, top="/run/tabula/btrfs/nixos", wanted=[Subvolume(path="@root", blank_snapshot="@root-blank")],
                         device="/dev/mapper/cryptroot")
    """
    existing = {} if device and run.created_this_run(Made.filesystem(device)) else run.read(BtrfsSubvolumes, path=top)
    commands, created, plans = [], [], []
    for sub in wanted:
        target = f"{top}/{sub.path}"
        blank = existing.get(sub.blank_snapshot) if sub.blank_snapshot else None
        if sub.path not in existing:
            if blank is not None:
                # what the boot-time rollback does: the subvolume again as a copy of its blank state
                _check_blank(sub, blank)
                commands.append(StringCommand("btrfs", "subvolume", "snapshot",
                                              QuoteString(f"{top}/{sub.blank_snapshot}"), QuoteString(target)))
                plans.append(f"{sub.path} as a copy of {sub.blank_snapshot}")
            else:
                commands.append(StringCommand("btrfs", "subvolume", "create", QuoteString(target)))
                plans.append(sub.path)
                if sub.blank_snapshot:
                    commands.append(_snapshot_command(top, sub))
                    plans.append(f"{sub.blank_snapshot} (read-only snapshot of the empty {sub.path})")
            if device:
                created.append(Made.subvolume(device, sub.path))     # empty: a new one, or a blank copy
            continue
        if sub.blank_snapshot:
            if blank is None:
                if not existing[sub.path]["empty"]:
                    raise TabulaError(f"{sub.path} exists with content but {sub.blank_snapshot} is missing (drift): "
                                      "a snapshot now would not be blank; restore or remove it by hand")
                commands.append(_snapshot_command(top, sub))
                plans.append(f"{sub.blank_snapshot} (read-only snapshot of the empty {sub.path})")
            else:
                _check_blank(sub, blank)
    if commands:
        # One round trip, in order: a blank snapshot right after its subvolume is created.
        run.tell(f"btrfs subvolumes on {device or top}: {', '.join(plans)}")
        run.record_created(*created)
        yield one_command(*commands)
    else:
        names = ", ".join(s.path for s in wanted)
        blanks = "; ".join(f"{s.blank_snapshot} is read-only and empty" for s in wanted if s.blank_snapshot)
        run.noop(f"{top} already has the subvolumes {names}" + (f"; {blanks}" if blanks else ""))


def _snapshot_command(top: str, sub: Subvolume) -> StringCommand:
    return StringCommand("btrfs", "subvolume", "snapshot", "-r", QuoteString(f"{top}/{sub.path}"),
                         QuoteString(f"{top}/{sub.blank_snapshot}"))


# What the subvolumes step says when it refuses a blank snapshot it finds (it takes a missing
# one itself, while its subvolume is empty).
DRIFT = {
    BlankProblem.WRITABLE: "{blank} exists but is writable (drift): the root would be rolled back to a state that "
                           "can change. Check it, then delete it and {sub} by hand, or set it read-only",
    BlankProblem.NOT_EMPTY: "{blank} exists but is not empty (drift): the root would be rolled back to that content "
                            "at every boot",
}


def _check_blank(sub: Subvolume, blank: dict) -> None:
    for problem in blank_problems(blank):
        raise TabulaError(DRIFT[problem].format(blank=sub.blank_snapshot, sub=sub.path))
