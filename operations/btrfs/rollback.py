"""
The blank snapshot and the rollback to it, each rule once.

``blank_problems``: when a blank snapshot (the guide's ``@root-blank``) is fit to restore from:
there, read-only, empty. The subvolumes step refuses drift with it, the rescue refuses to restore
with it (and the same checks, rendered by ``blank_checks``, run again inside the rescue's
command before anything is deleted), and verify reports it.

``restore_lines``: the shell that puts a subvolume back to a copy of its blank snapshot, its
nested subvolumes deleted deepest first (a subvolume that holds one cannot be deleted): rendered
into the initrd's rollback service (``rollback_script``) and into the rescue's command
(``restore_command``).
"""

from __future__ import annotations

import shlex
from enum import Enum

from pyinfra.api import QuoteString, StringCommand

# Where the initrd mounts the top level to restore the root.
ROLLBACK_MOUNTDIR = "/run/tabula-rollback"


class BlankProblem(Enum):
    """Why a blank snapshot cannot be restored from: (what is said, the shell test that holds when
    it is fine, on ``$top/$blank``)."""

    MISSING = ("missing", '[ -d "$top/$blank" ]')
    WRITABLE = ("writable", '[ "$(btrfs property get -ts "$top/$blank" ro)" = ro=true ]')
    NOT_EMPTY = ("not empty", '[ -z "$(ls -A "$top/$blank")" ]')

    @property
    def said(self) -> str:
        return self.value[0]

    @property
    def shell_test(self) -> str:
        return self.value[1]


def blank_problems(blank: dict | None) -> list[BlankProblem]:
    """What is wrong with a blank snapshot as ``BtrfsSubvolumes`` shows it (None: absent)."""
    if blank is None:
        return [BlankProblem.MISSING]
    return [problem for problem, wrong in ((BlankProblem.WRITABLE, not blank["ro"]),
                                           (BlankProblem.NOT_EMPTY, not blank["empty"])) if wrong]


def blank_checks(refuse: str = "refuse") -> str:
    """The shell copy of ``blank_problems``, in order: each check calls ``refuse MESSAGE``
    (a shell function the script defines) with "its blank snapshot $blank is <what>"."""
    return "".join(f'{problem.shell_test} || {refuse} "its blank snapshot $blank is {problem.said}"\n'
                   for problem in BlankProblem)


def restore_lines() -> str:
    """Shell (POSIX sh and bash) restoring ``$sub`` below the top level ``$top`` from ``$blank``:
    the subvolumes nested in it deleted deepest first (by depth, not by creation order: a
    subvolume moved into a newer one is deeper but older), stopping at the first that fails;
    the subvolume deleted; a writable snapshot of the blank taken in its place."""
    return (
        "# nested subvolumes first, deepest first\n"
        'btrfs subvolume list "$top" | while IFS= read -r line; do\n'
        "  p=${line#* path }\n"
        '  case "$p" in "$sub"/*) printf \'%s\\t%s\\n\' "$(printf %s "$p" | tr -cd / | wc -c)" "$p" ;; esac\n'
        "done | sort -rn | cut -f2- | while IFS= read -r p; do\n"
        '  echo "deleting nested subvolume $p"\n'
        '  btrfs subvolume delete "$top/$p" >/dev/null || exit 1\n'
        "done\n"
        'if [ -e "$top/$sub" ]; then\n'
        '  echo "deleting $sub"\n'
        '  btrfs subvolume delete "$top/$sub" >/dev/null\n'
        "fi\n"
        'echo "restoring $sub from $blank"\n'
        'btrfs subvolume snapshot "$top/$blank" "$top/$sub" >/dev/null\n'
    )


def _names(top: str, subvolume: str, blank: str) -> str:
    return f"top={shlex.quote(top)}; sub={shlex.quote(subvolume)}; blank={shlex.quote(blank)}\n"


def rollback_script(device: str, subvolume: str, blank: str, mountdir: str = ROLLBACK_MOUNTDIR) -> str:
    """The script the initrd runs (bash -e) to put ``subvolume`` back to ``blank`` at every boot;
    the e2e test runs it too. Without the blank snapshot nothing is deleted: a root that cannot
    be restored is better left as it is."""
    return (
        _names(mountdir, subvolume, blank)
        + 'mkdir -p "$top"\n'
        + f'mount -t btrfs -o subvol=/ {shlex.quote(device)} "$top"\n'
        + 'if [ -d "$top/$blank" ]; then\n'
        + "".join(f"  {line}\n" for line in restore_lines().splitlines())
        + "else\n"
        + '  echo "$blank is missing: $sub is left as it is" >&2\n'
        + "fi\n"
        + 'umount "$top"\n'
    )


def restore_command(top: str, subvolume: str, blank: str, unmount: tuple[str, ...] = ()) -> StringCommand:
    """The rescue's shell that puts ``subvolume`` back to a writable copy of ``blank``. It checks
    again, before deleting anything, that the blank snapshot is fit (``blank_checks``); unmounts
    ``unmount`` (where the old subvolume is mounted, and what is mounted below); then restores
    as the initrd does (``restore_lines``)."""
    script = (
        "set -e; " + _names(top, subvolume, blank)
        + 'refuse() { echo "tabula: refusing to restore $sub: $1; nothing was changed" >&2; exit 1; }\n'
        + blank_checks()
        + "".join(f'if mountpoint -q {shlex.quote(t)}; then echo "unmounting {t}"; umount -R {shlex.quote(t)}; fi\n'
                  for t in unmount)
        + restore_lines()
    )
    return StringCommand("sh", "-c", QuoteString(script))
