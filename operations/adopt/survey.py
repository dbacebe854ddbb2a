"""
What adopt.py reads of a target it did not install, in two batches (each one round trip): the
block devices, their stable names, the mounts and the pools; then what each layer asks of what
that showed (``Layer.adopt_reads``: partition tables, LUKS headers, subvolumes, pool topologies
and datasets, swapfiles, the NixOS configuration's text). Reading changes nothing: a btrfs top
level not mounted is read through a read-only mount taken away after (as verify reads it), an
exported pool is not imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyinfra.api import FactBase

from operations.disks.facts import BlockDevices
from operations.run import FactRequest, Run, request_key
from operations.target import decode_octal, parse_exports

# What a booted NixOS mounts at runtime (not the layout): never adopted.
RUNTIME_MOUNTS = ("/dev", "/proc", "/sys", "/run", "/nix/store", "/tmp/.X11-unix")


class DiskIds(FactBase):
    """
    Every ``/dev/disk/by-id`` link with the device it points to.

    .. code:: python

        {"/dev/disk/by-id/virtio-TABULA-SSD": "/dev/vdb", ...}
    """

    default = dict

    def command(self) -> str:
        return ('for l in /dev/disk/by-id/*; do [ -L "$l" ] && printf \'%s %s\\n\' "$l" "$(readlink -f "$l")"; '
                "done; true")

    def process(self, output) -> dict:
        return dict(line.split(" ", 1) for line in output if " " in line)


class Signatures(FactBase):
    """
    What each block device holds, probed on the device itself (``blkid -p``: lsblk's FSTYPE
    comes from udev's records, which can lack a mapping's filesystem).

    .. code:: python

        {"/dev/mapper/cryptroot": {"TYPE": "btrfs", "LABEL": "nixos", "UUID": "..."}}
    """

    default = dict

    def command(self) -> str:
        return ('for d in $(lsblk -lnp -o NAME); do echo "device=$d"; blkid -p -o export "$d" 2>/dev/null; '
                "done; true")

    def process(self, output) -> dict:
        return parse_exports(output, "device")


class MountInfo(FactBase):
    """
    Every mount from ``/proc/self/mountinfo``, by mount point: its device, filesystem type, the
    path inside the filesystem it shows (``/@home`` for a btrfs subvolume, ``/nix`` for a bind
    mount of a folder) and its options (the mount's and the filesystem's).

    .. code:: python

        {"/mnt/home": {"device": "/dev/mapper/cryptroot", "fstype": "btrfs", "root": "/@home",
                       "options": ["rw", "noatime", "compress=zstd:3", "subvol=/@home"],
                       "mount_options": ["rw", "noatime"]}}
    """

    default = dict

    def command(self) -> str:
        return "cat /proc/self/mountinfo"

    def process(self, output) -> dict:
        return parse_mountinfo(output)


def parse_mountinfo(lines) -> dict:
    mounts = {}
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        options = fields[5].split(",") + [o for o in tail[2].split(",") if o not in fields[5].split(",")]
        mounts[decode_octal(fields[4])] = {"device": decode_octal(tail[1]), "fstype": tail[0],
                                           "root": decode_octal(fields[3]), "options": options,
                                           "mount_options": fields[5].split(",")}
    return mounts


class ZfsPools(FactBase):
    """The ZFS pools this system has imported, and those ``zpool import`` finds it could import
    (exported, or not imported yet); both empty without the zfs module.

    .. code:: python

        {"imported": ["rpool-1a2b3c4d"], "exported": []}
    """

    @staticmethod
    def default():
        return {"imported": [], "exported": []}

    def command(self) -> str:
        return ("if test -e /sys/module/zfs; then zpool list -H -o name 2>/dev/null; echo '--'; "
                "zpool import 2>/dev/null | awk '$1 == \"pool:\" {print $2}'; fi; true")

    def process(self, output) -> dict:
        lines = [line.strip() for line in output if line.strip()]
        cut = lines.index("--") if "--" in lines else len(lines)
        return {"imported": lines[:cut], "exported": [p for p in lines[cut + 1:] if p not in lines[:cut]]}


@dataclass
class Found:
    """What the target holds, as adopt.py read it; ``root``: where the installed system is mounted."""

    root: str
    devices: list[dict]                          # BlockDevices
    ids: dict[str, str]                          # DiskIds
    mounts: dict[str, dict]                      # MountInfo
    pools: list[str]                             # imported ZFS pools
    exported_pools: list[str] = field(default_factory=list)
    facts: dict[tuple, object] = field(default_factory=dict)   # what the layers asked (adopt_reads)

    def fact(self, fact, **kwargs):
        """A value a layer's ``adopt_reads`` asked for (read in the survey's second batch)."""
        return self.facts[request_key(fact, kwargs)]

    # --- the questions the layers ask -------------------------------------------------------------

    def device(self, name: str) -> dict | None:
        return next((d for d in self.devices if d["name"] == name), None)

    def children(self, name: str) -> list[dict]:
        return [d for d in self.devices if d["parent"] == name]

    def descendants(self, name: str) -> list[dict]:
        """Its partitions, their mappings, and so on down."""
        below = []
        for child in self.children(name):
            below += [child, *self.descendants(child["name"])]
        return below

    def in_use_outside(self, name: str) -> list[str]:
        """Where a disk (or what it holds) is mounted outside the installed system: the running
        live system's own disk, never part of an adopted profile (``/run/tabula``: Tabula's own)."""
        paths = []
        for dev in [self.device(name) or {}, *self.descendants(name)]:
            for mp in dev.get("mountpoints", []):
                inside = self.root == "/" or mp == self.root or mp.startswith(self.root + "/")
                if not inside and mp != "[SWAP]" and not mp.startswith("/run/tabula"):
                    paths.append(mp)
        return paths

    def stable_id(self, name: str) -> str | None:
        """The by-id path of a disk: the one naming its serial when there is one (what a user
        reads on the label), else the first in order; never a partition's."""
        links = sorted(link for link, real in self.ids.items() if real == name and "-part" not in link)
        serial = (self.device(name) or {}).get("serial") or ""
        named = [link for link in links if serial and link.endswith(serial)]
        return (named or [link for link in links if not link.rsplit("/", 1)[-1].startswith(("wwn-", "nvme-eui."))]
                or links or [None])[0]

    def installed_mounts(self) -> dict[str, dict]:
        """The mounts of the installed system, by their mount point in it ("/", "/home"...)."""
        if self.root == "/":            # the booted system: not its kernel's and systemd's own mounts
            return {mp: m for mp, m in self.mounts.items()
                    if not any(mp == p or mp.startswith(p + "/") for p in RUNTIME_MOUNTS)}
        found = {}
        for path, mount in self.mounts.items():
            if path == self.root or path.startswith(self.root + "/"):
                found[path[len(self.root):] or "/"] = mount
        return found

    def mounts_of(self, device: str) -> dict[str, dict]:
        """The installed system's mounts of one block device (by the kernel's name or a link to it)."""
        real = self.real(device)
        return {mp: m for mp, m in self.installed_mounts().items() if self.real(m["device"]) == real}

    def real(self, device: str) -> str:
        if device in self.ids:
            return self.ids[device]
        return device                       # (lsblk -p lists a mapping as /dev/mapper/<name>, as mounts do)


def survey(run: Run, root: str) -> Found:
    devices, ids, mounts, pools, probed = run.read_many([(BlockDevices, {}), (DiskIds, {}), (MountInfo, {}),
                                                         (ZfsPools, {}), (Signatures, {})])
    for device in devices:              # what the device itself holds, over udev's record of it
        seen = probed.get(device["name"], {})
        device["fstype"] = seen.get("TYPE") or (None if seen.get("PTTYPE") else device["fstype"])
        device["label"] = seen.get("LABEL") or (None if seen else device["label"])
    found = Found(root=root, devices=devices, ids=ids, mounts=mounts, pools=pools["imported"],
                  exported_pools=pools["exported"])
    asked: list[FactRequest] = [request for layer in run.layers for request in layer.adopt_reads(found)]
    for (fact, kwargs), value in zip(asked, run.read_many(asked)):
        found.facts[request_key(fact, kwargs)] = value
    return found
