"""
disko export: the profile as a disko ``disko.devices`` configuration (``disko.nix``).

Pure functions of the profile model, no I/O: one per node type, each returning the node as
plain data (dicts, lists, strings), which ``nix_value`` prints as Nix. ``render(profile)`` is
the whole file; ``tools/render.py`` writes it beside the NixOS files.

    from operations import disko
    text = disko.render(profile)     # a NixOS module: { disko.devices = ...; fileSystems... }

What disko (the 2024-11 snapshot of the offline kit) has no node option for is done the way a
disko user would do it, and said in the file and in the README:

- the blank snapshots (btrfs ``@root-blank``, ZFS ``@empty``): a preCreateHook notes whether the
  subvolume or dataset exists, the postCreateHook takes the snapshot only when it did not, i.e.
  right after it was created empty (never later, as Tabula);
- a ZFS log vdev (SLOG): no ``topology.log`` in this disko: the pool's postCreateHook adds it;
- ``neededForBoot`` and bind mounts: plain ``fileSystems`` next to ``disko.devices`` (disko has
  no such option and no bind node); the binds are made at install time by a postMountHook of the
  node mounted where their source lies.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from operations.errors import TabulaError
from operations.luks import format_args as luks_format_args
from operations.nixlit import nix_attr, nix_indented_string, nix_string
from operations.profile import (Bind, Dataset, Disk, Filesystem, Luks, Partition, Pool, Profile, Subvolume, Swap,
                                Swapfile, Tmpfs, ZfsMember)

# mkfs's label flag by format (as operations/filesystems.py formats them).
LABEL_FLAGS = {"vfat": "-n", "btrfs": "-L", "f2fs": "-l", "ext4": "-L"}
EMPTY_SNAPSHOT = "empty"


class DiskoError(TabulaError):
    """The profile holds something the disko export cannot express."""


@dataclass(frozen=True)
class Expr:
    """Nix text printed as it is (e.g. an interpolating ''-string)."""

    text: str


@dataclass(frozen=True)
class Script:
    """Shell lines printed as a Nix ''-string. With ``root``, the first line sets ``$root`` to
    disko's rootMountPoint (where the install is mounted, /mnt by default)."""

    text: str
    root: bool = False


# --- printing Nix ---------------------------------------------------------------------------------


