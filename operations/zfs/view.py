"""
The read-only view of an exported pool. A run that ends with the pools exported
(``tabula_export_pools``, the default) reads an exported pool through it: ``zpool import -o
readonly=on``, keys loaded, the profile's mounts made read-only, so every later stage compares as
usual. Nothing is written to the pool (same uberblock, same ``zpool history``); when everything
matches, the view is closed and the pool exported again, and the run reports no change. The first
command of any stage that does have work to do is preceded by making the pool writable (export,
import, keys, mounts again).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyinfra.api import FactBase, QuoteString, StringCommand

from operations.mounts import Mounts, mount_command
from operations.profile import Mount, Pool
from operations.run import Made, Run
from operations.secrets import Secret
from operations.target import install_path
from operations.zfs.common import ZfsError


@dataclass(frozen=True)
class PoolView:
    """
    What reading an exported pool without changing it needs (``tabula_export_pools``: the run
    leaves the pool exported): the profile's mounts, in order, which the view mounts read-only
    where they are missing; the encryption roots whose keys it loads; the key (stdin only).
    """

    mounts: tuple[Mount, ...] = ()
    encryption_roots: tuple[str, ...] = ()
    key: Secret | None = None
    exported_at_end: bool = True      # False: the run keeps the pool imported, so no view is opened

    def stdin(self) -> dict:
        return {"_stdin": [self.key.reveal()]} if self.key and self.encryption_roots else {}


def load_keys_script(roots: tuple[str, ...], only_unavailable: bool = True, report: bool = False) -> str:
    """Shell lines loading each root's key from the first line of stdin (printf is the shell's
    own: the key is in no process's argv)."""
    if not roots:
        return ""
    lines = ['IFS= read -r key || key=""']
    for root in roots:
        r = shlex.quote(root)
        load = f'printf "%s\\n" "$key" | zfs load-key {r}'
        if report:
            load = f'{{ {load} >/dev/null 2>&1 && echo "view key {root}" || echo "view nokey {root}"; }}'
        if only_unavailable:
            load = f'[ "$(zfs get -H -o value keystatus {r})" = available ] || {load}'
        lines.append(load)
    return "\n".join(lines) + "\n"


def read_only_mount_command(mount: Mount) -> str | None:
    """How the view mounts one of the profile's mounts read-only (None: a tmpfs, nothing to read)."""

    target = shlex.quote(install_path(mount.mountpoint))
    options = [o for o in mount.options if o not in ("bind", "rw", "ro")]
    if mount.fstype == "tmpfs":
        return None
    if mount.fstype == "none" and "bind" in mount.options:
        source = shlex.quote(install_path(mount.device))
        remount = shlex.quote(",".join(["remount", "bind", "ro", *options]))
        return f"mount --bind {source} {target} && mount -o {remount} {target}"
    return f"mount -t {mount.fstype} -o {shlex.quote(','.join(['ro', *options]))} {shlex.quote(mount.device)} {target}"


class ZfsReadOnlyView(FactBase):
    """
    NOT a pure read: opens (or completes) a read-only view of an exported pool and says what it
    did. ``zpool import -N -o readonly=on`` writes nothing to the pool (its uberblock, txg and
    ``zpool history`` stay as they are); keys are loaded into kernel memory only; the missing
    mounts of the profile are mounted read-only, in order, up to the first that cannot be (a
    tmpfs has nothing to read). ``ZfsViewClosed`` puts everything back. Lines:
    ``writable`` (imported read-write: no view), ``failed`` (no import), ``imported``,
    ``key ROOT`` / ``nokey ROOT``, ``mounted TARGET``, ``stopped TARGET``, ``open``.

    + pool_name: the pool
    + search_dirs: where its members are, e.g. ``("/dev/disk/by-partlabel",)``
    + encryption_roots: datasets whose key is loaded, from the first line of stdin: read it inside an
      operation given ``_stdin=[key]`` (arguments given to the fact itself are printed with it)
    + mounts: ``[(target, read-only mount command or "")]`` in the profile's order

    .. code:: python

        # inside zfs.pool(..., _stdin=[key])
        host.get_fact(ZfsReadOnlyView, pool_name="rpool-2790ee34", search_dirs=("/dev/disk/by-partlabel",),
                      encryption_roots=("rpool-2790ee34/remote",), mounts=(("/mnt", "mount -t zfs -o ro ..."),))
    """

    default = list

    def command(self, pool_name: str, search_dirs: tuple[str, ...], encryption_roots: tuple[str, ...] = (),
                mounts: tuple[tuple[str, str], ...] = ()) -> StringCommand:
        p = shlex.quote(pool_name)
        dirs = " ".join(f"-d {shlex.quote(d)}" for d in search_dirs)
        script = (
            f"if zpool list -H -o name {p} >/dev/null 2>&1; then\n"
            f'  [ "$(zpool get -H -o value readonly {p})" = on ] || {{ echo "view writable"; exit 0; }}\n'
            f"else\n"
            f'  zpool import -N -o readonly=on -o cachefile=none {dirs} {p} >/dev/null 2>&1 || {{ echo "view failed"; exit 0; }}\n'
            f'  echo "view imported"\n'
            f"fi\n"
            + load_keys_script(encryption_roots, report=True)
            + "while :; do\n"
        )
        for target, command in mounts:
            t = shlex.quote(target)
            if not command:
                script += f'  mountpoint -q {t} || {{ echo "view stopped {target}"; break; }}\n'
            else:
                script += (f"  mountpoint -q {t} || {{ {command} >/dev/null 2>&1 || {{ echo \"view stopped {target}\"; "
                           f'break; }}; echo "view mounted {target}"; }}\n')
        script += '  break\ndone\necho "view open"\n'
        return StringCommand("sh", "-c", QuoteString(script))

    def process(self, output) -> list[str]:
        return [line.split(" ", 1)[1] for line in output if line.startswith("view ")]


