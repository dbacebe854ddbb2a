"""
The ZFS layer: pools with their exact topology, datasets by category (temp/local/remote) with their
properties, native encryption, the ``@empty`` snapshots of temp datasets, and the NixOS settings that
import, unlock and roll back the pool at boot.

Pools and datasets hang in the profile tree (``Profile.pools``; members are partitions whose
content is ``type: zfs``), mounts are done by ``operations.mounts`` from ``Profile.all_mounts()``
(datasets use ``mountpoint=legacy``), so this module only creates and checks.

    zfs.apply(profile)      # module loaded, pools imported or created, datasets + @empty, key loaded
    zfs.export(profile)     # at the end of a run: unmount the pools' mounts, zpool export

A run that ends with the pools exported (``tabula_export_pools``, the default) reads an exported
pool through a read-only view: ``zpool import -o readonly=on``, keys loaded, the profile's mounts
made read-only, so every later stage compares as usual. Nothing is written to the pool (same
uberblock, same ``zpool history``); when everything matches, the view is closed and the pool
exported again, and the run reports no change. The first command of any stage that does have
work to do is preceded by making the pool writable (export, import, keys, mounts again).
    zfs.nix_fragments(profile)    # NixOS bindings for operations.nixos (LAYER_RENDERERS)
    zfs.rollback_script(profile)  # what the initrd runs before / is mounted (and the e2e tests)
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from pyinfra.api import FactBase, QuoteString, StringCommand
from operations.run import Made, Run, operation

from operations.errors import TabulaError
from operations.mounts import Mounts, mount_command
from operations.nixlit import NixFragments, nix_indented_string, nix_list, nix_string
from operations.profile import Dataset, Mount, Pool, Profile
from operations.secrets import Secret
from operations.settings import Settings
from operations.target import Written, decode_octal, install_path, read_fact
from operations.target import INSTALL_ROOT, describe_leftovers, install_footprint, leftovers_script, parse_leftovers

# Properties that can only be chosen at creation: a difference is reported, never "fixed".
ONE_TIME_PROPERTIES = frozenset({
    "encryption", "keyformat", "pbkdf2iters", "casesensitivity", "normalization", "utf8only",
    "volblocksize", "ashift",
})
EMPTY_SNAPSHOT = "empty"
# The secret (run.secrets) the encrypted datasets are made and unlocked with.
KEY = "ZFS_KEY"
# Values zfs accepts but shows under another name (zfs get prints the canonical one).
VALUE_ALIASES = {
    "acltype": {"posixacl": "posix", "noacl": "off"},
}


def canonical(prop: str, value: str) -> str:
    """The value as ``zfs get`` shows it: acltype=posixacl reads back as posix."""
    return VALUE_ALIASES.get(prop, {}).get(value, value)


class ZfsError(TabulaError):
    """A pool or dataset on the target differs from the profile in a way tabula will not change."""


# --- facts ----------------------------------------------------------------------------------


class ZfsModuleLoaded(FactBase):
    """
    Whether the zfs kernel module is loaded (the zpool/zfs tools do nothing without it).
    """

    default = bool

    def command(self) -> str:
        return "test -e /sys/module/zfs && echo loaded || true"

    def process(self, output) -> bool:
        return "loaded" in output


def parse_zpool_status(lines: Iterable[str]) -> dict:
    """
    The ``config:`` section of ``zpool status -PL POOL`` as
    ``{"vdevs": [(mode, [device, ...]), ...], "log": [...], "cache": [...], "spare": [...]}``;
    mode is raidz1/raidz2/raidz3/mirror, or stripe for a top-level disk.
    """
    topology: dict = {"vdevs": [], "log": [], "cache": [], "spare": []}
    section = None  # None: before the pool line; "vdevs" / "log" / ...
    in_config = False
    group: list[str] | None = None
    for raw in lines:
        line = raw.rstrip("\n")
        if line.strip().startswith("config:"):
            in_config = True
            continue
        if not in_config:
            continue
        if line.strip().startswith("errors:"):
            break
        if not line.strip() or line.strip().startswith("NAME"):
            continue
        # zpool indents with one tab, then 2 spaces per level
        body = line.lstrip("\t")
        level = (len(body) - len(body.lstrip(" "))) // 2
        word = body.split()[0]
        if level == 0:
            section = {"logs": "log", "cache": "cache", "spares": "spare"}.get(word, "vdevs")
            group = None
            continue
        if level == 1:
            mode = word.rsplit("-", 1)[0] if word.split("-")[0] in ("raidz1", "raidz2", "raidz3", "mirror") else None
            if word.startswith("raidz") and mode == "raidz":
                mode = "raidz1"
            if mode and section == "vdevs":
                group = []
                topology["vdevs"].append((mode, group))
            elif section == "vdevs":
                group = None
                topology["vdevs"].append(("stripe", [word]))
            elif mode:  # a mirrored log
                group = []
                topology[section].append((mode, group))
            else:
                topology[section].append(word)
            continue
        if group is not None:
            group.append(word)
    return topology


class ZfsPoolState(FactBase):
    """
    The state of one pool: ``{"state": "imported" | "absent", "readonly": bool, "topology": {...},
    "devices": {given path: real path}}``; topology (imported pools only) lists real device paths
    as ``zpool status -PL`` shows them; readonly: imported with ``readonly=on`` (a read-only view).

    + pool_name: the pool's name
    + devices: member paths to resolve (by-partlabel links), so they compare with the topology
    """

    default = dict

    def command(self, pool_name: str, devices: tuple[str, ...] = ()) -> str:
        pool = shlex.quote(pool_name)
        resolve = "".join(
            f'echo "device {shlex.quote(d)} $(readlink -f {shlex.quote(d)} 2>/dev/null)"; ' for d in devices
        )
        return (
            f"{resolve}"
            f"if test -e /sys/module/zfs && zpool list -H -o name {pool} >/dev/null 2>&1; "
            f"then echo state imported; echo readonly $(zpool get -H -o value readonly {pool}); "
            f"zpool status -PL {pool}; else echo state absent; fi"
        )

    def process(self, output) -> dict:
        lines = list(output)
        devices = {}
        state, readonly = "absent", False
        for line in lines:
            parts = line.split()
            if line.startswith("device ") and len(parts) >= 2:
                devices[parts[1]] = parts[2] if len(parts) > 2 else ""
            elif line.startswith("state "):
                state = parts[1]
            elif line.startswith("readonly "):
                readonly = parts[1:] == ["on"]
        topology = parse_zpool_status(lines) if state == "imported" else {}
        return {"state": state, "readonly": readonly, "topology": topology, "devices": devices}


class ZfsImportablePools(FactBase):
    """
    Names of the pools ``zpool import`` finds on the given directories and could import (exported
    ones, or ones not yet imported by this system); empty without the zfs module.

    + search_dirs: where to look for members, e.g. ``("/dev/disk/by-partlabel",)``
    """

    default = list

    def command(self, search_dirs: tuple[str, ...] = ()) -> str:
        dirs = " ".join(f"-d {shlex.quote(d)}" for d in search_dirs)
        return f"test -e /sys/module/zfs && zpool import {dirs} 2>/dev/null || true"

    def process(self, output) -> list[str]:
        return [line.split()[1] for line in output if line.split()[:1] == ["pool:"] and len(line.split()) > 1]


class ZfsPoolDatasets(FactBase):
    """
    Filesystems and snapshots of one imported pool with every property:
    ``{"pool/ds": {"property": (value, source)}, "pool/ds@snap": {...}}``; empty if not imported.

    + pool_name: the pool's name
    """

    default = dict

    def command(self, pool_name: str) -> str:
        pool = shlex.quote(pool_name)
        return (
            f"test -e /sys/module/zfs && zpool list -H -o name {pool} >/dev/null 2>&1 && "
            f"zfs get -H -r -t filesystem,snapshot -o name,property,value,source all {pool} || true"
        )

    def process(self, output) -> dict:
        datasets: dict = {}
        for line in output:
            parts = line.split("\t")
            if len(parts) != 4:
                continue
            dataset_name, prop, value, source = parts
            datasets.setdefault(dataset_name, {})[prop] = (value, source)
        return datasets


# --- operations -----------------------------------------------------------------------------


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


def create_pool_command(pool: Pool, devices: dict[str, str]) -> StringCommand:
    """``zpool create`` with the profile's options, root properties and exact topology."""
    bits: list = ["zpool", "create"]
    for key, value in pool.options.items():
        bits += ["-o", QuoteString(f"{key}={value}")]
    # The live system's cache file would make it re-import the pool at its next boot: none.
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


