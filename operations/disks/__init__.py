"""
Disk identity and the safety guard: which real device each profile disk is, and whether it may
be touched at all. Runs first, at prepare time, from facts only: a refusal raises TabulaError
before any operation executes.

A disk is refused when it is absent, smaller than declared, has another serial than declared,
is named twice, holds the running system, is in use by anything that is not this profile's own
expected state (re-runs must converge: the profile's own partitions mounted under /mnt, its own
LUKS mappings open and its own swap active are fine), or holds foreign content (a partition
table or signature that does not match the profile, by the gpt layer's own rule) that the run
has not confirmed for wiping by the disk's stable id (``tabula_confirm_wipe``). A confirmed
foreign disk is wiped (``wipefs -a`` on its partitions and itself, ``sgdisk --zap-all``), never
a mounted one.

The guard reads in one round trip what it needs, and, when the disks already hold partitions
(a re-run), in a second one their signatures together with every layer's ``observe``: a
converged re-run then reads nothing else.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

from pyinfra.api import QuoteString, StringCommand

from operations import gpt
from operations.disks.describe import DiskCheck, describe_signature, found_on_disk, human_size
from operations.disks.facts import (BlockDevices, ImportedPoolVdevs, StablePath, ToolsPresent, ZfsPoolsFound,
                                    parse_lsblk, parse_pools_found, parse_stable_path)
from operations.errors import TabulaError
from operations.layers import LAYERS
from operations.mounts import ActiveSwaps, Mounts
from operations.profile import Profile
from operations.run import FactRequest, Run, operation
from operations.target import PRIVATE_MOUNT_ROOT, WholeDiskSignature, install_path

__all__ = ["BlockDevices", "ImportedPoolVdevs", "StablePath", "ToolsPresent", "ZfsPoolsFound", "parse_lsblk",
           "parse_pools_found", "parse_stable_path", "ActiveSwaps", "WholeDiskSignature", "DiskCheck",
           "describe_signature", "found_on_disk", "human_size", "guard", "wipe", "required_tools", "tools_request",
           "missing_tools", "usage_problems", "content_problems", "BASE_COMMANDS", "OPTIONAL_COMMANDS"]


def _field(key: str) -> str:
    return f"disks.{key}.device"


def _tree_of(device: str, devices: list[dict]) -> list[dict]:
    names = {device}
    tree = [d for d in devices if d["name"] == device][:1]
    changed = True
    while changed:
        changed = False
        for dev in devices:
            if dev["parent"] in names and dev["name"] not in names:
                names.add(dev["name"])
                tree.append(dev)
                changed = True
    return tree


def expected_mountpoints(profile: Profile) -> set[str]:
    return {install_path(m.mountpoint) for m in profile.all_mounts()}


def usage_problems(profile: Profile, check: DiskCheck, swaps: list[str], pool_vdevs: dict[str, str]) -> list[str]:
    """Everything on the disk that is in use and is not this profile's own expected state."""
    own_mounts = expected_mountpoints(profile)
    own_mappers = {luks.mapper: part.label for part, luks in profile.luks_devices()}
    own_pools = {pool.name for pool in profile.pools.values()}
    swap_devices = {d["name"] for d in check.tree}
    problems = []
    for dev in check.tree:
        for mp in dev["mountpoints"]:
            if mp == "/":
                problems.append(f"{dev['name']} holds the running system (mounted at /)")
            elif mp == "[SWAP]":
                continue  # judged below from /proc/swaps
            elif mp not in own_mounts and not mp.startswith(PRIVATE_MOUNT_ROOT + "/"):
                problems.append(f"{dev['name']} is mounted at {mp}")
        if dev["type"] == "crypt":
            mapper = dev["name"].removeprefix("/dev/mapper/")
            parent = next((d for d in check.tree if d["name"] == dev["parent"]), None)
            if own_mappers.get(mapper) is None or parent is None or parent.get("partlabel") != own_mappers[mapper]:
                problems.append(f"{dev['name']} is an open mapping on {dev['parent']} that the profile does not declare")
        elif dev["type"] not in ("disk", "part", "crypt"):
            problems.append(f"{dev['name']} ({dev['type']}) is stacked on {dev['parent']}")
        if pool_vdevs.get(dev["name"]) and pool_vdevs[dev["name"]] not in own_pools:
            problems.append(f"{dev['name']} belongs to the imported ZFS pool {pool_vdevs[dev['name']]}")
    own_swaps = {device for device, _swap in profile.swaps()}
    for swap in swaps:
        if swap in swap_devices and not _is_own_swap(swap, check, own_swaps):
            problems.append(f"{swap} is active swap")
    return problems