def unmount_pool_script(pool_name: str) -> str:
    """Every mount of the pool unmounted (umount -R: and what is mounted below them, e.g. /mnt/boot
    on /mnt), shortest mount point first."""
    pool_q = shlex.quote(pool_name)
    return (f"awk -v p={pool_q} '$3 == \"zfs\" && ($1 == p || index($1, p \"/\") == 1) {{print $2}}' /proc/mounts"
            f" | awk '{{print length, $0}}' | sort -n | cut -d' ' -f2-"
            f" | while read -r target; do if mountpoint -q \"$target\"; then umount -R \"$target\" || exit 1; fi; done")


class ZfsViewClosed(FactBase):
    """
    NOT a pure read: closes the read-only view of a pool (``ZfsReadOnlyView``): unmounts it and
    exports it, leaving it as the view found it. A pool imported read-write is left alone.
    ``closed``, ``writable`` or ``failed``.

    + pool_name: the pool
    """

    default = str

    def command(self, pool_name: str) -> StringCommand:
        p = shlex.quote(pool_name)
        script = (f"zpool list -H -o name {p} >/dev/null 2>&1 || {{ echo closed; exit 0; }}\n"
                  f'[ "$(zpool get -H -o value readonly {p})" = on ] || {{ echo writable; exit 0; }}\n'
                  f"{{ {unmount_pool_script(pool_name)}; }} && zpool export {p} && echo closed || echo failed\n")
        return StringCommand("sh", "-c", QuoteString(script))

    def process(self, output) -> str:
        return next((line.strip() for line in output if line.strip()), "")


def make_view_writable(run: Run, pool_name: str, search_dirs: tuple[str, ...], view: PoolView) -> StringCommand:
    """
    The command that turns the read-only view into the real thing, ahead of a run's first change:
    the read-only mounts of the profile unmounted (deepest first), the pool exported and imported
    read-write, keys loaded, the same mounts mounted again as the profile says.
    """

    current = run.read(Mounts)
    viewed = [m for m in view.mounts if "ro" in current.get(install_path(m.mountpoint), {}).get("options", [])]
    p = shlex.quote(pool_name)
    dirs = " ".join(f"-d {shlex.quote(d)}" for d in search_dirs)
    lines = ["set -e"]
    lines += [f"umount {shlex.quote(install_path(m.mountpoint))}" for m in reversed(viewed)]
    lines += [f"zpool export {p}", f"zpool import -N -o cachefile=none {dirs} {p}"]
    script = "\n".join(lines) + "\n" + load_keys_script(view.encryption_roots, only_unavailable=False)
    for m in viewed:
        script += " && ".join(c.get_raw_value() for c in mount_command(m, install_path(m.mountpoint))) + "\n"
    run.record_created(Made.writable_pool(pool_name))
    return StringCommand("sh", "-c", QuoteString(script), **view.stdin())


def open_view(run: Run, pool: Pool, search_dirs: tuple[str, ...], view: PoolView) -> str:
    """Open the read-only view (a fact: nothing written); what it holds, or "" when it failed."""

    mounts = tuple((install_path(m.mountpoint), read_only_mount_command(m) or "") for m in view.mounts)
    # The key reaches the fact on stdin through the pool operation's own _stdin (a fact inherits
    # its operation's arguments): given here, pyinfra would print it with the fact's arguments.
    said = run.host.get_fact(ZfsReadOnlyView, pool_name=pool.name, search_dirs=search_dirs,
                         encryption_roots=view.encryption_roots, mounts=mounts)
    run.forget()     # the view changed what is mounted and imported
    if "open" not in said:
        return ""
    mounted = [s.split(" ", 1)[1] for s in said if s.startswith("mounted ")]
    keys = [s.split(" ", 1)[1] for s in said if s.startswith("key ")]
    return ", ".join(filter(None, [f"keys of {', '.join(keys)} loaded" if keys else "",
                                   f"{', '.join(mounted)} mounted read-only" if mounted else "read-only"]))


def close_view(run: Run, pool_name: str) -> None:
    """Close a read-only view nothing wrote through (``ZfsViewClosed``): the pool left exported
    as the run found it; ZfsError when it cannot be closed."""
    run.cancel_before_first_change(f"pool {pool_name}")
    closed = run.host.get_fact(ZfsViewClosed, pool_name=pool_name)
    run.forget()
    if closed != "closed":
        raise ZfsError(f"pool {pool_name}: its read-only view could not be closed ({closed}); see what holds "
                       f"its mounts (fuser -vm /mnt), then zpool export {pool_name}")
