"""
Pools with their exact topology: the zfs module loaded, a pool imported (or created) as the
profile lays it out, refused when it is imported with another layout; exported at the end.
``topology_differences`` is the rule the step and verify apply.
"""

from __future__ import annotations

import shlex

from pyinfra.api import QuoteString, StringCommand

from operations.profile import Pool
from operations.run import Made, Run, operation
from operations.zfs.common import ZfsError, search_dirs
from operations.zfs.facts import ZfsImportablePools, ZfsModuleLoaded, ZfsPoolState
from operations.zfs.view import PoolView, close_view, make_view_writable, open_view, unmount_pool_script


@operation()
def kernel_module(run: Run):
    """
    Load the zfs kernel module (the live system ships it via DKMS; it is not loaded at boot).

    **Example:**

    .. code:: python

        zfs.kernel_module(run, name="ZFS kernel module")
    """
    if run.read(ZfsModuleLoaded):
        run.noop("the zfs kernel module is already loaded")
        return
    run.tell("load the zfs kernel module")
    yield "modprobe zfs"


def _expected_topology(pool: Pool, devices: dict[str, str], resolved: dict[str, str]) -> dict:
    """The profile's pool as real device paths (what ``zpool status -PL`` shows)."""
    real = {label: resolved.get(path) or path for label, path in devices.items()}
    return {
        "vdevs": [(vdev.mode, [real[m] for m in vdev.members]) if vdev.mode != "stripe" else None
                  for vdev in pool.vdevs],
        "stripes": [real[m] for vdev in pool.vdevs if vdev.mode == "stripe" for m in vdev.members],
        "log": [real[m] for m in pool.log],
        "cache": [real[m] for m in pool.cache],
    }


def topology_differences(pool: Pool, devices: dict[str, str], state: dict) -> list[str]:
    """How the imported pool differs from the profile, one line each (empty: identical)."""
    expected = _expected_topology(pool, devices, state.get("devices", {}))
    found = state.get("topology", {})
    found_groups = [(mode, sorted(members)) for mode, members in found.get("vdevs", []) if mode != "stripe"]
    found_stripes = sorted(m for mode, members in found.get("vdevs", []) if mode == "stripe" for m in members)
    want_groups = [(mode, sorted(members)) for mode, members in filter(None, expected["vdevs"])]
    problems = []
    if sorted(found_groups) != sorted(want_groups):
        problems.append(f"data vdevs {found_groups} (profile: {want_groups})")
    if found_stripes != sorted(expected["stripes"]):
        problems.append(f"single-device vdevs {found_stripes} (profile: {sorted(expected['stripes'])})")
    for section in ("log", "cache"):
        have = sorted(m if isinstance(m, str) else f"{m[0]}:{sorted(m[1])}" for m in found.get(section, []))
        if have != sorted(expected[section]):
            problems.append(f"{section} {have} (profile: {sorted(expected[section])})")
    return problems


def describe_topology(pool: Pool) -> str:
    """The pool's layout by partlabel, as the plan tells it: "raidz1 of a, b, c; log d; cache e"."""
    parts = [f"{vdev.mode} of {', '.join(vdev.members)}" for vdev in pool.vdevs]
    parts += [f"{kind} {', '.join(members)}" for kind, members in (("log", pool.log), ("cache", pool.cache)) if members]
    return "; ".join(parts)


def pool_options(pool: Pool) -> dict[str, str]:
    """The options a pool is created with: the profile's, and no cache file (the live system's
    would make it re-import the pool at its next boot) unless the profile sets one."""
    return {**pool.options, **({} if "cachefile" in pool.options else {"cachefile": "none"})}


def create_pool_command(pool: Pool, devices: dict[str, str]) -> StringCommand:
    """``zpool create`` with the profile's options, root properties and exact topology."""
    bits: list = ["zpool", "create"]
    for key, value in pool.options.items():
        bits += ["-o", QuoteString(f"{key}={value}")]
    if "cachefile" not in pool.options:
        bits += ["-o", "cachefile=none"]
    for key, value in pool.root_properties.items():
        bits += ["-O", QuoteString(f"{key}={value}")]
    bits.append(QuoteString(pool.name))
    for vdev in pool.vdevs:
        if vdev.mode != "stripe":
            bits.append(vdev.mode)
        bits += [QuoteString(devices[m]) for m in vdev.members]
    if pool.log:
        bits += ["log", *(QuoteString(devices[m]) for m in pool.log)]
    if pool.cache:
        bits += ["cache", *(QuoteString(devices[m]) for m in pool.cache)]
    return StringCommand(*bits)


