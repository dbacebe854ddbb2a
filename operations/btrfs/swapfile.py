"""
A swapfile the btrfs way: an empty file made NOCOW (no compression, no copy-on-write) before it
gets any blocks, preallocated to its size, with a swap signature. ``swapfile_problems`` is the
rule the step and verify apply.
"""

from __future__ import annotations

from pyinfra.api import QuoteString, StringCommand

from operations.btrfs.facts import SwapfileState
from operations.errors import TabulaError
from operations.profile import Swapfile
from operations.run import Run, one_command, operation


def swapfile_problems(swapfile: Swapfile, state: dict) -> list[str]:
    """How a swapfile in place (``SwapfileState``) differs from the profile's: one line each."""
    problems = []
    if state["type"] != "regular file":
        problems.append(f"it is a {state['type']}")
    if state["size"] != swapfile.size_bytes:
        problems.append(f"it has {state['size']} bytes, not {swapfile.size} ({swapfile.size_bytes} bytes)")
    if not state["nocow"]:
        problems.append("it lacks the No_COW attribute (chattr +C)")
    if not state["swap"]:
        problems.append("it has no swap signature")
    return problems


def swapfile_commands(path: str, swapfile: Swapfile) -> list[StringCommand]:
    # The btrfs way: an empty file made NOCOW (no compression, no COW) before it gets any blocks.
    file = QuoteString(path)
    return [
        StringCommand("truncate", "-s", "0", file),
        StringCommand("chattr", "+C", file),
        StringCommand("fallocate", "-l", str(swapfile.size_bytes), file),
        StringCommand("chmod", "600", file),
        StringCommand("mkswap", file),
    ]


@operation()
def swapfile(run: Run, path: str, swapfile: Swapfile):
    """
    A swapfile on btrfs: NOCOW, preallocated to its size, with a swap signature. A wrong one is
    made again when it is not active; an active wrong one is drift.

    + run: the run (facts, what it made)
    + path: the swapfile under /mnt, e.g. /mnt/swap/swapfile
    + swapfile: the profile's Swapfile (size)

    **Example:**

    .. code:: python

        btrfs.swapfile(run, path="/mnt/swap/swapfile", swapfile=Swapfile(size="32GiB"))
    """
    # In an empty subvolume this run just made and mounted there is no file to read.
    state = None if run.is_fresh(path) else run.read(SwapfileState, path=path)
    want = swapfile.size_bytes
    if state is None:
        run.tell(f"swapfile {path} of {swapfile.size} ({want} bytes), NOCOW")
        run.record_fresh(path, False)
        yield one_command(*swapfile_commands(path, swapfile))
        return
    problems = swapfile_problems(swapfile, state)
    if not problems:
        run.noop(f"{path} is already a NOCOW swapfile of {swapfile.size} ({want} bytes)")
        return
    if state["active"] or state["type"] != "regular file":
        raise TabulaError(f"{path} is not the wanted swapfile (drift): {'; '.join(problems)}; "
                          + ("it is active swap: swapoff it first" if state["active"] else "remove it by hand"))
    run.tell(f"swapfile {path} made again ({'; '.join(problems)}): {swapfile.size} ({want} bytes), NOCOW")
    yield one_command(StringCommand("rm", "-f", QuoteString(path)), *swapfile_commands(path, swapfile))