def nix_value(value, level: int = 0) -> str:
    """Python data as a Nix expression, attribute sets one binding a line, indented by two."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, Expr):
        return value.text
    if isinstance(value, Script):
        text = nix_indented_string(value.text, inner)
        if value.root:
            text = text.replace("''\n", "''\n" + inner + "root=${lib.escapeShellArg config.disko.rootMountPoint}\n", 1)
        return text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return nix_string(value)
    if isinstance(value, (list, tuple)):
        if not value:
            return "[ ]"
        if all(isinstance(v, (str, int, bool)) for v in value):
            return "[ " + "".join(nix_value(v) + " " for v in value) + "]"
        return "[\n" + "".join(f"{inner}{nix_value(v, level + 1)}\n" for v in value) + f"{pad}]"
    if isinstance(value, dict):
        if not value:
            return "{ }"
        return "{\n" + "".join(f"{inner}{nix_attr(str(k))} = {nix_value(v, level + 1)};\n"
                               for k, v in value.items()) + f"{pad}}}"
    raise TypeError(f"no Nix form for {value!r}")


def disko_size(size_bytes: int) -> str:
    """Bytes as disko (sgdisk, btrfs mkswapfile) takes sizes: a number with K/M/G/T (binary)."""
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    raise DiskoError(f"size of {size_bytes} bytes is no whole number of KiB: disko cannot express it")


# --- what hangs where ---------------------------------------------------------------------------


def _binds_by_host(profile: Profile) -> dict[str, list[Bind]]:
    """Bind mounts grouped by the mount point of the (non-bind) mount holding their source."""
    hosts = [m.mountpoint for m in profile.all_mounts() if "bind" not in m.options]
    found: dict[str, list[Bind]] = {}
    for bind in (m for m in profile.mounts if isinstance(m, Bind)):
        inside = [h for h in hosts if h == "/" or bind.source == h or bind.source.startswith(h + "/")]
        found.setdefault(max(inside, key=len), []).append(bind)
    return found


def _mount_hooks(mountpoints: list[str], binds: dict[str, list[Bind]]) -> dict:
    """The postMountHook making the binds whose source lies on one of these mount points."""
    lines = []
    for host in mountpoints:
        for bind in binds.get(host, []):
            src, dst = shlex.quote(bind.source), shlex.quote(bind.mountpoint)
            remount = ",".join(["remount", "bind", *bind.options])
            lines += [f'if mountpoint -q "$root"{shlex.quote(host)} && ! mountpoint -q "$root"{dst}; then',
                      f'  mkdir -p "$root"{src} "$root"{dst}',
                      f'  mount --bind "$root"{src} "$root"{dst}',
                      f'  mount -o {shlex.quote(remount)} "$root"{dst}' if bind.options else None,
                      "fi"]
    lines = [line for line in lines if line is not None]
    if not lines:
        return {}
    return {"postMountHook": Script("# bind mounts (fileSystems below disko.devices)\n" + "\n".join(lines), root=True)}


# --- nodes ----------------------------------------------------------------------------------------


def disk_node(disk: Disk, profile: Profile, binds: dict[str, list[Bind]]) -> dict:
    return {"type": "disk", "device": disk.device, "content": gpt_node(disk, profile, binds)}


def gpt_node(disk: Disk, profile: Profile, binds: dict[str, list[Bind]]) -> dict:
    return {"type": "gpt",
            "partitions": {part.label: partition_node(part, index, profile, binds)
                           for index, part in enumerate(disk.partitions)}}


def partition_node(part: Partition, index: int, profile: Profile, binds: dict[str, list[Bind]]) -> dict:
    """label and type as Tabula's sgdisk writes them; priority keeps the profile's order."""
    node = {"label": part.label, "type": part.type,
            "size": "100%" if part.size == "rest" else disko_size(part.size_bytes),
            "priority": index + 1}
    content = content_node(part.content, part.device, part, profile, binds) if part.content else None
    if content:
        node["content"] = content
    return node


def content_node(content, device: str, part: Partition, profile: Profile, binds: dict[str, list[Bind]]) -> dict | None:
    """Dispatch on the node type."""
    if isinstance(content, Luks):
        return luks_node(content, part, profile, binds)
    if isinstance(content, Filesystem):
        if content.format == "btrfs":
            return btrfs_node(content, device, binds)
        return filesystem_node(content, binds)
    if isinstance(content, Swap):
        return swap_node(content)
    if isinstance(content, ZfsMember):
        return zfs_member_node(content, part, profile)
    raise DiskoError(f"partition {part.label}: no disko node for {type(content).__name__}")


def luks_node(luks: Luks, part: Partition, profile: Profile, binds: dict[str, list[Bind]]) -> dict:
    """settings become boot.initrd.luks.devices.<name> (and disko's open flags); no passwordFile:
    disko asks for the passphrase at the terminal (askPassword), Tabula reads it on stdin."""
    settings = {}
    if luks.allow_discards:
        settings["allowDiscards"] = True
    if luks.bypass_workqueues:
        settings["bypassWorkqueues"] = True
    node = {"type": "luks", "name": luks.mapper, "settings": settings, "extraFormatArgs": luks_format_args(luks)}
    inner = content_node(luks.content, f"/dev/mapper/{luks.mapper}", part, profile, binds)
    if inner:
        node["content"] = inner
    return node


def _mkfs_args(fs: Filesystem) -> list[str]:
    return [*fs.mkfs_options, *([LABEL_FLAGS[fs.format], fs.fs_label] if fs.fs_label else [])]


def _mounted(mountpoint: str | None, options) -> dict:
    """disko's mountpoint and mountOptions of a node (nothing for one that is not mounted)."""
    if not mountpoint:
        return {}
    return {"mountpoint": mountpoint, **({"mountOptions": list(options)} if options else {})}


def _formatted(node: dict, fs: Filesystem) -> dict:
    """A filesystem node's mkfs arguments and own mount."""
    if _mkfs_args(fs):
        node["extraArgs"] = _mkfs_args(fs)
    node.update(_mounted(fs.mountpoint, fs.mount_options))
    return node


def filesystem_node(fs: Filesystem, binds: dict[str, list[Bind]]) -> dict:
    node = _formatted({"type": "filesystem", "format": fs.format}, fs)
    node.update(_mount_hooks([fs.mountpoint] if fs.mountpoint else [], binds))
    return node


def swap_node(swap: Swap) -> dict:
    node = {"type": "swap"}
    if swap.random_encryption:
        node["randomEncryption"] = True
    return node


def swapfile_node(swapfile: Swapfile) -> dict:
    """The swapfile in its subvolume (disko: btrfs filesystem mkswapfile at format time)."""
    return {"swapfile": {"size": disko_size(swapfile.size_bytes)}}


def subvolume_node(sub: Subvolume) -> dict:
    node = _mounted(sub.mountpoint, sub.mount_options)
    if sub.swapfile:
        node["swap"] = swapfile_node(sub.swapfile)
    return node


def _var(name: str) -> str:
    return "tabula_new_" + re.sub(r"[^A-Za-z0-9]", "_", name)


def blank_snapshot_hooks(device: str, subs: list[Subvolume]) -> dict:
    """@root-blank the Tabula way: read-only, taken only right after the subvolume was created
    (the preCreateHook notes which exist; both hooks run in the create step's subshell)."""
    if not subs:
        return {}
    dev = shlex.quote(device)
    pre = [*(f"{_var(s.path)}=1" for s in subs),
           f"if blkid -o export {dev} | grep -q '^TYPE=btrfs$'; then",
           '  top=$(mktemp -d)',
           f'  mount {dev} "$top" -o subvol=/',
           *(f'  if btrfs subvolume show "$top"/{shlex.quote(s.path)} >/dev/null 2>&1; then {_var(s.path)}=0; fi'
             for s in subs),
           '  umount "$top"; rmdir "$top"',
           "fi"]
    post = ['top=$(mktemp -d)', f'mount {dev} "$top" -o subvol=/']
    for s in subs:
        post += [f'if [ "${_var(s.path)}" = 1 ]; then',
                 f'  btrfs subvolume snapshot -r "$top"/{shlex.quote(s.path)} "$top"/{shlex.quote(s.blank_snapshot)}',
                 "fi"]
    post += ['umount "$top"; rmdir "$top"']
    return {"preCreateHook": Script("\n".join(pre)), "postCreateHook": Script("\n".join(post))}


def btrfs_node(fs: Filesystem, device: str, binds: dict[str, list[Bind]]) -> dict:
    node = _formatted({"type": "btrfs"}, fs)
    node["subvolumes"] = {sub.path: subvolume_node(sub) for sub in fs.subvolumes}
    node.update(blank_snapshot_hooks(device, [s for s in fs.subvolumes if s.blank_snapshot]))
    mountpoints = [m for m in [fs.mountpoint, *(s.mountpoint for s in fs.subvolumes)] if m]
    node.update(_mount_hooks(mountpoints, binds))
    return node


def zfs_member_node(member: ZfsMember, part: Partition, profile: Profile) -> dict | None:
    """A pool member; a log member is left without content (disko would count it as a
    data member): the pool's postCreateHook adds it."""
    pool = profile.pools[member.pool]
    if part.label in pool.log:
        return None
    return {"type": "zfs", "pool": pool.name}


def _vdev_mode(mode: str) -> str:
    return "" if mode == "stripe" else mode


def dataset_options(ds: Dataset) -> dict[str, str]:
    """The properties Tabula creates a dataset with (operations/zfs.py dataset_properties), and
    its encryption."""
    options = dict(ds.properties)
    if ds.mountpoint:
        options.setdefault("mountpoint", "legacy")
    if ds.encryption:
        options.update(ds.encryption.model_dump())
    return options


def dataset_node(pool: Pool, ds: Dataset) -> dict:
    options = dataset_options(ds)
    if not ds.mountpoint and options.get("canmount") != "off" and options.get("mountpoint") != "none":
        raise DiskoError(f"dataset {pool.name}/{ds.name} has no mountpoint: disko mounts every dataset that is "
                         "not canmount=off or mountpoint=none")
    node = {"type": "zfs_fs", "options": options}
    if ds.mountpoint:
        node["mountpoint"] = ds.mountpoint
        if ds.mount_options:
            node["mountOptions"] = list(ds.mount_options)
    if ds.empty_snapshot:
        full = shlex.quote(f"{pool.name}/{ds.name}")
        var = _var(ds.name)
        node["preCreateHook"] = Script(f"if zfs list -H -o name {full} >/dev/null 2>&1; then {var}=0; else {var}=1; fi")
        node["postCreateHook"] = Script(f'if [ "${var}" = 1 ]; then zfs snapshot {full}@{EMPTY_SNAPSHOT}; fi')
    return node


def zpool_node(pool: Pool, devices: dict[str, str]) -> dict:
    """The exact topology; ``devices``: partlabel -> the device disko's member node names."""
    topology = {"type": "topology",
                "vdev": [{"mode": _vdev_mode(v.mode), "members": [devices[m] for m in v.members]} for v in pool.vdevs]}
    if pool.cache:
        topology["cache"] = [devices[m] for m in pool.cache]
    node = {"type": "zpool", "mode": {"topology": topology},
            # as Tabula creates it: no cache file for the live system to re-import the pool from
            "options": {**pool.options, **({} if "cachefile" in pool.options else {"cachefile": "none"})},
            "rootFsOptions": dict(pool.root_properties),
            "datasets": {ds.name: dataset_node(pool, ds) for ds in pool.datasets}}
    if pool.log:
        name = shlex.quote(pool.name)
        lines = []
        for label in pool.log:
            dev = shlex.quote(devices[label])
            lines += [f'if ! zpool status -LP {name} | grep -q "$(readlink -f {dev}) "; then',
                      f"  zpool add {name} log {dev}",
                      "fi"]
        node["postCreateHook"] = Script("# the log vdev (SLOG): disko's topology has no log\n" + "\n".join(lines))
    return node


def tmpfs_node(tmpfs: Tmpfs) -> dict:
    node = {"fsType": "tmpfs"}
    if tmpfs.options:
        node["mountOptions"] = list(tmpfs.options)
    return node


def nodev_node(tmpfs: Tmpfs, binds: dict[str, list[Bind]]) -> dict:
    return {**tmpfs_node(tmpfs), **_mount_hooks([tmpfs.mountpoint], binds)}


def bind_file_system(bind: Bind) -> dict:
    """A bind mount as hardware-configuration.nix has it (disko has no bind node)."""
    entry = {"device": bind.source, "fsType": "none", "options": ["bind", *bind.options]}
    if bind.needed_for_boot:
        entry["neededForBoot"] = True
    return entry


# --- the file -------------------------------------------------------------------------------------


def devices(profile: Profile) -> dict:
    """``disko.devices`` as data."""
    binds = _binds_by_host(profile)
    out: dict = {"disk": {key: disk_node(disk, profile, binds) for key, disk in profile.disks.items()}}
    if profile.pools:
        pools = {}
        for key, pool in profile.pools.items():
            members = {part.label: device for device, part in profile.pool_members(key)}
            pools[pool.name] = zpool_node(pool, members)
        out["zpool"] = pools
    nodev = {m.mountpoint: nodev_node(m, binds) for m in profile.mounts if isinstance(m, Tmpfs)}
    if nodev:
        out["nodev"] = nodev
    return out


def file_systems_beside(profile: Profile) -> dict[str, dict]:
    """What disko.devices cannot say, as plain fileSystems: the binds, and neededForBoot."""
    out: dict[str, dict] = {}
    binds = {m.mountpoint: m for m in profile.mounts if isinstance(m, Bind)}
    for mount in profile.all_mounts():
        if mount.mountpoint in binds:
            out[mount.mountpoint] = bind_file_system(binds[mount.mountpoint])
        elif mount.needed_for_boot:
            out[mount.mountpoint] = {"neededForBoot": True}
    return out


def render(profile: Profile) -> str:
    beside = file_systems_beside(profile)
    lines = [f"# Generated by tabula from profile {profile.name} for host {profile.nixos.hostname}: the layout as",
             "# disko.devices, for disko's NixOS module (inputs.disko.nixosModules.disko) in place of the storage",
             "# part of hardware-configuration.nix. Tabula's README says what disko does not do as Tabula does.",
             "{ config, lib, ... }:",
             "",
             "{",
             f"  disko.devices = {nix_value(devices(profile), 1)};"]
    if beside:
        lines += ["",
                  "  # disko has no neededForBoot and no bind mounts: these are plain NixOS options (the binds",
                  "  # are made at install time by the postMountHook of the node holding their source)."]
        for mountpoint, entry in beside.items():
            if list(entry) == ["neededForBoot"]:
                lines.append(f"  fileSystems.{nix_string(mountpoint)}.neededForBoot = true;")
            else:
                lines.append(f"  fileSystems.{nix_string(mountpoint)} = {nix_value(entry, 1)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
