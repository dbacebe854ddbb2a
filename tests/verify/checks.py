"""
Verification of an installed target against its profile, read from the real devices with testinfra.

Every check derives what it expects from the profile tree (partitions, LUKS, filesystems,
subvolumes, mounts, swapfiles), so a new layout needs no new checks. Used by the demo
(`./dev.sh demo`) and by the end-to-end tests:

    failures = verify_target(host, profile)   # [] when the target matches
"""

from __future__ import annotations

import json
import shlex

from operations.profile import Profile, parse_size

ROOT = "/mnt"

# sgdisk type code -> GPT partition type GUID (what lsblk PARTTYPE shows)
TYPE_GUIDS = {
    "EF00": "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
    "8300": "0fc63daf-8483-4772-8e79-3d69d8477de4",
    "8200": "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f",
    "8309": "ca7d7ccb-63ed-4c53-861c-1742536059cc",
    "BF00": "6a85cf4d-1dd2-11b2-99a6-080020736631",  # sgdisk bf00 "Solaris root"
    "BF01": "6a898cc3-1dd2-11b2-99a6-080020736631",
}


def _mount_table(host) -> dict[str, tuple[str, str, list[str]]]:
    """target -> (source, fstype, options) from /proc/mounts, the kernel's own word."""
    table = {}
    for line in host.file("/proc/mounts").content_string.splitlines():
        source, target, fstype, options, *_ = line.split()
        target = target.encode().decode("unicode_escape")
        table[target] = (source, fstype, options.split(","))
    return table


def option_present(wanted: str, actual: list[str]) -> bool:
    """An option as the kernel reports it: subvol=@x shows as subvol=/@x, compress=zstd as compress=zstd:3,
    a tmpfs size=2G as size=2097152k."""
    if wanted in actual:
        return True
    key, _, value = wanted.partition("=")
    for have in actual:
        have_key, _, have_value = have.partition("=")
        if have_key != key:
            continue
        if key == "subvol" and have_value.lstrip("/") == value.lstrip("/"):
            return True
        if key == "size" and have_value.endswith("k"):
            # tmpfs shows its bound in KiB (size=2G as size=2097152k); a percentage of RAM only as that
            if value.endswith("%"):
                return True
            try:
                return parse_size(value) == int(have_value[:-1]) * 1024
            except ValueError:
                return False
        if have_value.split(":")[0] == value:
            return True
    return False


def check_partitions(host, profile: Profile) -> list[str]:
    failures = []
    for key, disk, part in profile.partitions():
        dev = part.device
        if not host.file(dev).exists:
            failures.append(f"{dev}: missing (disks.{key})")
            continue
        out = host.check_output(f"lsblk -J -b -d -o PARTTYPE,SIZE,PARTLABEL {shlex.quote(dev)}")
        info = json.loads(out)["blockdevices"][0]
        want_guid = TYPE_GUIDS.get(part.type)
        if want_guid and info["parttype"].lower() != want_guid:
            failures.append(f"{dev}: type {info['parttype']} != {part.type}")
        if part.size_bytes is not None and int(info["size"]) != part.size_bytes:
            failures.append(f"{dev}: size {info['size']} != {part.size_bytes}")
    return failures


def check_luks(host, profile: Profile) -> list[str]:
    failures = []
    for part, luks in profile.luks_devices():
        dump = host.run(f"cryptsetup luksDump {shlex.quote(part.device)}")
        version = "2" if luks.luks_type == "luks2" else "1"
        if dump.rc != 0 or not any(line.split() == ["Version:", version] for line in dump.stdout.splitlines()):
            failures.append(f"{part.device}: no {luks.luks_type} header")
        status = host.run(f"cryptsetup status {shlex.quote(luks.mapper)}")
        if status.rc != 0 or "is active" not in status.stdout:
            failures.append(f"/dev/mapper/{luks.mapper}: not open")
    return failures


def check_filesystems(host, profile: Profile) -> list[str]:
    failures = []
    for device, fs in profile.filesystems():
        out = host.run(f"blkid -p -o export {shlex.quote(device)}").stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if props.get("TYPE") != fs.format:
            failures.append(f"{device}: filesystem {props.get('TYPE')} != {fs.format}")
        if fs.fs_label and props.get("LABEL") != fs.fs_label:
            failures.append(f"{device}: label {props.get('LABEL')} != {fs.fs_label}")
    return failures


def check_subvolumes(host, profile: Profile) -> list[str]:
    failures = []
    for device, fs in profile.filesystems():
        if not fs.subvolumes:
            continue
        top = host.check_output("mktemp -d")
        host.check_output(f"mount -o subvolid=5,ro {shlex.quote(device)} {top}")
        try:
            names = set(host.check_output(f"btrfs subvolume list {top} | awk '{{print $NF}}'").split())
            readonly = set(host.check_output(f"btrfs subvolume list -r {top} | awk '{{print $NF}}'").split())
            for sub in fs.subvolumes:
                if sub.path not in names:
                    failures.append(f"{device}: subvolume {sub.path} missing")
                if sub.path in readonly:
                    failures.append(f"{device}: subvolume {sub.path} is read-only")
                if sub.blank_snapshot:
                    if sub.blank_snapshot not in readonly:
                        failures.append(f"{device}: {sub.blank_snapshot} is not a read-only subvolume")
                    elif host.check_output(f"ls -A {top}/{shlex.quote(sub.blank_snapshot)}"):
                        failures.append(f"{device}: {sub.blank_snapshot} is not empty")
        finally:
            host.run(f"umount {top} && rmdir {top}")
    return failures


def check_mounts(host, profile: Profile) -> list[str]:
    failures = []
    table = _mount_table(host)
    for mount in profile.all_mounts():
        target = ROOT if mount.mountpoint == "/" else ROOT + mount.mountpoint
        if target not in table:
            failures.append(f"{target}: not mounted")
            continue
        source, fstype, options = table[target]
        if mount.fstype not in ("none",) and fstype != mount.fstype:
            failures.append(f"{target}: type {fstype} != {mount.fstype}")
        for option in mount.options:
            if option == "bind":
                continue
            if not option_present(option, options):
                failures.append(f"{target}: option {option} missing from {','.join(options)}")
    return failures


def check_swapfiles(host, profile: Profile) -> list[str]:
    failures = []
    for _, fs in profile.filesystems():
        for sub in fs.subvolumes:
            if not (sub.swapfile and sub.mountpoint):
                continue
            path = f"{ROOT}{sub.mountpoint}/swapfile"
            f = host.file(path)
            if not f.exists:
                failures.append(f"{path}: missing")
                continue
            if f.size != sub.swapfile.size_bytes:
                failures.append(f"{path}: size {f.size} != {sub.swapfile.size_bytes}")
            attrs = host.check_output(f"lsattr {path}").split()[0]
            if "C" not in attrs:
                failures.append(f"{path}: copy-on-write is not disabled ({attrs})")
            if "swap" not in host.run(f"blkid -p -o value -s TYPE {path}").stdout:
                failures.append(f"{path}: no swap signature")
    return failures


CHECKS = [check_partitions, check_luks, check_filesystems, check_subvolumes, check_mounts, check_swapfiles]


def verify_target(host, profile: Profile) -> list[str]:
    failures: list[str] = []
    for check in CHECKS:
        failures += check(host, profile)
    return failures

