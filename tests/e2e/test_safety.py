"""Refusals in the live VM: a foreign filesystem, a mounted partition, a disk that is not there,
a partlabel used elsewhere, drift of @root-blank, a wrong passphrase. Refused runs leave the
disks' bytes unchanged (checksum of the first MiBs)."""
from __future__ import annotations

import json

import pytest

from tests.e2e.helpers import assert_no_changes, executed_commands, operation_commands
from tests.e2e.test_btrfs_profile import (
    MiB, NVME_SERIAL, PASSPHRASE, assert_installed_layout, deploy_args, nvme_by_id, passphrase_env,  # noqa: F401
    run_over_ssh,
)

def checksum(livevm, device, mib=8):
    return livevm.run(f"head -c {mib * MiB} {device} | sha256sum").stdout.split()[0]


def assert_refused(result, output, *phrases):
    assert result.returncode != 0, f"run was not refused:\n{output[-6000:]}"
    for phrase in phrases:
        assert phrase in output, f"refusal lacks {phrase!r}:\n{output[-6000:]}"
    assert operation_commands(output) == [], "a refused run executed operation commands"


def test_foreign_filesystem_refused_then_wiped_when_confirmed(clean_disks, livevm, target, passphrase_env, run_pyinfra):
    nvme = livevm.disk_by_serial(NVME_SERIAL)
    livevm.run(f"mkfs.ext4 -q -F -L family-photos {nvme} && udevadm settle")
    uuid = livevm.run(f"blkid -p -o value -s UUID {nvme}").stdout.strip()
    before = checksum(livevm, nvme)

    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    # named as a person recognises it: type, label, UUID, size
    assert_refused(result, output, "disks.main.device", "refusing",
                   f"a whole-disk ext4 filesystem labelled 'family-photos', UUID {uuid}, 16.0 GiB",
                   "tabula_confirm_wipe")
    assert checksum(livevm, nvme) == before

    # a confirmation naming another disk does not count
    other = livevm.run("ls /dev/disk/by-id | grep -E 'TABULA-SSD$' | head -1").stdout.strip()
    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm, confirm=[f"/dev/disk/by-id/{other}"]), "-vv")
    assert_refused(result, output, "refusing")
    assert checksum(livevm, nvme) == before

    # confirmed by serial: wiped and installed, then the next run changes nothing
    first, output = run_over_ssh(run_pyinfra, deploy_args(livevm, confirm=[NVME_SERIAL]), "-v")
    assert first.returncode == 0, output[-8000:]
    assert "Wipe " in output
    assert livevm.run(f"blkid -p -o value -s TYPE {nvme}", check=False).stdout.strip() != "ext4"
    assert_installed_layout(livevm, target)
    second, output = run_over_ssh(run_pyinfra, deploy_args(livevm, confirm=[NVME_SERIAL]), "-vv")
    assert second.returncode == 0, output[-8000:]
    assert_no_changes(output)


def test_mounted_partition_refused_even_when_confirmed(clean_disks, livevm, passphrase_env, run_pyinfra):
    nvme = livevm.disk_by_serial(NVME_SERIAL)
    livevm.run(f"sgdisk -n 1:0:+64M -c 1:data {nvme} && udevadm settle && mkfs.ext4 -q $(lsblk -lnpo NAME {nvme} | sed -n 2p) "
               f"&& mkdir -p /media/data && mount $(lsblk -lnpo NAME {nvme} | sed -n 2p) /media/data")
    try:
        # the partition table (first MiB) and the filesystem's identity, while still mounted
        livevm.run("sync")
        before = checksum(livevm, nvme, mib=1), livevm.run(f"blkid -p -o value -s UUID {nvme}p1").stdout
        for confirm in (None, [nvme_by_id(livevm)]):
            result, output = run_over_ssh(run_pyinfra, deploy_args(livevm, confirm=confirm), "-vv")
            assert_refused(result, output, "disks.main.device", "in use", "mounted at /media/data",
                           "never touched, confirmed or not",
                           f"{nvme}p1 (partlabel 'data'): ext4 filesystem without a label, UUID {before[1].strip()}, "
                           "64.0 MiB")
        livevm.run("sync")
        assert (checksum(livevm, nvme, mib=1), livevm.run(f"blkid -p -o value -s UUID {nvme}p1").stdout) == before
    finally:
        livevm.run("umount /media/data 2>/dev/null || true", check=False)


