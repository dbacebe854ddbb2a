"""
What the zfs layer reads: whether the module is loaded, a pool's state and topology, the pools
``zpool import`` finds, a pool's datasets with every property, a temp dataset's changes since
@empty (gaps) and the temp datasets as a rescue sees them. Parsers are tested on captured output.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from pyinfra.api import FactBase

from operations.zfs.common import EMPTY_SNAPSHOT
from operations.target import decode_octal, leftovers_script, parse_leftovers


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




class ZpoolProperties(FactBase):
    """
    Properties of an imported pool (``zpool get``): ``{property: value}``; empty when the pool is
    not imported.

    + pool_name: the pool
    + properties: the properties to read
    """

    default = dict

    def command(self, pool_name: str, properties: tuple[str, ...]) -> str:
        return (f"zpool get -H -o property,value {shlex.quote(','.join(properties))} {shlex.quote(pool_name)} "
                "2>/dev/null || true")

    def process(self, output) -> dict:
        return dict(line.split("\t", 1) for line in output if "\t" in line)
