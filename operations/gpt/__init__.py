"""
The gpt layer: GPT partition tables, every partition of a profile disk by partlabel, sgdisk type
code, size and order. A table that is a prefix of the wanted one (an interrupted run) gets the
missing partitions; anything else is drift that the guard refuses (or wipes, when confirmed).
The type codes it knows are its own table (``operations.gpt.types``), which the profile model
checks codes against when a profile loads.

    gpt.compare(disk, table)        # the one rule: the guard, the step and verify ask it
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyinfra.api import FactBase, QuoteString, StringCommand

from operations.adoptlit import size_text
from operations.contract import Layer, Target
from operations.diskolit import disko_size
from operations.errors import TabulaError
from operations.gpt.types import GPT_TYPE_GUIDS, type_guid
from operations.nixlit import DeviceIds, NixFragments
from operations.run import FactRequest, Made, Run, one_command, operation
from operations.run import script as shell_script
from operations.target import WholeDiskSignature

if TYPE_CHECKING:       # (the profile model imports this layer's type table: no import at run time)
    from operations.profile import Disk, Partition, Profile

TYPE_GUIDS = GPT_TYPE_GUIDS
# How far a "rest" partition may end before the disk's last usable sector (sgdisk aligns to 1 MiB).
REST_SLACK_BYTES = 1024**2


# --- facts ------------------------------------------------------------------------------------


class PartitionTable(FactBase):
    """
    The partition table of a disk (given by any path, resolved on the target), read from the disk
    itself: ``blkid -p`` for the table type, ``sgdisk -p`` for a GPT's entries (sgdisk is needed
    to partition anyway; sfdisk is missing from many live systems). None when the disk has no
    partition table or is absent.

    .. code:: python

        {"label": "gpt", "sectorsize": 512, "lastlba": 33554398,
         "partitions": [{"node": "/dev/nvme0n1p1", "number": 1, "start": 2048, "size": 2097152,
                         "code": "EF00", "name": "EFI"}]}
    """

    def command(self, disk: str) -> str:
        quoted = shlex.quote(disk)
        # Without sgdisk every disk would look blank: fail the fact (and the run) instead.
        return ("command -v sgdisk >/dev/null || { echo 'tabula: sgdisk (gdisk) is missing on the target' >&2; "
                f"exit 1; }}; if [ -b {quoted} ]; then d=$(readlink -f {quoted}); echo device=$d; "
                "echo sectorsize=$(blockdev --getss \"$d\"); "
                "pt=$(blkid -p -o value -s PTTYPE \"$d\" 2>/dev/null); echo pttype=$pt; "
                "if [ \"$pt\" = gpt ]; then sgdisk -p \"$d\"; fi; fi")

    def process(self, output):
        return parse_partition_table(output)


_ENTRY_RE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+\s+\S+\s+([0-9A-Fa-f]{4})(?:  (.*))?$")
_LAST_RE = re.compile(r"last usable sector is (\d+)")


def partition_node(disk: str, number: int) -> str:
    """/dev/nvme0n1 + 1 -> /dev/nvme0n1p1, /dev/vda + 1 -> /dev/vda1 (the kernel's naming)."""
    return f"{disk}{'p' if disk[-1:].isdigit() else ''}{number}"


def parse_partition_table(lines) -> dict | None:
    info: dict = {}
    partitions = []
    lastlba = None
    in_entries = False
    for line in lines:
        if not in_entries and "=" in line and line.split("=", 1)[0] in ("device", "sectorsize", "pttype"):
            key, value = line.split("=", 1)
            info[key] = value.strip()
            continue
        match = _LAST_RE.search(line)
        if match:
            lastlba = int(match.group(1))
        if line.startswith("Number  Start"):
            in_entries = True
            continue
        match = _ENTRY_RE.match(line) if in_entries else None
        if match:
            number, start, end, code, label = match.groups()
            partitions.append({
                "node": partition_node(info.get("device", ""), int(number)),
                "number": int(number),
                "start": int(start),
                "size": int(end) - int(start) + 1,
                "code": code.upper(),
                "name": (label or "").rstrip(),
            })
    if not info.get("pttype"):
        return None
    table = {"label": info["pttype"], "device": info.get("device"),
             "sectorsize": int(info.get("sectorsize") or 512), "partitions": partitions}
    if lastlba is not None:
        table["lastlba"] = lastlba
    return table


# --- comparing --------------------------------------------------------------------------------


@dataclass
class Comparison:
    present: int = 0                                   # wanted partitions already there, in order
    problems: list[str] = field(default_factory=list)  # drift: what does not match


def compare(disk: Disk, table: dict | None) -> Comparison:
    """Compare the full spec (label, type GUID, size, order) with an sfdisk table."""
    if table is None:
        return Comparison()
    if table.get("label") != "gpt":
        return Comparison(problems=[f"a {table.get('label')} partition table, not GPT"])
    existing = table["partitions"]
    sector = table["sectorsize"]
    result = Comparison()
    if len(existing) > len(disk.partitions):
        extra = ", ".join(f"{p['node']} ({p['name'] or 'no label'})" for p in existing[len(disk.partitions):])
        result.problems.append(f"partitions the profile does not have: {extra}")
    for number, (want, have) in enumerate(zip(disk.partitions, existing), start=1):
        problem = _partition_problem(number, want, have, table, sector)
        if problem:
            result.problems.append(problem)
    if not result.problems:
        result.present = len(existing)
    return result


def _partition_problem(number: int, want: Partition, have: dict, table: dict, sector: int) -> str | None:
    where = f"partition {number} ({have['node']})"
    if have["number"] != number:
        return f"{where} is entry {have['number']}, the profile wants {want.label} as entry {number}"
    if have["name"] != want.label:
        return f"{where} is labelled {have['name']!r}, the profile wants {want.label!r}"
    if have["code"] != want.type:
        return f"{where} {want.label} has type {have['code']}, the profile wants {want.type}"
    size = have["size"] * sector
    if want.size_bytes is not None and size != want.size_bytes:
        return f"{where} {want.label} has {size} bytes, the profile wants {want.size} ({want.size_bytes} bytes)"
    if want.size_bytes is None and "lastlba" in table:
        end = have["start"] + have["size"] - 1
        if (table["lastlba"] - end) * sector > REST_SLACK_BYTES:
            return f"{where} {want.label} ends at sector {end}, the profile wants it to fill the disk (size: rest)"
    return None


def describe(disk: Disk, partitions: list[Partition] | None = None) -> str:
    return ", ".join(f"{p.label} ({p.type.lower()}, {p.size})" for p in (disk.partitions if partitions is None else partitions))


# --- operations -------------------------------------------------------------------------------


@operation()
def partitions(run: Run, disk_key: str, disk: Disk):
    """
    Create the GPT partitions of a profile disk that are not there yet, then wait for udev to
    publish their /dev/disk/by-partlabel links (later facts and commands use them).

    + run: the run (facts, what it made)
    + disk_key: the disk's key in the profile (for messages)
    + disk: the profile's Disk (stable path, partitions in order)

    **Example:**

    .. code:: python

        gpt.partitions(run, disk_key="main", disk=profile.disks["main"])
    """
    table = None if run.before_wipe() else run.read(PartitionTable, disk=disk.device)
    comparison = compare(disk, table)
    if comparison.problems:
        raise TabulaError(f"disks.{disk_key}: the partition table of {disk.device} does not match the profile "
                          "(drift): " + "; ".join(comparison.problems))
    if comparison.present == len(disk.partitions):
        run.noop(f"{disk.device} already has the GPT partitions {describe(disk)}")
        return
    sector = table["sectorsize"] if table else None
    args: list = ["sgdisk"]
    if table is None:
        args.append("--clear")                       # a new, empty GPT (the guard saw a blank disk)
    for number, part in enumerate(disk.partitions[comparison.present:], start=comparison.present + 1):
        type_guid(part.type)
        if part.size_bytes is None:
            end = "0"
        elif sector:
            end = f"+{part.size_bytes // sector}"    # sectors: exact, no unit rounding
        else:
            end = f"+{part.size_bytes // 1024}K"
        args += ["-n", f"{number}:0:{end}", "-t", f"{number}:{part.type}", "-c", QuoteString(f"{number}:{part.label}")]
    args.append(QuoteString(disk.device))
    new = disk.partitions[comparison.present:]
    run.tell(f"{'a new GPT on ' if table is None else ''}{disk.device}: partitions {describe(disk, new)}"
         + (f" after {describe(disk, disk.partitions[:comparison.present])}" if comparison.present else ""))
    run.record_created(*(Made.device(part.device) for part in new))
    yield one_command(StringCommand(*args), settle_command([p.device for p in disk.partitions], disk.device))


def settle_command(links: list[str], disk_path: str) -> StringCommand:
    """Tell the kernel about new partitions, let udev settle, and wait for the by-partlabel links."""
    waits = " ".join(shlex.quote(link) for link in links)
    script = (
        f"partx -u {shlex.quote(disk_path)} 2>/dev/null; udevadm settle; "
        f"for link in {waits}; do n=0; until [ -e \"$link\" ]; do n=$((n+1)); "
        "if [ $n -gt 150 ]; then echo \"tabula: $link did not appear after partitioning\" >&2; exit 1; fi; "
        "sleep 0.2; udevadm settle; done; done"
    )
    return shell_script(script)


# --- the layer ------------------------------------------------------------------------------------


def adopted_entry_problem(position: int, entry: dict) -> str | None:
    """Why a GPT entry cannot be a profile's partition, or None."""
    if entry["number"] != position:
        return f"GPT entry {entry['number']} in place {position}: a profile's partitions are entries 1, 2, ... in order"
    if not entry["name"]:
        return "no GPT partition name: a profile finds its partitions by their names (partlabels)"
    if entry["code"].upper() not in GPT_TYPE_GUIDS:
        return f"GPT type code {entry['code']} is not one Tabula knows (operations/gpt/types.py)"
    return None


class GptLayer(Layer):
    name = "gpt"
    absent = "no disk"

    def make(self, run: Run) -> None:
        for key, disk in run.profile.disks.items():
            partitions(run, disk_key=key, disk=disk, name=f"GPT disks.{key}")

    def adopt_reads(self, found) -> list[FactRequest]:
        return [(PartitionTable, {"disk": d["name"]}) for d in found.devices if d["type"] == "disk"]

    def adopt(self, found, draft) -> None:
        """Each disk with a GPT (by its stable id), its entries in order with their names, type
        codes and sizes (``rest`` for a last one filling the disk); a disk of the running live
        system is left alone, a blank one skipped."""
        number = 0
        for disk in [d for d in found.devices if d["type"] == "disk"]:
            name, table = disk["name"], found.fact(PartitionTable, disk=disk["name"])
            if name.startswith("/dev/zram"):
                continue                    # compressed swap in RAM (a booted NixOS's zramSwap), no disk
            in_use = found.in_use_outside(name)
            if in_use:
                draft.infer(f"{name} left out: the running system uses it ({', '.join(in_use)})")
                continue
            if table is None:
                if disk["fstype"]:
                    draft.refuse(name, f"{disk['fstype']} on the whole disk, no partition table: Tabula describes "
                                       "GPT partitions")
                continue
            if table["label"] != "gpt":
                draft.refuse(name, f"a {table['label']} partition table: Tabula describes GPT only")
                continue
            device = found.stable_id(name)
            if device is None:
                draft.refuse(name, "no /dev/disk/by-id link: a profile names its disks by a stable id")
                continue
            partitions = []
            for position, entry in enumerate(table["partitions"], start=1):
                problem = adopted_entry_problem(position, entry)
                if problem:
                    draft.refuse(entry["node"], f"{problem} (the disk {name} is left out)")
                    break
                size = entry["size"] * table["sectorsize"]
                end = entry["start"] + entry["size"] - 1
                last = position == len(table["partitions"])
                fills = last and "lastlba" in table and (table["lastlba"] - end) * table["sectorsize"] <= REST_SLACK_BYTES
                partitions.append({"label": entry["name"], "type": entry["code"].lower(),
                                   "size": "rest" if fills else size_text(size), "kernel_name": entry["node"]})
            else:
                number += 1
                node = {"device": device}
                if disk["serial"]:
                    node["serial"] = disk["serial"]
                draft.disks[f"disk{number}"] = node | {"partitions": partitions}

    def applies(self, profile: Profile) -> bool:
        return bool(profile.disks)

    def owns(self, node) -> bool:
        return False            # it holds the partitions; their content is the other layers'

    def tools(self, profile: Profile) -> dict[str, str]:
        return {}               # sgdisk and the probes are every run's (the guard's base commands)

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        return {}

    def observe(self, run: Run) -> list[FactRequest]:
        return [(PartitionTable, {"disk": disk.device}) for disk in run.profile.disks.values()]

    def problems(self, target: Target) -> list[str]:
        """Each profile disk's partition table as the profile says (labels, type codes, sizes,
        order), and each partition found by its partlabel with its GPT type GUID."""
        failures = []
        for key, disk in target.settings.profile.disks.items():
            table = target.read(PartitionTable, disk=disk.device)
            if table is None:
                failures.append(f"disks.{key} {disk.device}: no GPT partition table (or no such disk)")
                continue
            comparison = compare(disk, table)
            failures += [f"disks.{key} {disk.device}: {problem}" for problem in comparison.problems]
            if not comparison.problems and comparison.present < len(disk.partitions):
                missing = ", ".join(p.label for p in disk.partitions[comparison.present:])
                failures.append(f"disks.{key} {disk.device}: partitions missing: {missing}")
            for number, part in enumerate(disk.partitions, start=1):
                probed = target.read(WholeDiskSignature, device=part.device)
                if not probed:
                    failures.append(f"{part.device}: missing (disks.{key} partition {number})")
                    continue
                want = type_guid(part.type).lower()
                have = probed.get("PART_ENTRY_TYPE", "").lower()
                if have != want:
                    failures.append(f"{part.device}: type GUID {have or 'none'}, the profile wants {want} ({part.type})")
                if probed.get("PART_ENTRY_NAME") != part.label:
                    failures.append(f"{part.device}: partlabel {probed.get('PART_ENTRY_NAME')!r}, not {part.label!r}")
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        return NixFragments()

    def gaps(self, run: Run, root: str) -> tuple[list, list[str]]:
        return [], []

    def disko(self, profile: Profile, context) -> dict:
        """Each disk with its GPT; each partition with its label and type as sgdisk writes them
        (priority keeps the profile's order) and its content, from the layer that owns it."""
        return {"disk": {key: {"type": "disk", "device": disk.device,
                               "content": {"type": "gpt",
                                           "partitions": {part.label: _partition_node(part, index, context)
                                                          for index, part in enumerate(disk.partitions)}}}
                         for key, disk in profile.disks.items()}}

    def disko_node(self, node, device: str, part, context) -> dict | None:
        return None


def _partition_node(part: Partition, index: int, context) -> dict:
    node = {"label": part.label, "type": part.type,
            "size": "100%" if part.size == "rest" else disko_size(part.size_bytes),
            "priority": index + 1}
    content = context.content(part.content, part.device, part) if part.content else None
    if content:
        node["content"] = content
    return node


LAYER = GptLayer()
