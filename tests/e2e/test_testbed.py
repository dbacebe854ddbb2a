"""The live VM is what the install deploys expect: disks by serial, ZFS, the disk tools, and
pyinfra reaching it both over SSH (host install-target) and as @local inside the guest."""
import re

import pytest

from tests.e2e.faults import disk_checksums

GiB = 1024**3
# The test bed's contract (what the profiles are written against), checked against the guest.
NVME = ("TABULA-NVME0", 16 * GiB)
VIRTIO_DISKS = {"TABULA-RZ1": 4 * GiB, "TABULA-RZ2": 4 * GiB, "TABULA-RZ3": 4 * GiB,
                "TABULA-SSD": 8 * GiB}
DISK_TOOLS = "sgdisk cryptsetup mkfs.btrfs mkfs.vfat mkfs.f2fs zpool wipefs blkdiscard".split()
TRIVIAL_DEPLOY = "tests/e2e/deploys/trivial.py"
MARKER = "/root/tabula-trivial"


def sysfs_disk(livevm, device):
    """(serial, size in bytes) of a whole disk, straight from the guest's sysfs."""
    name = device.removeprefix("/dev/")
    serial_file = f"/sys/block/{name}/device/serial" if name.startswith("nvme") \
        else f"/sys/block/{name}/serial"
    serial = livevm.run(["cat", serial_file]).stdout.strip()
    sectors = int(livevm.run(["cat", f"/sys/block/{name}/size"]).stdout)
    return serial, sectors * 512


def test_nvme_disk(livevm):
    serial, size = sysfs_disk(livevm, "/dev/nvme0n1")
    assert (serial, size) == NVME
    lsblk = livevm.run("lsblk -bdno SERIAL,SIZE /dev/nvme0n1").stdout.split()
    assert lsblk == [NVME[0], str(NVME[1])]


@pytest.mark.parametrize("serial", sorted(VIRTIO_DISKS))
def test_virtio_disk(livevm, serial):
    device = livevm.disk_by_serial(serial)
    assert device.startswith("/dev/vd")
    assert sysfs_disk(livevm, device) == (serial, VIRTIO_DISKS[serial])


def test_zfs_module_loads(livevm, target):
    livevm.run("modprobe zfs")
    assert target.file("/sys/module/zfs").is_directory


@pytest.mark.parametrize("tool", DISK_TOOLS)
def test_disk_tool_on_path(target, tool):
    assert target.exists(tool)


def test_reset_disks_wipes_everything(clean_disks, livevm):
    """Leave partitions, a mount, a LUKS mapping and a ZFS pool behind, then reset."""
    rz1, rz2, rz3, ssd = (livevm.disk_by_serial(s) for s in sorted(VIRTIO_DISKS))
    livevm.run(f"""set -e
        sgdisk -n1:0:+512M -n2:0:0 {rz1} && udevadm settle
        mkfs.ext4 -q {rz1}1 && mkdir -p /mnt/leftover && mount {rz1}1 /mnt/leftover
        mkswap -q {rz1}2 && swapon {rz1}2
        echo -n key > /tmp/key
        cryptsetup luksFormat -q --pbkdf pbkdf2 --pbkdf-force-iterations 1000 {ssd} /tmp/key
        cryptsetup open --key-file /tmp/key {ssd} leftover
        modprobe zfs && zpool create -f -m /mnt/leftover-pool leftover {rz2} {rz3}
    """)
    livevm.reset_disks()
    livevm.reset_disks()   # idempotent on blank disks
    assert livevm.run("zpool list -H").stdout == ""
    assert livevm.run("findmnt -rno TARGET | grep ^/mnt || true").stdout == ""
    assert livevm.run("ls /dev/mapper").stdout.split() == ["control"]
    layout = livevm.run(f"lsblk -lno TYPE,FSTYPE {rz1} {rz2} {rz3} {ssd}").stdout.split()
    assert layout == ["disk"] * 4


def test_disk_checksums_see_a_reformatted_luks_header(clean_disks, livevm):
    """The tests' "disks byte-identical" covers where the data is: a LUKS header that starts after
    a 1 GiB partition, as cryptroot does, formatted again, changes the digests; the digest of the
    disk's first 4 MiB and last MiB alone (what they compared before) does not see it."""
    nvme = livevm.disk_by_serial("TABULA-NVME0")
    livevm.run(f"sgdisk -n 1:0:+1G -t 1:ef00 -c 1:EFI -n 2:0:0 -c 2:cryptroot {nvme} >/dev/null && udevadm settle")
    luks_format = ("cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "
                   "/dev/disk/by-partlabel/cryptroot -")
    whole_disk_ends = f"(head -c 4M {nvme}; tail -c 1M {nvme}) | md5sum"
    livevm.run(luks_format, input="first")
    before, ends_before = disk_checksums(livevm, ["TABULA-NVME0"]), livevm.run(whole_disk_ends).stdout
    livevm.run(luks_format, input="second")
    after, ends_after = disk_checksums(livevm, ["TABULA-NVME0"]), livevm.run(whole_disk_ends).stdout
    changed = [region.split("=")[0] for region, then in zip(after["TABULA-NVME0"].split(),
                                                           before["TABULA-NVME0"].split()) if region != then]
    assert changed == ["nvme0n1p2:head"], changed
    assert ends_after == ends_before


def pyinfra_totals(output):
    """pyinfra's 'Grand total' results row as {hosts, success, error, no_change}; '-' is none."""
    match = re.search(r"^\s*Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output, re.M)
    assert match, f"no results table in pyinfra output:\n{output}"
    return dict(zip(("hosts", "success", "error", "no_change"), match.groups()))


def test_trivial_deploy_over_ssh(livevm, target, run_pyinfra):
    livevm.run(["rm", "-f", MARKER])
    first = run_pyinfra([TRIVIAL_DEPLOY])
    assert first.returncode == 0, first.stdout + first.stderr
    marker = target.file(MARKER)
    assert marker.content_string == "deployed-to=install-target\nhostname=tabula-live\n"

    second = run_pyinfra([TRIVIAL_DEPLOY])
    assert second.returncode == 0, second.stdout + second.stderr
    totals = pyinfra_totals(second.stdout + second.stderr)
    # The operation ran on the host (a run that reached no host also shows no successes).
    assert (totals["success"], totals["error"], totals["no_change"]) == ("-", "-", "1"), totals


def test_trivial_deploy_local_in_guest(livevm, target, run_pyinfra):
    livevm.run(["rm", "-f", MARKER])
    result = run_pyinfra([TRIVIAL_DEPLOY], local=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert target.file(MARKER).content_string == "deployed-to=@local\nhostname=tabula-live\n"