def _is_own_swap(swap: str, check: DiskCheck, own_swaps: set[str]) -> bool:
    dev = next((d for d in check.tree if d["name"] == swap), None)
    if dev is None:
        return False
    return any(own.endswith("/" + (dev.get("partlabel") or "\0")) or own == dev["name"] for own in own_swaps)


def content_problems(check: DiskCheck, table: dict | None, signatures: dict[str, dict],
                     pools: dict | None = None) -> list[str]:
    """Why the disk's content is foreign to the profile (empty: blank, or the profile's own)."""
    whole = signatures.get(check.device, {})
    size = next((d.get("size") for d in check.tree if d["name"] == check.device), None)
    if whole.get("TYPE"):
        return [f"a whole-disk {describe_signature(whole, size, pools)}"]
    if whole.get("PTTYPE") and whole["PTTYPE"] != "gpt":
        return [f"a {whole['PTTYPE']} partition table"]
    if not table:
        return []
    mismatch = gpt.compare(check.disk, table)
    if mismatch.problems:
        return mismatch.problems
    problems = []
    sizes = {d["name"]: d.get("size") for d in check.tree}
    for part, existing in zip(check.disk.partitions, table.get("partitions", [])):
        signature = signatures.get(existing["node"], {})
        found = signature.get("TYPE")
        if found and found not in (part.content.signatures if part.content else set()):
            problems.append(f"partition {existing['node']} ({part.label}) holds "
                            f"{describe_signature(signature, sizes.get(existing['node']), pools)}; the profile puts "
                            f"{type(part.content).__name__.lower() if part.content else 'nothing'} there")
    return problems


# What every run uses on the target: partitioning, probing, mounting, the NixOS files (one
# base64 tar), host keys, and the NixOS installer's own generator.
BASE_COMMANDS = ("sgdisk", "wipefs", "blkid", "lsblk", "udevadm", "blockdev", "mount", "umount", "mountpoint",
                 "base64", "tar", "sha256sum", "ssh-keygen", "nixos-generate-config")
# Looked for too, but not required: with nix the target can evaluate the configuration first.
OPTIONAL_COMMANDS = ("nix",)


def required_tools(profile: Profile, install: bool, layers: tuple = LAYERS) -> dict[str, str]:
    """{command or "<name> kernel module": what needs it} for this profile's stages."""
    needed = {c: "every run" for c in BASE_COMMANDS}
    for layer in layers:
        needed.update(layer.tools(profile))
    if install:
        needed["nixos-install"] = "the install (tabula_install)"
    return needed


def tools_request(profile: Profile, install: bool, layers: tuple = LAYERS) -> FactRequest:
    """The ToolsPresent read of the guard (asked again with the same arguments, it is kept)."""
    needed = required_tools(profile, install, layers)
    commands = sorted({c for c in needed if not c.endswith(" kernel module")} | set(OPTIONAL_COMMANDS))
    modules = sorted(c.removesuffix(" kernel module") for c in needed if c.endswith(" kernel module"))
    return ToolsPresent, {"commands": commands, "modules": modules}


def missing_tools(profile: Profile, install: bool, present: dict, layers: tuple = LAYERS) -> list[str]:
    """What the target lacks of what the profile's stages need, each with what needs it."""
    have = set(present["commands"]) | {f"{m} kernel module" for m in present["modules"]}
    return [f"{tool} (for {why})" for tool, why in required_tools(profile, install, layers).items() if tool not in have]