def test_absent_disk_named_with_present_ids(clean_disks, livevm, passphrase_env, run_pyinfra):
    result, output = run_over_ssh(run_pyinfra, ["deploy.py", "--data", "tabula_vars=" + json.dumps(
        {"disk": "/dev/disk/by-id/nvme-NOT_THERE", "swap_size": "256M"})])
    assert_refused(result, output, "disks.main.device", "/dev/disk/by-id/nvme-NOT_THERE does not exist",
                   NVME_SERIAL)


def test_partlabel_on_another_disk_refused(clean_disks, livevm, passphrase_env, run_pyinfra):
    ssd = livevm.disk_by_serial("TABULA-SSD")
    nvme = livevm.disk_by_serial(NVME_SERIAL)
    livevm.run(f"sgdisk -n 1:0:+64M -c 1:EFI {ssd} && udevadm settle")
    before = checksum(livevm, nvme), checksum(livevm, ssd)
    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm))
    assert_refused(result, output, "partlabel 'EFI'", f"{ssd}1")
    assert (checksum(livevm, nvme), checksum(livevm, ssd)) == before


def test_drift_and_wrong_passphrase_stop_the_run(clean_disks, livevm, target, passphrase_env, run_pyinfra, monkeypatch):
    first, output = run_over_ssh(run_pyinfra, deploy_args(livevm))
    assert first.returncode == 0, output[-8000:]

    # @root-blank made writable: reported, nothing re-created
    livevm.run("btrfs property set -ts /run/tabula/btrfs/nixos/@root-blank ro false")
    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    assert result.returncode != 0
    assert "@root-blank exists but is writable (drift)" in output
    livevm.run("btrfs property set -ts /run/tabula/btrfs/nixos/@root-blank ro true")

    # closed container + wrong passphrase: a clear stop, the header is kept
    uuid = livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot").stdout
    livevm.run("swapoff -a; umount -R /mnt; umount /run/tabula/btrfs/nixos; cryptsetup close cryptroot")
    monkeypatch.setenv("TABULA_LUKS_PASSPHRASE", "not the passphrase")
    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    assert result.returncode != 0
    assert "the LUKS passphrase does not open /dev/disk/by-partlabel/cryptroot" in output
    assert "luksFormat" not in " ".join(executed_commands(output))
    assert livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot").stdout == uuid
    assert "not the passphrase" not in output

    # the right passphrase reopens and remounts everything, nothing re-created
    monkeypatch.setenv("TABULA_LUKS_PASSPHRASE", PASSPHRASE)
    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm))
    assert result.returncode == 0, output[-8000:]
    assert livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot").stdout == uuid
    assert_installed_layout(livevm, target)


def test_old_install_under_a_zapped_table_is_never_formatted_over(clean_disks, livevm, target, passphrase_env,
                                                                  run_pyinfra):
    """A user zaps the partition table of an installed disk and runs again. The new partitions
    land where the old ones were, so the old LUKS header and vfat are visible in them. The first
    run does not read partitions it has just made: the checks inside luksFormat/mkfs must stop it
    before anything is formatted over, and the next run (which reads) keeps the old container."""
    first, output = run_over_ssh(run_pyinfra, deploy_args(livevm))
    assert first.returncode == 0, output[-8000:]
    livevm.run("echo kept > /mnt/persist/marker")
    uuids = livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot; "
                       "blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout
    nvme = livevm.disk_by_serial(NVME_SERIAL)
    livevm.run(f"swapoff -a; umount -R /mnt; umount /run/tabula/btrfs/nixos; cryptsetup close cryptroot; "
               f"sgdisk --zap-all {nvme} >/dev/null; partx -u {nvme} 2>/dev/null; udevadm settle")
    assert livevm.run(f"blkid -p -o value -s PTTYPE {nvme}", check=False).stdout.strip() == ""   # looks blank

    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    assert result.returncode != 0, output[-8000:]
    assert "/dev/disk/by-partlabel/cryptroot already carries a signature: not formatting it" in output
    assert "Run again to have it checked and kept" in output
    assert livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot; "
                      "blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout == uuids

    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    assert result.returncode == 0, output[-8000:]
    assert "already holds a luks2 header" in output
    assert livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot; "
                      "blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout == uuids
    assert livevm.run("cat /mnt/persist/marker").stdout.strip() == "kept"
    assert_installed_layout(livevm, target)
