"""
What the guard reads about the target's disks: every block device (lsblk), the commands and
kernel modules the target has, where a stable path points, and the ZFS pools it sees.
Parsers are tested on output captured in the VM.
"""

from __future__ import annotations

import json
import shlex

from pyinfra.api import FactBase, QuoteString, StringCommand


class BlockDevices(FactBase):
    """
    Every block device as a flat list, with its parent disk, from ``lsblk -J -b``.

    .. code:: python

        [{"name": "/dev/nvme0n1p1", "type": "part", "pkname": "/dev/nvme0n1",
          "partlabel": "EFI", "mountpoints": ["/mnt/boot"], ...}]
    """

    default = list
    _columns = "NAME,TYPE,SIZE,SERIAL,PARTLABEL,FSTYPE,LABEL,PKNAME"

    def command(self) -> str:
        # MOUNTPOINTS (every mount of a device) needs util-linux >= 2.37; older: MOUNTPOINT
        return (f"lsblk -J -b -p -o {self._columns},MOUNTPOINTS 2>/dev/null"
                f" || lsblk -J -b -p -o {self._columns},MOUNTPOINT")

    def requires_command(self) -> str:
        return "lsblk"

    def process(self, output):
        return parse_lsblk("\n".join(output))


class ToolsPresent(FactBase):
    """
    Which of these commands the target has on its PATH, and which of these kernel modules it can
    load (loaded already, or found by ``modprobe -n``).

    .. code:: python

        read(ToolsPresent, commands=["cryptsetup", "nix"], modules=["zfs"])
        {"commands": ["cryptsetup"], "modules": ["zfs"]}
    """

    def command(self, commands, modules) -> StringCommand:
        script = ('for c in $1; do command -v "$c" >/dev/null 2>&1 && echo "command $c"; done; '
                  'for m in $2; do { [ -d "/sys/module/$m" ] || modprobe -n -q "$m" 2>/dev/null; } && echo "module $m"; done; true')
        return StringCommand("sh", "-c", QuoteString(script), "tools",
                             QuoteString(" ".join(commands)), QuoteString(" ".join(modules)))

    def process(self, output):
        found: dict[str, list[str]] = {"commands": [], "modules": []}
        for line in output:
            kind, _, name = line.strip().partition(" ")
            if kind in ("command", "module") and name:
                found[kind + "s"].append(name)
        return found

    @staticmethod
    def default():
        return {"commands": [], "modules": []}


def parse_lsblk(text: str) -> list[dict]:
    devices: list[dict] = []

    def walk(nodes, parent):
        for node in nodes:
            mounts = node.get("mountpoints", [node.get("mountpoint")])
            devices.append({
                "name": node["name"],
                "type": node.get("type"),
                "size": int(node["size"]) if node.get("size") is not None else None,
                "serial": (node.get("serial") or "").strip() or None,
                "partlabel": node.get("partlabel"),
                "fstype": node.get("fstype"),
                "label": node.get("label"),
                "parent": node.get("pkname") or parent,
                "mountpoints": [m for m in mounts if m],
            })
            walk(node.get("children", []), node["name"])

    if text.strip():
        walk(json.loads(text).get("blockdevices", []), None)
    return devices


class StablePath(FactBase):
    """
    Where a stable path (/dev/disk/by-id/...) points, and which by-id paths exist (for messages).

    .. code:: python

        {"device": "/dev/nvme0n1", "by_id": ["nvme-QEMU_NVMe_Ctrl_TABULA-NVME0", ...]}
    """

    @staticmethod
    def default():
        return {"device": None, "by_id": []}

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (f"if [ -b {quoted} ]; then echo device=$(readlink -f {quoted}); fi; "
                "ls -1 /dev/disk/by-id 2>/dev/null | sed 's/^/by-id=/' || true")

    def process(self, output):
        return parse_stable_path(output)


def parse_stable_path(lines) -> dict:
    found = {"device": None, "by_id": []}
    for line in lines:
        key, _, value = line.partition("=")
        if key == "device":
            found["device"] = value
        elif key == "by-id":
            found["by_id"].append(value)
    return found


class ZfsPoolsFound(FactBase):
    """
    The ZFS pools this system sees, by pool id (the UUID blkid shows on a member): imported ones
    (``zpool list``) and those ``zpool import`` would import, with their state. Empty without
    the zfs module loaded (a fact does not load it).

    .. code:: python

        {"13117309625795050669": {"name": "rpool-2790ee34", "state": "ONLINE", "imported": False}}
    """

    default = dict

    def command(self) -> str:
        return ("if [ -e /sys/module/zfs ] && command -v zpool >/dev/null; then "
                "zpool list -H -o name,guid,health 2>/dev/null | sed 's/^/imported /'; zpool import 2>/dev/null; fi; true")

    def process(self, output) -> dict:
        return parse_pools_found(output)


def parse_pools_found(lines) -> dict:
    pools: dict[str, dict] = {}
    name = pool_id = None
    for line in lines:
        words = line.split()
        if words[:1] == ["imported"] and len(words) >= 4:
            pools[words[2]] = {"name": words[1], "state": words[3], "imported": True}
        elif words[:1] == ["pool:"] and len(words) > 1:
            name, pool_id = words[1], None
        elif words[:1] == ["id:"] and len(words) > 1 and name:
            pool_id = words[1]
        elif words[:1] == ["state:"] and len(words) > 1 and name and pool_id:
            pools.setdefault(pool_id, {"name": name, "state": words[1], "imported": False})
            name = pool_id = None
    return pools


class ImportedPoolVdevs(FactBase):
    """{device: pool} of imported ZFS pools (empty without ZFS loaded)."""

    default = dict

    def command(self) -> str:
        return ("if [ -e /sys/module/zfs ] && command -v zpool >/dev/null; then "
                "zpool status -PL 2>/dev/null | awk '$1 == \"pool:\" {p=$2} $1 ~ \"^/dev/\" {print p, $1}'; fi")

    def process(self, output):
        return {parts[1]: parts[0] for parts in (line.split() for line in output) if len(parts) == 2}