def guard(run: Run, rescue: bool = False) -> list[DiskCheck]:
    """
    Refuse the run (TabulaError) unless every profile disk is the right, free disk. Confirmed
    foreign disks get a wipe operation. Returns what it found, for the plan.

    + run: the run (its profile and settings: the disks confirmed for wiping, whether it installs)
    + rescue: a rescue never wipes, whatever tabula_confirm_wipe says, and never installs
    """
    profile, settings, host = run.profile, run.settings, run.host
    confirmed = () if rescue else settings.tabula_confirm_wipe
    # Everything the checks read about the disks, in one round trip (the partition tables are
    # kept for the partitioning stage, which reads them next).
    disks = list(profile.disks.values())
    install = settings.tabula_install and not rescue
    tools, devices, swaps, pool_vdevs, _mounts, *per_disk = run.read_many(
        [tools_request(profile, install, run.layers), (BlockDevices, {}), (ActiveSwaps, {}), (ImportedPoolVdevs, {}),
         (Mounts, {})]
        + [(StablePath, {"path": disk.device}) for disk in disks]
        + [(gpt.PartitionTable, {"disk": disk.device}) for disk in disks]
        + [(WholeDiskSignature, {"device": disk.device}) for disk in disks]
        + ([] if rescue else [read for layer in run.layers for read in layer.refusal_reads(run)]))
    stable_paths = dict(zip(profile.disks, per_disk[:len(disks)]))
    missing = missing_tools(profile, install, tools, run.layers)
    if missing:
        raise TabulaError(f"{host.name} lacks what this profile's stages need, so nothing was touched:\n    "
                          + "\n    ".join(missing) +
                          "\n  Run from the NixOS installer (it has them all), or install what is missing.")
    refusals = [] if rescue else [line for layer in run.layers for line in layer.refusals(run)]
    if refusals:
        raise TabulaError(f"{host.name} cannot take this profile as it is, so nothing was touched:\n    "
                          + "\n    ".join(refusals))
    checks: list[DiskCheck] = []
    for key, disk in profile.disks.items():
        found = stable_paths[key]
        if not found["device"]:
            present = "\n    ".join(f"/dev/disk/by-id/{p}" for p in found["by_id"]) or "(none)"
            raise TabulaError(f"{_field(key)}: {disk.device} does not exist on {host.name} "
                              f"(tabula_vars['disk'] or the profile's disk var). Disks present by id:\n    {present}")
        info = next((d for d in devices if d["name"] == found["device"]), None)
        if info is None or info["type"] != "disk":
            raise TabulaError(f"{_field(key)}: {disk.device} is {found['device']}, which is not a whole disk")
        if disk.size_bytes is not None and (info["size"] or 0) < disk.size_bytes:
            raise TabulaError(f"disks.{key}.size: {disk.device} has {info['size']} bytes, "
                              f"less than the declared {disk.size} ({disk.size_bytes} bytes)")
        if disk.serial is not None and info["serial"] != disk.serial:
            raise TabulaError(f"disks.{key}.serial: {disk.device} has serial {info['serial']!r}, "
                              f"the profile declares {disk.serial!r}")
        checks.append(DiskCheck(key, disk, found["device"], info["serial"], _tree_of(found["device"], devices)))

    seen: dict[str, str] = {}
    for check in checks:
        if check.device in seen:
            raise TabulaError(f"{_field(check.key)} and {_field(seen[check.device])} are the same disk ({check.device})")
        seen[check.device] = check.key

    _check_partlabel_clash(run, checks, devices)

    # The partitions' signatures (known once lsblk has named them), in one more round trip; with
    # them, what every layer's steps read when the disks already hold the layout (a re-run).
    partitions = [(WholeDiskSignature, {"device": d["name"]}) for check in checks for d in check.tree if d["type"] == "part"]
    if partitions:
        run.read_many(partitions + ([] if rescue else [read for layer in run.layers for read in layer.observe(run)]))
    for check in checks:
        table = run.read(gpt.PartitionTable, disk=check.disk.device)
        signatures = {d["name"]: run.read(WholeDiskSignature, device=check.disk.device if d["type"] == "disk" else d["name"])
                      for d in check.tree if d["type"] in ("disk", "part")}
        # The pools' names and states, read only when a ZFS member is there to describe.
        members = any(sig.get("TYPE") == "zfs_member" for sig in signatures.values())
        pools = run.read(ZfsPoolsFound) if members else {}
        problems = usage_problems(profile, check, swaps, pool_vdevs)
        if problems:
            raise TabulaError(f"{_field(check.key)}: refusing {check.disk.device} ({check.device}): it is in use, "
                              "and a disk in use is never touched, confirmed or not:\n    " + "\n    ".join(problems) +
                              "\n  What is on it:\n    " + "\n    ".join(found_on_disk(check, signatures, pools)))
        check.foreign = content_problems(check, table, signatures, pools)
        if not check.foreign:
            continue
        found = found_on_disk(check, signatures, pools)
        ids = {check.disk.device, check.serial} - {None}
        if not ids & set(confirmed):
            raise TabulaError(
                f"{_field(check.key)}: refusing {check.disk.device} ({check.device}): it holds content the profile "
                "does not describe:\n    " + "\n    ".join(check.foreign) +
                "\n  What is on it:\n    " + "\n    ".join(found) +
                f"\n  To wipe this disk, confirm it by its stable id: --data "
                f"tabula_confirm_wipe='[\"{check.disk.device}\"]'")
        partitions = [d["name"] for d in check.tree if d["type"] == "part"]
        run.plan_wipe(check.disk.device)
        wipe(run, disk_path=check.disk.device, partitions=partitions, reasons=check.foreign, holds=found,
             name=f"Wipe disks.{check.key}")
    return checks