def _load_keys_script(roots: tuple[str, ...], only_unavailable: bool = True, report: bool = False) -> str:
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
            + _load_keys_script(encryption_roots, report=True)
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


def _unmount_pool_script(pool_name: str) -> str:
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
                  f"{{ {_unmount_pool_script(pool_name)}; }} && zpool export {p} && echo closed || echo failed\n")
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
    script = "\n".join(lines) + "\n" + _load_keys_script(view.encryption_roots, only_unavailable=False)
    for m in viewed:
        script += " && ".join(c.get_raw_value() for c in mount_command(m, install_path(m.mountpoint))) + "\n"
    run.record_created(Made.writable_pool(pool_name))
    return StringCommand("sh", "-c", QuoteString(script), **view.stdin())


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
    search_dirs = tuple(sorted({path.rsplit("/", 1)[0] for path in devices.values()}))
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
        yield make_view_writable(run, pool.name, search_dirs, view or PoolView())
        return
    if imported and not state.get("readonly"):
        _check_topology(pool, devices, state)
        run.noop(f"pool {pool.name} is imported with the profile's topology")
        return
    if view is not None and view.exported_at_end and (
            imported or pool.name in run.read(ZfsImportablePools, search_dirs=search_dirs)):
        opened = _open_view(run, pool, search_dirs, view)
        if opened:
            _check_topology(pool, devices, run.read(ZfsPoolState, pool_name=pool.name, devices=tuple(devices.values())))
            run.before_first_change(f"pool {pool.name}", lambda: [make_view_writable(run, pool.name, search_dirs, view)])
            run.noop(f"pool {pool.name} is exported, as this run leaves it: imported read-only to compare "
                      f"({opened}), nothing written; exported again at the end")
            return
    if imported or pool.name in run.read(ZfsImportablePools, search_dirs=search_dirs):
        run.tell(f"import pool {pool.name} (found in {', '.join(search_dirs)}), mounting nothing")
        run.record_created(Made.imported_pool(pool.name))
        # -N: mount nothing (all datasets are legacy and mounted by operations.mounts)
        yield StringCommand("zpool", "import", "-N", "-o", "cachefile=none",
                            *[x for d in search_dirs for x in ("-d", QuoteString(d))], QuoteString(pool.name))
    else:
        run.tell(f"create pool {pool.name}: {describe_topology(pool)}")
        run.record_created(Made.pool(pool.name))
        yield create_pool_command(pool, devices)


