"""Refusals in the live VM: a foreign filesystem, a mounted partition, a disk that is not there,
a partlabel used elsewhere, drift of @root-blank, a wrong passphrase. Refused runs leave the
disks' bytes unchanged (tests/e2e/faults.disk_checksums: the GPT areas and every partition's first
and last MiB) and re-create nothing (partition GUIDs, UUIDs, subvolume ids, inodes). The drift and
zapped-table cases start from zephyrus-btrfs installed (tests/e2e/states.py)."""
from __future__ import annotations

import json

from tests.e2e.faults import disk_checksums
from tests.e2e.helpers import assert_no_changes, executed_commands, operation_commands, run_with_secrets
from tests.e2e.test_btrfs_profile import (
    NVME_SERIAL, assert_installed_layout, deploy_args, nvme_by_id, passphrase_env,  # noqa: F401
    run_over_ssh,
)

def assert_refused(result, output, *phrases):
    assert result.returncode != 0, f"run was not refused:\n{output[-6000:]}"
    for phrase in phrases:
        assert phrase in output, f"refusal lacks {phrase!r}:\n{output[-6000:]}"
    assert operation_commands(output) == [], "a refused run executed operation commands"


def test_foreign_filesystem_refused_then_wiped_when_confirmed(clean_disks, livevm, target, passphrase_env, run_pyinfra):
    nvme = livevm.disk_by_serial(NVME_SERIAL)
    livevm.run(f"mkfs.ext4 -q -F -L family-photos {nvme} && udevadm settle")
    uuid = livevm.run(f"blkid -p -o value -s UUID {nvme}").stdout.strip()
    before = disk_checksums(livevm, [NVME_SERIAL])

    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    # named as a person recognises it: type, label, UUID, size
    assert_refused(result, output, "disks.main.device", "refusing",
                   f"a whole-disk ext4 filesystem labelled 'family-photos', UUID {uuid}, 16.0 GiB",
                   "tabula_confirm_wipe")
    assert disk_checksums(livevm, [NVME_SERIAL]) == before

    # a confirmation naming another disk does not count
    other = livevm.run("ls /dev/disk/by-id | grep -E 'TABULA-SSD$' | head -1").stdout.strip()
    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm, confirm=[f"/dev/disk/by-id/{other}"]), "-vv")
    assert_refused(result, output, "refusing")
    assert disk_checksums(livevm, [NVME_SERIAL]) == before

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
        before = disk_checksums(livevm, [NVME_SERIAL]), livevm.run(f"blkid -p -o value -s UUID {nvme}p1").stdout
        for confirm in (None, [nvme_by_id(livevm)]):
            result, output = run_over_ssh(run_pyinfra, deploy_args(livevm, confirm=confirm), "-vv")
            assert_refused(result, output, "disks.main.device", "in use", "mounted at /media/data",
                           "never touched, confirmed or not",
                           f"{nvme}p1 (partlabel 'data'): ext4 filesystem without a label, UUID {before[1].strip()}, "
                           "64.0 MiB")
        livevm.run("sync")
        assert (disk_checksums(livevm, [NVME_SERIAL]), livevm.run(f"blkid -p -o value -s UUID {nvme}p1").stdout) == before
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
    before = disk_checksums(livevm, [NVME_SERIAL, "TABULA-SSD"])
    result, output = run_over_ssh(run_pyinfra, deploy_args(livevm))
    assert_refused(result, output, "partlabel 'EFI'", f"{ssd}1")
    assert disk_checksums(livevm, [NVME_SERIAL, "TABULA-SSD"]) == before