def _check_partlabel_clash(run: Run, checks: list[DiskCheck], devices: list[dict]) -> None:
    profile, host = run.profile, run.host
    labels = {part.label for _, _, part in profile.partitions()}
    ours = {d["name"] for check in checks for d in check.tree}
    for dev in devices:
        # the host hash is in every label of the profile: a foreign partition carrying it clashes too
        if (dev["partlabel"] in labels or profile.hash in (dev["partlabel"] or "")) and dev["name"] not in ours:
            raise TabulaError(f"partlabel {dev['partlabel']!r} of the profile is already used by {dev['name']} on "
                              f"{host.name}, which is not one of the profile's disks: /dev/disk/by-partlabel would be "
                              "ambiguous. Rename that partition or pick other labels.")
    if not _is_local_connector(host) and shutil.which("lsblk"):
        local = subprocess.run(["lsblk", "-J", "-p", "-o", "NAME,TYPE,PARTLABEL"], capture_output=True, text=True)
        if local.returncode == 0:
            for dev in parse_lsblk(local.stdout):
                if dev["partlabel"] in labels or profile.hash in (dev["partlabel"] or ""):
                    raise TabulaError(f"partlabel {dev['partlabel']!r} of the profile is used by {dev['name']} on this "
                                      "controller: a disk moved between them would make by-partlabel ambiguous. "
                                      "Rename that partition or pick other labels.")


def _is_local_connector(host) -> bool:
    return host.name.startswith("@local") or type(host.connector).__name__ == "LocalConnector"


# --- operations -------------------------------------------------------------------------------


@operation(is_idempotent=False)
def wipe(run: Run, disk_path: str, partitions: list[str], reasons: list[str], holds: list[str] = ()):
    """
    Wipe a disk the run confirmed by its stable id: every signature on its partitions and on the
    disk, then the partition tables (GPT and its backup). Only the guard calls this, and only for
    a disk it found foreign and not in use.

    + run: the run
    + disk_path: the disk's stable path (/dev/disk/by-id/...)
    + partitions: the disk's partition devices, as the guard found them
    + reasons: what was foreign about it
    + holds: what is on it, as the guard describes it (told in the plan and the run's output)

    **Example:**

    .. code:: python

        disks.wipe(run, disk_path="/dev/disk/by-id/nvme-X", partitions=["/dev/nvme0n1p1"], reasons=["ext4"],
                   holds=["/dev/nvme0n1p1 (partlabel 'data'): ext4 filesystem labelled 'photos', ..."])
    """
    run.tell(f"wipe {disk_path} (confirmed), which holds: " + "; ".join(holds or reasons))
    for part in partitions:
        yield StringCommand("wipefs", "-a", QuoteString(part))
    disk = QuoteString(disk_path)
    yield StringCommand("wipefs", "-a", disk)
    yield StringCommand("sgdisk", "--zap-all", disk)
    yield StringCommand("wipefs", "-a", disk)   # sgdisk leaves a protective MBR behind
    yield StringCommand("sh", "-c", QuoteString(f"blockdev --rereadpt {shlex.quote(disk_path)}; udevadm settle"))