def _open_view(run: Run, pool: Pool, search_dirs: tuple[str, ...], view: PoolView) -> str:
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


def _check_topology(pool: Pool, devices: dict[str, str], state: dict) -> None:
    problems = topology_differences(pool, devices, state)
    if problems:
        raise ZfsError(
            f"pool {pool.name} is imported with another layout: {'; '.join(problems)}. "
            f"Tabula never rebuilds a pool; export or destroy it yourself if it is the wrong one"
        )


def dataset_properties(dataset: Dataset) -> dict[str, str]:
    """The properties a dataset is created with (mounted datasets are always legacy)."""
    props = dict(dataset.properties)
    if dataset.mountpoint:
        props.setdefault("mountpoint", "legacy")
    return props


def property_drift(wanted: dict[str, str], current: dict) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(settable differences, one-time differences) between wanted and the fact's properties."""
    settable, fixed = {}, {}
    for key, value in wanted.items():
        have = current.get(key, (None, None))[0]
        if have == canonical(key, value):
            continue
        if key in ONE_TIME_PROPERTIES:
            fixed[key] = (have, value)
        else:
            settable[key] = value
    return settable, fixed


@operation()
def dataset(run: Run, dataset_name: str, properties: dict[str, str] | None = None, encryption: dict[str, str] | None = None,
            empty_snapshot: bool = False, create: bool = True):
    """
    Create a filesystem dataset (with its ``@empty`` snapshot taken in the same command), or fix
    settable property drift on an existing one with ``zfs set``; load the key of an encrypted one.
    The encryption key is read from stdin: pass it with ``_stdin=`` (never in argv).

    + run: the run (facts, what it made)
    + dataset_name: full name, e.g. ``rpool-2790ee34/temp/root``
    + properties: properties to create with and keep (one-time ones are only checked)
    + encryption: ``{"encryption": ..., "keyformat": ..., "keylocation": "prompt"}`` for an encryption root
    + empty_snapshot: snapshot ``@empty`` right after creation (never later, never again)
    + create: False for a pool's root dataset (created by ``zpool create``): only its properties

    **Example:**

    .. code:: python

        zfs.dataset(run, "rpool-2790ee34/remote", properties={"canmount": "off"},
                    encryption={"encryption": "aes-256-gcm", "keyformat": "passphrase", "keylocation": "prompt"},
                    _stdin=run.secrets["ZFS_KEY"].reveal())
    """
    pool_name = dataset_name.split("/", 1)[0]
    wanted = {**(properties or {}), **(encryption or {})}
    if run.created_this_run(Made.pool(pool_name)):
        # A pool this run just made holds only what this run created in it (zfs create refuses
        # an existing dataset); its root dataset got its properties from zpool create -O.
        if not create:
            run.noop(f"dataset {dataset_name} got its properties from this run's zpool create")
            return
        datasets = {}
    else:
        datasets = run.read(ZfsPoolDatasets, pool_name=pool_name)
    current = datasets.get(dataset_name)

    if current is None and not create:
        run.noop(f"dataset {dataset_name} comes with its pool (which is not imported yet)")
        return
    if current is None:
        bits: list = ["zfs", "create"]
        for key, value in wanted.items():
            bits += ["-o", QuoteString(f"{key}={value}")]
        bits.append(QuoteString(dataset_name))
        if empty_snapshot:
            # The same command: nothing can be written to the dataset before its @empty exists.
            bits += ["&&", "zfs", "snapshot", QuoteString(f"{dataset_name}@{EMPTY_SNAPSHOT}")]
        run.tell(f"create {'encrypted ' if encryption else ''}dataset {dataset_name}"
             + (f" and its @{EMPTY_SNAPSHOT} snapshot" if empty_snapshot else "")
             + (f": {', '.join(f'{k}={v}' for k, v in (properties or {}).items())}" if properties else ""))
        run.record_created(Made.dataset(dataset_name))
        yield StringCommand(*bits)
        return

    settable, fixed = property_drift(wanted, current)
    if fixed:
        details = ", ".join(f"{k}={have} (profile: {want})" for k, (have, want) in fixed.items())
        raise ZfsError(f"dataset {dataset_name} has {details}: set only at creation, tabula will not recreate it")
    if empty_snapshot and f"{dataset_name}@{EMPTY_SNAPSHOT}" not in datasets:
        raise ZfsError(
            f"dataset {dataset_name} exists without @{EMPTY_SNAPSHOT}: its content is unknown, so tabula will not "
            f"snapshot it now; destroy it (zfs destroy -r {dataset_name}) and re-run to recreate it empty"
        )
    changed = False
    if settable:
        changed = True
        run.tell(f"dataset {dataset_name}: set {', '.join(f'{k}={v}' for k, v in settable.items())}")
        yield StringCommand("zfs", "set", *[QuoteString(f"{k}={v}") for k, v in settable.items()],
                            QuoteString(dataset_name))
    if encryption and current.get("keystatus", ("",))[0] == "unavailable":
        changed = True
        run.tell(f"dataset {dataset_name}: load its key")
        yield StringCommand("zfs", "load-key", QuoteString(dataset_name))
    if not changed:
        run.noop(f"dataset {dataset_name} exists with the profile's properties"
                  + (f" and its @{EMPTY_SNAPSHOT} snapshot" if empty_snapshot else "")
                  + (" and its key loaded" if encryption else ""))


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
        run.cancel_before_first_change(f"pool {pool_name}")
        closed = run.host.get_fact(ZfsViewClosed, pool_name=pool_name)
        run.forget()
        if closed != "closed":
            raise ZfsError(f"pool {pool_name}: its read-only view could not be closed ({closed}); see what holds "
                           f"its mounts (fuser -vm /mnt), then zpool export {pool_name}")
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
    yield f"{_unmount_pool_script(pool_name)} && zpool export {shlex.quote(pool_name)}"


