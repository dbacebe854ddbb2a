"""Mount layer: /proc/mounts parsing (captured in the VM, octal escapes), option comparison and
the mount commands of every kind: btrfs subvolume, vfat, f2fs, zfs legacy, tmpfs, bind."""
import shlex
import pytest

from operations import mounts
from operations.target import decode_octal
from operations.errors import TabulaError
from operations.target import CanonicalPath
from operations.profile import Mount, load_profile
from tests.unit.pyinfra_fake import fixture_lines, run_op, unjoined


@pytest.fixture
def installed():
    return mounts.parse_proc_mounts(fixture_lines("btrfs_proc_mounts_installed.txt"))


def test_parse_proc_mounts(installed):
    assert installed["/mnt"]["device"] == "/dev/mapper/cryptroot"
    assert installed["/mnt"]["fstype"] == "btrfs"
    assert "subvol=/@root" in installed["/mnt"]["options"]
    assert installed["/mnt/boot"]["fstype"] == "vfat"
    assert "/run/tabula/btrfs/nixos" in installed


def test_octal_escapes():
    parsed = mounts.parse_proc_mounts([r"/dev/vdb1 /mnt/with\040space ext4 rw 0 0"])
    assert "/mnt/with space" in parsed
    assert decode_octal(r"a\011b\134c") == "a\tb\\c"


@pytest.mark.parametrize("wanted, actual, missing", [
    (("subvol=@root", "compress=zstd", "noatime", "discard=async"),
     ["rw", "noatime", "compress=zstd:3", "discard=async", "subvolid=256", "subvol=/@root"], []),
    (("subvol=@home",), ["rw", "subvol=/@root"], ["subvol=@home"]),
    (("compress=lzo",), ["compress=zstd:3"], ["compress=lzo"]),
    (("mode=755", "size=50%"), ["rw", "size=2009216k", "mode=755"], []),
    (("bind", "nodev", "noatime"), ["rw", "nodev", "relatime"], ["noatime"]),
    (("fmask=0022", "dmask=0022"), ["rw", "fmask=0022", "dmask=0022", "codepage=437"], []),
])
def test_option_problems(wanted, actual, missing):
    assert mounts.option_problems(wanted, actual) == missing


def profile_mounts(name, **variables):
    return {m.mountpoint: m for m in load_profile(name, variables).all_mounts()}


@pytest.fixture
def btrfs_mounts():
    return profile_mounts("zephyrus-btrfs", disk="/dev/disk/by-id/x")


@pytest.fixture
def light_mounts():
    return profile_mounts("light-tmpfs-f2fs", disk="/dev/disk/by-id/x", hostname="light")


def test_order_parents_first(btrfs_mounts):
    assert list(btrfs_mounts)[0] == "/"


def test_absent_btrfs_and_vfat_mounts_in_one_round_trip(monkeypatch, btrfs_mounts):
    commands, _, _ = run_op(monkeypatch, mounts, mounts.mounted, {mounts.Mounts: {}},
                            mounts=[btrfs_mounts["/"], btrfs_mounts["/boot"]])
    assert len(commands) == 1
    assert unjoined(commands) == ["mkdir -p /mnt",
                                  "mount -t btrfs -o subvol=@root,compress=zstd,noatime,discard=async /dev/mapper/cryptroot /mnt",
                                  "mkdir -p /mnt/boot",
                                  "mount -t vfat -o fmask=0022,dmask=0022 /dev/disk/by-partlabel/EFI /mnt/boot"]


def test_absent_tmpfs_f2fs_zfs_bind_mounts(monkeypatch, light_mounts):
    by_type = {}
    for mount in light_mounts.values():
        by_type.setdefault("bind" if "bind" in mount.options else mount.fstype, mount)
    assert {"tmpfs", "f2fs", "zfs", "bind"} <= set(by_type)
    for kind, mount in by_type.items():
        target = mounts.install_path(mount.mountpoint)
        opts = ",".join(o for o in mount.options if o != "bind")
        commands, _, _ = run_op(monkeypatch, mounts, mounts.mounted, {mounts.Mounts: {}}, mounts=[mount])
        assert len(commands) == 1
        commands = unjoined(commands)
        if kind == "bind":
            source = mounts.install_path(mount.device)
            assert source.startswith("/mnt/")
            assert commands == [f"mkdir -p {source} {target}", f"mount --bind {source} {target}",
                                f"mount -o remount,bind,{opts} {target}"]
        else:
            source = "tmpfs" if kind == "tmpfs" else mount.device
            assert commands == [f"mkdir -p {target}", f"mount -t {kind} -o {shlex.quote(opts)} {source} {target}"]


def test_present_mounts_are_noops(monkeypatch, btrfs_mounts, installed):
    canonical = {"/dev/mapper/cryptroot": "/dev/dm-0", "/dev/disk/by-partlabel/EFI": "/dev/nvme0n1p1",
                 "/dev/nvme0n1p1": "/dev/nvme0n1p1"}
    facts = {mounts.Mounts: installed}
    facts.update({(CanonicalPath, frozenset({("path", k)})): v for k, v in canonical.items()})
    commands, _, fake = run_op(monkeypatch, mounts, mounts.mounted, facts, mounts=list(btrfs_mounts.values()))
    assert commands == []
    targets = ", ".join(mounts.install_path(m) for m in btrfs_mounts)
    assert fake.noops == [f"{targets} are already mounted as the profile says"]


def test_only_the_missing_mounts_are_made(monkeypatch, btrfs_mounts, installed):
    del installed["/mnt/var/log"]
    facts = {mounts.Mounts: installed, CanonicalPath: "/dev/dm-0"}
    facts[(CanonicalPath, frozenset({("path", "/dev/disk/by-partlabel/EFI")}))] = "/dev/nvme0n1p1"
    facts[(CanonicalPath, frozenset({("path", "/dev/nvme0n1p1")}))] = "/dev/nvme0n1p1"
    commands, _, _ = run_op(monkeypatch, mounts, mounts.mounted, facts, mounts=list(btrfs_mounts.values()))
    assert unjoined(commands) == ["mkdir -p /mnt/var/log",
                                  "mount -t btrfs -o subvol=@log,compress=zstd,noatime,discard=async "
                                  "/dev/mapper/cryptroot /mnt/var/log"]


def test_mounted_differently_is_drift_and_nothing_is_mounted(monkeypatch, btrfs_mounts, installed):
    installed["/mnt/home"]["options"] = ["rw", "relatime", "subvol=/@persist"]
    del installed["/mnt/var/log"]
    with pytest.raises(TabulaError, match="/mnt/home is already mounted, but differently.*lack subvol=@home"):
        run_op(monkeypatch, mounts, mounts.mounted, {mounts.Mounts: installed, CanonicalPath: "/dev/dm-0"},
               mounts=list(btrfs_mounts.values()))
