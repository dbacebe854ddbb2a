"""Filesystem layer: mkfs only on devices without a signature; reuse; drift."""
import pytest

from operations import filesystems
from operations.nixlit import DeviceIds
from operations.target import WholeDiskSignature, parse_blkid_export
from operations.errors import TabulaError
import yaml

from operations.profile import PROFILE_DIR, Filesystem, Swap, load_profile
from tests.unit.pyinfra_fake import fixture_lines, run_op, unjoined

BTRFS = Filesystem(format="btrfs", fs_label="nixos")
VFAT = Filesystem(format="vfat", fs_label="EFI", mkfs_options=["-F", "32"])


def test_parse_blkid():
    efi = parse_blkid_export(fixture_lines("btrfs_blkid_efi.txt"))
    assert (efi["TYPE"], efi["LABEL"], efi["PART_ENTRY_NAME"]) == ("vfat", "EFI", "EFI")
    mapper = parse_blkid_export(fixture_lines("btrfs_blkid_mapper.txt"))
    assert (mapper["TYPE"], mapper["LABEL"]) == ("btrfs", "nixos")
    assert parse_blkid_export(fixture_lines("btrfs_blkid_luks.txt"))["TYPE"] == "crypto_LUKS"


@pytest.mark.parametrize("fs, device, expected", [
    (BTRFS, "/dev/mapper/cryptroot", "mkfs.btrfs -L nixos /dev/mapper/cryptroot"),
    (VFAT, "/dev/disk/by-partlabel/EFI", "mkfs.vfat -F 32 -n EFI /dev/disk/by-partlabel/EFI"),
    (Filesystem(format="f2fs", fs_label="local", mkfs_options=["-O", "extra_attr,compression"]), "/dev/mapper/l",
     "mkfs.f2fs -O extra_attr,compression -l local /dev/mapper/l"),
    (Filesystem(format="ext4"), "/dev/vdb1", "mkfs.ext4 -q /dev/vdb1"),
])
def test_absent_filesystem_is_made(monkeypatch, fs, device, expected):
    commands, _, _ = run_op(monkeypatch, filesystems, filesystems.formatted, {}, filesystems=[(device, fs)], swaps=[])
    assert len(commands) == 1 and commands[0].endswith(f"; {expected}")
    assert f"blkid -p -o value -s TYPE {device}" in commands[0]   # re-checked in the same command


def test_present_filesystem_is_reused(monkeypatch):
    found = parse_blkid_export(fixture_lines("btrfs_blkid_mapper.txt"))
    commands, _, fake = run_op(monkeypatch, filesystems, filesystems.formatted, {WholeDiskSignature: found}, filesystems=[("/dev/mapper/cryptroot", BTRFS)], swaps=[])
    assert commands == []
    assert fake.noops == [f"/dev/mapper/cryptroot already holds btrfs labelled 'nixos' (UUID {found['UUID']})"]


def test_other_filesystem_is_drift(monkeypatch):
    with pytest.raises(TabulaError, match="refusing to make btrfs on /dev/mapper/cryptroot: it holds ext4"):
        run_op(monkeypatch, filesystems, filesystems.formatted, {WholeDiskSignature: {"TYPE": "ext4"}}, filesystems=[("/dev/mapper/cryptroot", BTRFS)], swaps=[])


def test_wrong_label_is_drift(monkeypatch):
    with pytest.raises(TabulaError, match="labelled 'other'"):
        run_op(monkeypatch, filesystems, filesystems.formatted, {WholeDiskSignature: {"TYPE": "btrfs", "LABEL": "other"}}, filesystems=[("/dev/mapper/cryptroot", BTRFS)], swaps=[])


def test_swap_partition(monkeypatch):
    commands, _, _ = run_op(monkeypatch, filesystems, filesystems.formatted, {}, filesystems=[], swaps=[("/dev/sw", Swap())])
    assert len(commands) == 1 and commands[0].endswith("mkswap /dev/sw")
    assert "blkid -p -o value -s TYPE /dev/sw" in commands[0]            # mkswap re-checks its device too


def test_all_filesystems_and_swaps_in_one_round_trip_and_drift_stops_before_any(monkeypatch):
    wanted = [("/dev/disk/by-partlabel/EFI", VFAT), ("/dev/mapper/cryptroot", BTRFS)]
    commands, _, _ = run_op(monkeypatch, filesystems, filesystems.formatted, {}, filesystems=wanted,
                            swaps=[("/dev/sw", Swap())])
    assert len(commands) == 1
    assert unjoined(commands)[-1].endswith("mkswap /dev/sw\n}")      # (a part that is a list: a group)
    assert commands[0].index("mkfs.vfat") < commands[0].index("mkfs.btrfs") < commands[0].index("mkswap")
    assert commands[0].count("blkid -p -o value -s TYPE") == 3           # each mkfs/mkswap re-checks its device
    drift = {(WholeDiskSignature, frozenset({("device", "/dev/mapper/cryptroot")})): {"TYPE": "ext4"}}
    with pytest.raises(TabulaError, match="refusing to make btrfs"):
        run_op(monkeypatch, filesystems, filesystems.formatted, drift, filesystems=wanted, swaps=[])
    commands, _, fake = run_op(monkeypatch, filesystems, filesystems.formatted, {WholeDiskSignature: {"TYPE": "swap"}}, filesystems=[], swaps=[("/dev/sw", Swap())])
    assert commands == [] and "already holds a swap signature" in fake.noops[0]
    commands, _, fake = run_op(monkeypatch, filesystems, filesystems.formatted, {}, filesystems=[], swaps=[("/dev/sw", Swap(random_encryption=True))])
    assert commands == [] and "random key" in fake.noops[0]
    with pytest.raises(TabulaError, match="refusing to mkswap"):
        run_op(monkeypatch, filesystems, filesystems.formatted, {WholeDiskSignature: {"TYPE": "xfs"}}, filesystems=[], swaps=[("/dev/sw", Swap())])


def test_an_f2fs_needed_for_boot_puts_its_module_in_the_initrd_with_or_without_a_pool(tmp_path):
    light = yaml.safe_load((PROFILE_DIR / "light-tmpfs-f2fs.yaml").read_text())
    # The same layout without its ZFS pool: /remote becomes a folder of the f2fs.
    no_pool = yaml.safe_load((PROFILE_DIR / "light-tmpfs-f2fs.yaml").read_text())
    no_pool["disks"]["primary"]["partitions"] = no_pool["disks"]["primary"]["partitions"][:3]
    no_pool["disks"]["primary"]["partitions"][2]["size"] = "rest"
    del no_pool["pools"]
    no_pool["mounts"].append({"type": "bind", "source": "/.local/remote", "mountpoint": "/remote",
                              "options": ["nosuid", "nodev"], "needed_for_boot": True})
    vars = {"disk": "/dev/disk/by-id/virtio-TEST", "hostname": "light"}
    for data in (light, no_pool):
        path = tmp_path / "profile.yaml"
        path.write_text(yaml.safe_dump(data))
        profile = load_profile(str(path), vars)
        assert bool(profile.pools) == (data is light)
        assert filesystems.LAYER.nix(profile, DeviceIds()).configuration == '  boot.initrd.kernelModules = [ "f2fs" ];\n'
    without_f2fs = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/nvme-TEST"})
    assert filesystems.LAYER.nix(without_f2fs, DeviceIds()).configuration == ""
