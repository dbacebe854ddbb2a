"""
The rescue of a machine that no longer boots, from the live system: the pool imported (never
created), its keys loaded, every temp dataset (those with @empty) rolled back to @empty, as the
initrd's rollback does at boot. No other dataset is ever touched.
"""

from __future__ import annotations

import shlex

from pyinfra.api import QuoteString, StringCommand

from operations.profile import Pool
from operations.run import Made, Run, operation
from operations.target import INSTALL_ROOT, describe_leftovers, install_footprint, install_path
from operations.zfs.common import EMPTY_SNAPSHOT, ZfsError, search_dirs
from operations.zfs.facts import ZfsImportablePools, ZfsModuleLoaded, ZfsPoolDatasets, ZfsPoolState, ZfsTempState
from operations.zfs.view import load_keys_script, unmount_pool_script


@operation()
def present(run: Run, pool: Pool, devices: dict[str, str]):
    """
    Refuse a rescue (TabulaError) when the pool is neither imported nor found on its members'
    folder: a rescue imports a pool, it never creates one.

    + pool: the profile's Pool
    + devices: partlabel -> member device (``member_devices``)
    """
    if not run.read(ZfsModuleLoaded) and not run.executing:
        run.noop(f"pool {pool.name}: looked for once the zfs module is loaded")
        return
    dirs = search_dirs(devices)
    if run.read(ZfsPoolState, pool_name=pool.name, devices=tuple(devices.values())).get("state") == "imported":
        run.noop(f"pool {pool.name} is imported")
    elif pool.name in run.read(ZfsImportablePools, search_dirs=dirs):
        run.noop(f"pool {pool.name} is found on {', '.join(dirs)}, ready to import")
    else:
        raise ZfsError(f"refusing to rescue pool {pool.name}: it is neither imported nor found on "
                       f"{', '.join(dirs)} (zpool import -d {dirs[0]} lists none); a rescue never "
                       "creates a pool, the install deploy does; nothing was changed")
    yield from ()       # (a check only: it never runs a command)


@operation()
def keys_loaded(run: Run, pool_name: str, roots: tuple[str, ...]):
    """
    Load the key of each encryption root whose key is not loaded, from stdin (pass it with
    ``_stdin=``, never argv), so its datasets can be mounted.

    + pool_name: the pool
    + roots: the encryption roots, e.g. ``("rpool-2790ee34/remote",)``
    """
    datasets = run.read(ZfsPoolDatasets, pool_name=pool_name)
    if not datasets:
        if run.executing:
            raise ZfsError(f"pool {pool_name} is not imported: cannot load the keys of {', '.join(roots)}")
        yield StringCommand("sh", "-c", QuoteString(load_keys_script(roots)))   # (planned: read once imported)
        return
    unavailable = tuple(r for r in roots if datasets.get(r, {}).get("keystatus", ("",))[0] != "available")
    if not unavailable:
        run.noop(f"the key of {', '.join(roots)} is loaded")
        return
    yield StringCommand("sh", "-c", QuoteString(load_keys_script(unavailable)))


def rollback_command(pool_name: str, datasets: list[str]) -> StringCommand:
    """Every mount of the pool unmounted (the datasets rolled back, and what is mounted on or
    below them), then each dataset rolled back to @empty (-r: and later snapshots destroyed),
    after checking again that every @empty is there."""
    lines = ["set -e"]
    for name in datasets:
        snap = shlex.quote(f"{name}@{EMPTY_SNAPSHOT}")
        lines.append(f"zfs list -H -o name {snap} >/dev/null 2>&1 || {{ echo {shlex.quote(f'tabula: refusing to roll back {name}: its snapshot {name}@{EMPTY_SNAPSHOT} is missing; nothing was changed')} >&2; exit 1; }}")
    lines.append(unmount_pool_script(pool_name))
    for name in datasets:
        lines.append(f"echo {shlex.quote(f'rolling back {name} to @{EMPTY_SNAPSHOT}')}; "
                     f"zfs rollback -r {shlex.quote(f'{name}@{EMPTY_SNAPSHOT}')}")
    return StringCommand("sh", "-c", QuoteString("\n".join(lines) + "\n"))


@operation()
def rolled_back(run: Run, pool_name: str, temps: tuple[tuple[str, str | None], ...], mountpoints: tuple[str, ...] = ()):
    """
    Roll each temp dataset back to its ``@empty`` snapshot, unless nothing was written to it
    since (``written@empty`` is 0) or it holds nothing but the install's footprint (the mount
    points below it and etc/nixos). Refused when a dataset or its ``@empty`` is missing.

    + pool_name: the pool
    + temps: ``((dataset, mount point of the installed system or None), ...)``
    + mountpoints: every mount point of the installed system (for the footprint)

    **Example:**

    .. code:: python

        zfs.rolled_back(run, "rpool-2790ee34", (("rpool-2790ee34/temp/root", "/"), ("rpool-2790ee34/temp/tmp", "/tmp")),
                        mountpoints=("/", "/tmp", "/nix"))
    """
    names = [name for name, _ in temps]
    request = tuple((name, install_path(mp), *install_footprint(mp, list(mountpoints))) if mp else (name, "", [], None)
                    for name, mp in temps)
    state = run.read(ZfsTempState, pool_name=pool_name, temps=request)
    if not state.get("imported"):
        if run.executing:
            raise ZfsError(f"pool {pool_name} is not imported: cannot roll back {', '.join(names)}")
        run.tell(f"{', '.join(names)}: read once {pool_name} is imported; rolled back to "
                    f"@{EMPTY_SNAPSHOT} if written since (refused if a snapshot is missing)")
        run.record_created(*(Made.dataset(name) for name in names))
        yield rollback_command(pool_name, names)
        return
    dirty, clean = [], []
    for name in names:
        found = state["datasets"].get(name, {"state": "absent"})
        if found["state"] == "absent":
            raise ZfsError(f"refusing to roll back {name}: the dataset is missing in pool {pool_name}; nothing was changed")
        if found["state"] == "nosnapshot":
            raise ZfsError(f"refusing to roll back {name}: its snapshot {name}@{EMPTY_SNAPSHOT} is missing, so there "
                           "is no empty state to go back to; nothing was changed")
        if found["written"] == 0:
            clean.append(f"{name} has nothing written since @{EMPTY_SNAPSHOT}")
        elif found["mounted"] and not found["leftovers"]:
            clean.append(f"{name} holds nothing but the install's mount points"
                         + (" and etc/nixos" if found["mounted"] == INSTALL_ROOT else "") + f" since @{EMPTY_SNAPSHOT}")
        else:
            dirty.append(name)
            held = describe_leftovers(found["leftovers"]) if found["leftovers"] else (
                f"{found['written']} bytes written since @{EMPTY_SNAPSHOT}")
            run.tell(f"{name}: {held}: rolling it back to @{EMPTY_SNAPSHOT}")
    if not dirty:
        run.noop("; ".join(clean))
        return
    run.record_created(*(Made.dataset(name) for name in dirty))     # empty again, as made
    yield rollback_command(pool_name, dirty)