@operation()
def pool(run: Run, pool: Pool, devices: dict[str, str], view: PoolView | None = None):
    """
    Make a pool imported with exactly the profile's topology: import it if it exists (exported by
    an earlier run), create it if absent, refuse if it is imported with another layout. With a
    ``view`` (the run leaves the pool exported), an exported pool is imported read-only instead,
    so the later stages can compare without writing; their first change makes it writable.

    + run: the run (facts, what it made)
    + pool: the profile's ``Pool``
    + devices: partlabel -> block device of every member (``Profile.pool_members``)
    + view: a ``PoolView``: how to read the pool when the run ends with it exported
      (``tabula_export_pools``), and how to make a read-only view writable

    **Example:**

    .. code:: python

        zfs.pool(run, profile.pools["rpool"], {"rpool-rz1-2790ee34": "/dev/disk/by-partlabel/rpool-rz1-2790ee34", ...},
                 view=zfs.PoolView(profile.all_mounts(), ("rpool-2790ee34/remote",), run.secrets["ZFS_KEY"]))
    """
    dirs = search_dirs(devices)
    if all(run.created_this_run(Made.device(path)) for path in devices.values()):
        # Every member is a partition this run just made: no pool to find. zpool create itself
        # refuses a member that still carries an old pool's label (new partitions where old ones were).
        run.tell(f"create pool {pool.name}: {describe_topology(pool)} (on this run's new partitions)")
        run.record_created(Made.pool(pool.name))
        hint = (f"tabula: zpool create {pool.name} failed. If a member carries the label of an earlier pool "
                "(new partitions where old ones were), run again to have that pool found and imported, or clear "
                "the label with zpool labelclear if it holds nothing you need")
        yield StringCommand("sh", "-c", QuoteString(f"{create_pool_command(pool, devices).get_raw_value()} || "
                                                    f"{{ echo {shlex.quote(hint)} >&2; exit 1; }}"))
        return
    state = run.read(ZfsPoolState, pool_name=pool.name, devices=tuple(devices.values()))
    imported = state.get("state") == "imported"
    if imported and state.get("readonly") and (view is None or not view.exported_at_end):
        # A read-only view left by an interrupted run, and this run keeps the pool imported.
        _check_topology(pool, devices, state)
        run.tell(f"pool {pool.name} is imported read-only (left by an interrupted run): imported again read-write")
        yield make_view_writable(run, pool.name, dirs, view or PoolView())
        return
    if imported and not state.get("readonly"):
        _check_topology(pool, devices, state)
        run.noop(f"pool {pool.name} is imported with the profile's topology")
        return
    if view is not None and view.exported_at_end and (
            imported or pool.name in run.read(ZfsImportablePools, search_dirs=dirs)):
        opened = open_view(run, pool, dirs, view)
        if opened:
            _check_topology(pool, devices, run.read(ZfsPoolState, pool_name=pool.name, devices=tuple(devices.values())))
            run.before_first_change(f"pool {pool.name}", lambda: [make_view_writable(run, pool.name, dirs, view)])
            run.noop(f"pool {pool.name} is exported, as this run leaves it: imported read-only to compare "
                      f"({opened}), nothing written; exported again at the end")
            return
    if imported or pool.name in run.read(ZfsImportablePools, search_dirs=dirs):
        run.tell(f"import pool {pool.name} (found in {', '.join(dirs)}), mounting nothing")
        run.record_created(Made.imported_pool(pool.name))
        # -N: mount nothing (all datasets are legacy and mounted by operations.mounts)
        yield StringCommand("zpool", "import", "-N", "-o", "cachefile=none",
                            *[x for d in dirs for x in ("-d", QuoteString(d))], QuoteString(pool.name))
    else:
        run.tell(f"create pool {pool.name}: {describe_topology(pool)}")
        run.record_created(Made.pool(pool.name))
        yield create_pool_command(pool, devices)


def _check_topology(pool: Pool, devices: dict[str, str], state: dict) -> None:
    problems = topology_differences(pool, devices, state)
    if problems:
        raise ZfsError(
            f"pool {pool.name} is imported with another layout: {'; '.join(problems)}. "
            f"Tabula never rebuilds a pool; export or destroy it yourself if it is the wrong one"
        )


@operation()
def export_pool(run: Run, pool_name: str):
    """
    Unmount every mount of the pool (and what is mounted below them) and export it, so the
    installed system imports it at its first boot as a pool it may take. A read-only view
    (``pool(view=...)``) that nothing needed to write through is closed the same way, as a read:
    the pool is left exactly as the run found it.

    + run: the run (facts, what it made)
    + pool_name: the pool's name

    **Example:**

    .. code:: python

        zfs.export_pool(run, "rpool-2790ee34")
    """
    state = run.read(ZfsPoolState, pool_name=pool_name)
    if state.get("state") == "imported" and state.get("readonly"):
        close_view(run, pool_name)
        if not run.created_this_run(Made.writable_pool(pool_name)):
            run.noop(f"pool {pool_name} is exported as the run found it: read through a read-only import, "
                      "nothing written")
            return
        # (planning only: the change planned before would have made it writable, then exported)
    elif state.get("state") != "imported" and not (run.created_this_run(Made.pool(pool_name))
                                                   or run.created_this_run(Made.imported_pool(pool_name))):
        run.noop(f"pool {pool_name} is not imported")
        return
    # (not imported yet while planning a run that creates or imports it: the plan shows the export)
    run.tell(f"unmount every mount of pool {pool_name} and export it, ready for the first boot")
    yield f"{unmount_pool_script(pool_name)} && zpool export {shlex.quote(pool_name)}"