def state_identities(livevm, disk: str) -> dict:
    """What re-creating anything would change on an installed zephyrus-btrfs: partition GUIDs, the
    LUKS and filesystem UUIDs, the subvolumes' ids and UUIDs, the swapfile's inode, a marker's."""
    partitions = livevm.run(f"for p in $(lsblk -lnpo NAME,TYPE {disk} | awk '$2 == \"part\" {{print $1}}'); do "
                            "blkid -p -o value -s PART_ENTRY_UUID $p; done").stdout
    return {
        "partitions": partitions,
        "luks": livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot").stdout.strip(),
        "efi": livevm.run("blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout.strip(),
        "btrfs": livevm.run("blkid -p -o value -s UUID /dev/mapper/cryptroot").stdout.strip(),
        "subvolumes": livevm.run("btrfs subvolume list -u /mnt | awk '{print $2, $(NF-2), $NF}'").stdout,
        "swapfile": livevm.run("stat -c %i /mnt/swap/swapfile").stdout.strip(),
        "marker": livevm.run("stat -c %i /mnt/persist/tabula-safety-marker && cat /mnt/persist/tabula-safety-marker").stdout,
    }


def test_drift_and_wrong_passphrase_stop_the_run(installed, livevm, target, run_pyinfra):
    state = installed("zephyrus-btrfs")
    disk = livevm.disk_by_serial("TABULA-SSD")
    livevm.run("echo kept > /mnt/persist/tabula-safety-marker && sync")
    before = state_identities(livevm, disk)

    # @root-blank made writable: reported, nothing re-created
    livevm.run("btrfs property set -ts /run/tabula/btrfs/nixos/@root-blank ro false")
    result, output = run_with_secrets(run_pyinfra, state.args("-vv"), state.secrets)
    assert result.returncode != 0
    assert "@root-blank exists but is writable (drift)" in output
    assert operation_commands(output) == []
    assert state_identities(livevm, disk) == before
    livevm.run("btrfs property set -ts /run/tabula/btrfs/nixos/@root-blank ro true")

    # closed container + wrong passphrase: a clear stop, the header is kept
    livevm.run("swapoff -a; umount -R /mnt; umount /run/tabula/btrfs/nixos; cryptsetup close cryptroot")
    wrong = {**state.secrets, "TABULA_LUKS_PASSPHRASE": "not the passphrase"}
    result, output = run_with_secrets(run_pyinfra, state.args("-vv"), wrong)
    assert result.returncode != 0
    assert "the LUKS passphrase does not open /dev/disk/by-partlabel/cryptroot" in output
    assert "luksFormat" not in " ".join(executed_commands(output))
    assert livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot").stdout.strip() == before["luks"]

    # the right passphrase reopens and remounts everything, nothing re-created
    result, output = run_with_secrets(run_pyinfra, state.args(), state.secrets)
    assert result.returncode == 0, output[-8000:]
    assert_installed_layout(livevm, target, disk_serial="TABULA-SSD")
    assert state_identities(livevm, disk) == before


def test_old_install_under_a_zapped_table_is_never_formatted_over(installed, livevm, target, run_pyinfra):
    """A user zaps the partition table of an installed disk and runs again. The new partitions
    land where the old ones were, so the old LUKS header and vfat are visible in them. The first
    run does not read partitions it has just made: the checks inside luksFormat/mkfs must stop it
    before anything is formatted over, and the next run (which reads) keeps the old container."""
    state = installed("zephyrus-btrfs")
    livevm.run("echo kept > /mnt/persist/marker")
    uuids = livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot; "
                       "blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout
    disk = livevm.disk_by_serial("TABULA-SSD")
    livevm.run(f"swapoff -a; umount -R /mnt; umount /run/tabula/btrfs/nixos; cryptsetup close cryptroot; "
               f"sgdisk --zap-all {disk} >/dev/null; partx -u {disk} 2>/dev/null; udevadm settle")
    assert livevm.run(f"blkid -p -o value -s PTTYPE {disk}", check=False).stdout.strip() == ""   # looks blank

    result, output = run_with_secrets(run_pyinfra, state.args("-vv"), state.secrets)
    assert result.returncode != 0, output[-8000:]
    assert "/dev/disk/by-partlabel/cryptroot already carries a signature: not formatting it" in output
    assert "Run again to have it checked and kept" in output
    assert livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot; "
                      "blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout == uuids

    result, output = run_with_secrets(run_pyinfra, state.args("-vv"), state.secrets)
    assert result.returncode == 0, output[-8000:]
    assert "already holds a luks2 header" in output
    assert livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot; "
                      "blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout == uuids
    assert livevm.run("cat /mnt/persist/marker").stdout.strip() == "kept"
    assert_installed_layout(livevm, target, disk_serial="TABULA-SSD")