# --- stages ---------------------------------------------------------------------------------


def member_devices(profile: Profile, pool_key: str) -> dict[str, str]:
    return {part.label: device for device, part in profile.pool_members(pool_key)}


def ordered_datasets(pool: Pool) -> list[Dataset]:
    """Parents before children (every parent is declared: the profile checks it at load)."""
    return sorted(pool.datasets, key=lambda d: d.name.count("/"))


def apply(run: Run) -> None:
    """Pools imported or created, datasets with properties, @empty snapshots, keys loaded. A run
    that exports the pools at the end (``settings.tabula_export_pools``) reads an exported pool read-only."""
    profile = run.profile
    if not profile.pools:
        return
    key = run.secrets.get(KEY)
    kernel_module(run, name="ZFS kernel module")
    for pool_key, pool_def in profile.pools.items():
        devices = member_devices(profile, pool_key)
        view = pool_view(run, pool_def)
        pool(run, pool_def, devices, view=view, name=f"ZFS pool {pool_def.name}", **view.stdin())
        dataset(run, pool_def.name, properties=dict(pool_def.root_properties), create=False,
                name=f"ZFS properties {pool_def.name}")
        for ds in ordered_datasets(pool_def):
            full = f"{pool_def.name}/{ds.name}"
            extra = {}
            if ds.encryption:
                extra["_stdin"] = key.reveal()
                if len(key.reveal()) < 8:
                    raise ZfsError(f"{key.source}: a ZFS passphrase needs at least 8 characters")
            dataset(
                run,
                full,
                properties=dataset_properties(ds),
                encryption=ds.encryption.model_dump() if ds.encryption else None,
                empty_snapshot=ds.empty_snapshot,
                name=f"ZFS dataset {full}",
                **extra,
            )


def pool_view(run: Run, pool_def: Pool) -> PoolView:
    """How this run reads the pool when it leaves it exported: the profile's mounts, the
    encryption roots and the run's key."""
    roots = tuple(f"{pool_def.name}/{ds.name}" for ds in pool_def.datasets if ds.encryption)
    return PoolView(mounts=tuple(run.profile.all_mounts()), encryption_roots=roots, key=run.secrets.get(KEY),
                    exported_at_end=run.settings.tabula_export_pools)


def export(run: Run) -> None:
    """At the end of a run: every pool unmounted and exported cleanly."""
    for pool_def in run.profile.pools.values():
        export_pool(run, pool_def.name, name=f"ZFS export {pool_def.name}")


# --- NixOS ----------------------------------------------------------------------------------


def temp_datasets(profile: Profile) -> list[str]:
    """Full names of the datasets rolled back to @empty at boot."""
    return [f"{p.name}/{d.name}" for p in profile.pools.values() for d in p.datasets if d.empty_snapshot]


def rollback_script(profile: Profile) -> str:
    """The shell script that rolls every temp dataset back to @empty (initrd, and the e2e tests)."""
    lines = ["set -eu"]
    lines += [f"zfs rollback -r {shlex.quote(f'{name}@{EMPTY_SNAPSHOT}')}" for name in temp_datasets(profile)]
    return "\n".join(lines) + "\n"


def nix_configuration(profile: Profile) -> str:
    """
    configuration.nix bindings (two-space indent) for the profile's pools, or "" without pools:
    ZFS support, ``networking.hostId`` (= ``profile.host_id``), import by partlabel, and the
    passphrase prompt for the encrypted datasets.

    Unlocking: the encrypted datasets keep ``keylocation=prompt``; with
    ``boot.zfs.requestEncryptionCredentials`` the initrd asks for the passphrase (the one tabula
    read from TABULA_ZFS_KEY) when it imports the pool for the neededForBoot mounts (``/remote``).
    Nothing that unlocks the data is stored on the machine, like the LUKS passphrase.
    """
    if not profile.pools:
        return ""
    encrypted = [f"{p.name}/{d.name}" for p in profile.pools.values() for d in p.datasets if d.encryption]
    lines = [
        "  # ZFS (pools from the profile)",
        '  boot.supportedFilesystems = [ "zfs" ];',
        f"  networking.hostId = {nix_string(profile.host_id)};  # first 8 hex chars of sha256(host name)",
        "  # Member partitions are found by their partlabels (they carry the host hash).",
        '  boot.zfs.devNodes = "/dev/disk/by-partlabel";',
        "  # Prompt for the passphrase of the encrypted datasets in the initrd (keylocation=prompt).",
        f"  boot.zfs.requestEncryptionCredentials = {nix_list(encrypted) if encrypted else 'false'};",
        "  services.zfs.autoScrub.enable = true;",
    ]
    return "\n".join(lines) + "\n"


def nix_rollback_service(profile: Profile) -> str:
    """
    impermanence.nix bindings: the initrd (systemd stage 1) service that runs ``rollback_script``
    after the pool import and before ``/`` is mounted; "" when no dataset has an @empty snapshot.
    """
    temps = temp_datasets(profile)
    if not temps:
        return ""
    pools = sorted({name.split("/", 1)[0] for name in temps})
    imports = nix_list(f"zfs-import-{name}.service" for name in pools)
    lines = [
        "  # Rollback service: the temp datasets return to their @empty snapshots at every boot,",
        "  # after the pool is imported and before / is mounted (systemd stage 1).",
        "  boot.initrd.systemd.services.tabula-rollback-temp = {",
        '    description = "Roll the temp datasets back to @empty";',
        '    wantedBy = [ "initrd.target" ];',
        f"    requires = {imports};",
        f"    after = {imports};",
        '    before = [ "sysroot.mount" ];',
        "    path = [ config.boot.zfs.package ];",
        '    unitConfig.DefaultDependencies = "no";',
        '    serviceConfig.Type = "oneshot";',
        f"    script = {nix_indented_string(rollback_script(profile))};",
        "  };",
    ]
    return "\n".join(lines) + "\n"


def nix_fragments(profile: Profile, ids: dict | None = None, placeholder: bool = False) -> NixFragments:
    """configuration.nix: ZFS support, hostId, pool import, key prompt; impermanence.nix: the
    initrd service that rolls the temp datasets back to @empty."""
    return NixFragments(configuration=nix_configuration(profile), impermanence=nix_rollback_service(profile))


def required_tools(profile: Profile) -> dict[str, str]:
    """{command or "<name> kernel module": what needs it} on the target, for the guard."""
    needed = {}
    for pool in profile.pools.values():
        needed.update({"zpool": f"ZFS pool {pool.name}", "zfs": f"ZFS pool {pool.name}",
                       "zfs kernel module": f"ZFS pool {pool.name}"})
    return needed


# --- gaps: what a temp dataset got since @empty -------------------------------------------------


class SnapshotDiff(FactBase):
    """
    ``zfs diff -FH <dataset>@<snapshot>``: what changed in the dataset since the snapshot, as
    ``[(change, type, path)]`` with change ``+`` (added), ``M`` (modified), ``-`` (removed) or
    ``R`` (renamed: the new path), type ``F`` file, ``/`` directory, ``@`` link (zfs's letters),
    paths where the dataset is mounted now. Empty when the snapshot or dataset is absent.

    .. code:: python

        run.read(SnapshotDiff, dataset="rpool-1a2b3c4d/temp/root", snapshot="empty")
        [("+", "F", "/mnt/var/lib/app/db")]
    """

    def command(self, dataset: str, snapshot: str) -> str:
        name = shlex.quote(f"{dataset}@{snapshot}")
        return f"if zfs list -H -o name {name} >/dev/null 2>&1; then zfs diff -FH {name}; fi"

    def requires_command(self, dataset: str, snapshot: str) -> str:
        return "zfs"

    def process(self, output):
        return parse_snapshot_diff(output)

    @staticmethod
    def default():
        return []


def parse_snapshot_diff(lines) -> list[tuple[str, str, str]]:
    changes = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0] in ("+", "M", "-", "R"):
            changes.append((parts[0], parts[1], decode_octal(parts[-1])))
    return changes


_DIFF_KINDS = {"F": "file", "/": "directory", "@": "link"}


def written_since_boot(run: Run, mounts: dict) -> tuple[list[Written], list[str]]:
    """(what each temp dataset got since @empty, with its installed path; how that was found).
    ``mounts``: the Mounts fact (where each dataset is mounted now)."""
    written, how = [], []
    for pool in run.profile.pools.values():
        for ds in pool.datasets:
            if not ds.empty_snapshot or not ds.mountpoint:
                continue
            name = f"{pool.name}/{ds.name}"
            where = next((point for point, m in mounts.items() if m["device"] == name and m["fstype"] == "zfs"), None)
            if where is None:
                raise ZfsError(f"{name} is not mounted: import the pool and mount it (or run the install "
                               "deploy, which mounts it under /mnt) to compare it with @empty")
            for change, kind, path in run.read(SnapshotDiff, dataset=name, snapshot=EMPTY_SNAPSHOT):
                if change == "-" or (change == "M" and kind == "/"):
                    continue        # gone since @empty, or a folder whose entries changed (listed themselves)
                relative = path.removeprefix(where.rstrip("/")).lstrip("/")
                written.append(Written(f"{ds.mountpoint.rstrip('/')}/{relative}" if relative else ds.mountpoint,
                                       _DIFF_KINDS.get(kind, "other")))
            how.append(f"zfs diff {name}@{EMPTY_SNAPSHOT}")
    return written, how


# --- rescue -------------------------------------------------------------------------------------
# From the live system, for a machine that no longer boots: the pool imported (never created),
# its keys loaded, every temp dataset (those with @empty) rolled back to @empty, as the initrd's
# rollback does at boot. No other dataset is ever touched.


class ZfsTempState(FactBase):
    """
    The temp datasets of one pool as a rescue sees them: whether the pool is imported; for each
    dataset whether it and its ``@empty`` exist, the bytes written since ``@empty``
    (``written@empty``) and, when it is mounted at its place under the install root, what it
    holds beyond the install's footprint (``target.install_footprint``: the mount points below
    it, etc/nixos), at most ``target.LEFTOVER_LIMIT`` entries.

    + pool_name: the pool
    + temps: ``((dataset, its mount point under /mnt or "", footprint folders, config folder), ...)``

    .. code:: python

        {"imported": True, "datasets": {"rpool-x/temp/root": {"state": "ok", "written": 73728,
         "mounted": "/mnt", "leftovers": [("f", "junk")]}, "rpool-x/temp/tmp": {"state": "nosnapshot", ...}}}
    """

    default = dict

    def command(self, pool_name: str, temps: tuple) -> str:
        p = shlex.quote(pool_name)
        lines = [f"if test -e /sys/module/zfs && zpool list -H -o name {p} >/dev/null 2>&1; then echo 'pool\timported'; "
                 "else echo 'pool\tabsent'; exit 0; fi"]
        for name, target, folders, config in temps:
            d, s = shlex.quote(name), shlex.quote(f"{name}@{EMPTY_SNAPSHOT}")
            line = (f"if ! zfs list -H -o name {d} >/dev/null 2>&1; then printf 'state\\t%s\\tabsent\\n' {d}; "
                    f"elif ! zfs list -H -o name {s} >/dev/null 2>&1; then printf 'state\\t%s\\tnosnapshot\\n' {d}; "
                    f"else printf 'state\\t%s\\t%s\\n' {d} \"$(zfs get -H -p -o value written@{EMPTY_SNAPSHOT} {d})\"")
            if target:
                t = shlex.quote(target)
                line += (f"; if awk -v d={d} -v t={t} '$1 == d && $2 == t && $3 == \"zfs\" {{ f = 1 }} END {{ exit !f }}' "
                         f"/proc/mounts; then printf 'mounted\\t%s\\t%s\\n' {d} {t}; "
                         f"{leftovers_script(target, folders, config, prefix=f'left{chr(9)}{name}{chr(9)}')}; fi")
            lines.append(line + "; fi")
        return "\n".join(lines)

    def process(self, output):
        return parse_temp_state(output)


def parse_temp_state(lines) -> dict:
    found: dict = {"imported": False, "datasets": {}}
    for line in lines:
        fields = line.split("\t")
        if fields[0] == "pool" and len(fields) == 2:
            found["imported"] = fields[1] == "imported"
        elif fields[0] == "state" and len(fields) == 3:
            state = fields[2] if fields[2] in ("absent", "nosnapshot") else "ok"
            found["datasets"][fields[1]] = {"state": state, "mounted": None, "leftovers": [],
                                            "written": int(fields[2]) if fields[2].isdigit() else None}
        elif fields[0] == "mounted" and len(fields) == 3 and fields[1] in found["datasets"]:
            found["datasets"][fields[1]]["mounted"] = fields[2]
        elif fields[0] == "left" and len(fields) >= 4 and fields[1] in found["datasets"]:
            found["datasets"][fields[1]]["leftovers"] += parse_leftovers(["\t".join(fields[2:])])
    return found


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
    search_dirs = tuple(sorted({path.rsplit("/", 1)[0] for path in devices.values()}))
    if run.read(ZfsPoolState, pool_name=pool.name, devices=tuple(devices.values())).get("state") == "imported":
        run.noop(f"pool {pool.name} is imported")
    elif pool.name in run.read(ZfsImportablePools, search_dirs=search_dirs):
        run.noop(f"pool {pool.name} is found on {', '.join(search_dirs)}, ready to import")
    else:
        raise ZfsError(f"refusing to rescue pool {pool.name}: it is neither imported nor found on "
                       f"{', '.join(search_dirs)} (zpool import -d {search_dirs[0]} lists none); a rescue never "
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
        yield StringCommand("sh", "-c", QuoteString(_load_keys_script(roots)))   # (planned: read once imported)
        return
    unavailable = tuple(r for r in roots if datasets.get(r, {}).get("keystatus", ("",))[0] != "available")
    if not unavailable:
        run.noop(f"the key of {', '.join(roots)} is loaded")
        return
    yield StringCommand("sh", "-c", QuoteString(_load_keys_script(unavailable)))


def rollback_command(pool_name: str, datasets: list[str]) -> StringCommand:
    """Every mount of the pool unmounted (the datasets rolled back, and what is mounted on or
    below them), then each dataset rolled back to @empty (-r: and later snapshots destroyed),
    after checking again that every @empty is there."""
    lines = ["set -e"]
    for name in datasets:
        snap = shlex.quote(f"{name}@{EMPTY_SNAPSHOT}")
        lines.append(f"zfs list -H -o name {snap} >/dev/null 2>&1 || {{ echo {shlex.quote(f'tabula: refusing to roll back {name}: its snapshot {name}@{EMPTY_SNAPSHOT} is missing; nothing was changed')} >&2; exit 1; }}")
    lines.append(_unmount_pool_script(pool_name))
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


def rescue(run: Run) -> None:
    """Each pool imported (read-only while nothing needs writing, when the run exports it at the
    end), never created; keys loaded; temp datasets rolled back to @empty."""
    profile = run.profile
    if not profile.pools:
        return
    key = run.secrets.get(KEY)
    mountpoints = tuple(m.mountpoint for m in profile.all_mounts())
    kernel_module(run, name="ZFS kernel module")
    for pool_key, pool_def in profile.pools.items():
        devices = member_devices(profile, pool_key)
        present(run, pool_def, devices, name=f"ZFS pool {pool_def.name} found")
        view = pool_view(run, pool_def)
        pool(run, pool_def, devices, view=view, name=f"ZFS pool {pool_def.name}", **view.stdin())
        if view.encryption_roots:
            keys_loaded(run, pool_def.name, view.encryption_roots, name=f"ZFS keys {pool_def.name}", _stdin=key.reveal())
        temps = tuple((f"{pool_def.name}/{ds.name}", ds.mountpoint) for ds in ordered_datasets(pool_def)
                      if ds.empty_snapshot)
        if temps:
            rolled_back(run, pool_def.name, temps, mountpoints,
                        name=f"ZFS rollback to @{EMPTY_SNAPSHOT}: {', '.join(n.split('/', 1)[1] for n, _ in temps)}")


# --- checks -------------------------------------------------------------------------------------


def checks(host, settings: Settings, root: str) -> list[str]:
    """Each pool imported with the profile's topology (real member paths), pool options and root
    properties; each dataset with its properties, ``@empty`` where the profile takes it (and
    nowhere else), encryption with its key loaded, and every dataset below an encrypted one
    inheriting its key. One line per mismatch.

    An install exports its pools at the end (``tabula_export_pools``): import them first, or
    verify after a run that keeps them imported.

    + host: a testinfra host (``read_fact`` runs this layer's facts through it)
    """
    failures = []
    profile = settings.profile
    for pool_key, pool_def in profile.pools.items():
        devices = member_devices(profile, pool_key)
        state = read_fact(host, ZfsPoolState, pool_name=pool_def.name, devices=tuple(devices.values()))
        if state.get("state") != "imported":
            failures.append(f"pool {pool_def.name}: not imported (an install exports it at the end: "
                            f"zpool import -N -R /mnt {pool_def.name}, or run with tabula_export_pools=false)")
            continue
        failures += [f"pool {pool_def.name}: {problem}" for problem in topology_differences(pool_def, devices, state)]
        for key, value in pool_def.options.items():
            if key == "cachefile":
                continue
            have = host.run(f"zpool get -H -o value {shlex.quote(key)} {shlex.quote(pool_def.name)}").stdout.strip()
            if have != value:
                failures.append(f"pool {pool_def.name}: {key}={have}, the profile wants {value}")
        datasets = read_fact(host, ZfsPoolDatasets, pool_name=pool_def.name)
        failures += _property_problems(pool_def.name, dict(pool_def.root_properties), datasets.get(pool_def.name, {}))
        roots = [f"{pool_def.name}/{ds.name}" for ds in pool_def.datasets if ds.encryption]
        for ds in pool_def.datasets:
            full = f"{pool_def.name}/{ds.name}"
            current = datasets.get(full)
            if current is None:
                failures.append(f"{full}: dataset missing")
                continue
            failures += _property_problems(full, dataset_properties(ds), current)
            has_empty = f"{full}@{EMPTY_SNAPSHOT}" in datasets
            if has_empty != ds.empty_snapshot:
                failures.append(f"{full}: " + (f"no @{EMPTY_SNAPSHOT} snapshot" if ds.empty_snapshot else
                                               f"has an @{EMPTY_SNAPSHOT} snapshot the profile does not take"))
            if ds.encryption:
                wanted = {"encryption": ds.encryption.encryption, "keyformat": ds.encryption.keyformat,
                          "keylocation": ds.encryption.keylocation, "encryptionroot": full, "keystatus": "available"}
                failures += _property_problems(full, wanted, current)
            else:
                above = [r for r in roots if full.startswith(f"{r}/")]
                if above:
                    failures += _property_problems(full, {"encryptionroot": max(above, key=len)}, current)
    return failures


def _property_problems(name: str, wanted: dict[str, str], current: dict) -> list[str]:
    problems = []
    for key, value in wanted.items():
        have = current.get(key, (None, None))[0]
        if have != canonical(key, value):
            problems.append(f"{name}: {key}={have if have is not None else '(none)'}, the profile wants {value}")
    return problems
