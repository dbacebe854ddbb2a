"""Btrfs layer: subvolume list + ro flag parsing (captured in the VM), the blank snapshot rules,
the private top-level mount and the swapfile."""
import copy

import pytest

from operations import btrfs
from operations.errors import TabulaError
from operations.target import CanonicalPath
from operations.mounts import Mounts, parse_proc_mounts
from operations.profile import Subvolume, Swapfile, load_profile
from tests.unit.pyinfra_fake import fixture_lines, run_op, unjoined

TOP = "/run/tabula/btrfs/nixos"


@pytest.fixture
def wanted():
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/x", "swap_size": "256M"})
    return list(profile.filesystems()[1][1].subvolumes)


@pytest.fixture
def installed():
    return btrfs.parse_subvolume_list(fixture_lines("btrfs_subvolumes_installed.txt"))


def test_parse_subvolumes(installed):
    assert sorted(installed) == ["@home", "@log", "@nix", "@persist", "@root", "@root-blank", "@swap"]
    blank, root = installed["@root-blank"], installed["@root"]
    assert blank["ro"] is True and blank["empty"] is True
    assert root["ro"] is False
    assert blank["parent_uuid"] == root["uuid"]
    assert all(s["top_level"] == 5 and s["parent"] == 5 for s in installed.values())


def test_parse_not_mounted():
    assert btrfs.parse_subvolume_list([]) == {}


def test_all_created_on_a_new_filesystem(monkeypatch, wanted):
    commands, _, _ = run_op(monkeypatch, btrfs, btrfs.subvolumes, {}, top=TOP, wanted=wanted)
    assert len(commands) == 1                       # one round trip
    assert unjoined(commands) == [
        f"btrfs subvolume create {TOP}/@root",
        f"btrfs subvolume snapshot -r {TOP}/@root {TOP}/@root-blank",
        f"btrfs subvolume create {TOP}/@nix",
        f"btrfs subvolume create {TOP}/@home",
        f"btrfs subvolume create {TOP}/@persist",
        f"btrfs subvolume create {TOP}/@log",
        f"btrfs subvolume create {TOP}/@swap",
    ]


def test_present_is_a_noop(monkeypatch, wanted, installed):
    commands, _, fake = run_op(monkeypatch, btrfs, btrfs.subvolumes, {btrfs.BtrfsSubvolumes: installed}, top=TOP, wanted=wanted)
    assert commands == []
    assert fake.noops == [f"{TOP} already has the subvolumes @root, @nix, @home, @persist, @log, @swap; "
                          "@root-blank is read-only and empty"]


def test_missing_one_is_created_without_retaking_blank(monkeypatch, wanted, installed):
    del installed["@home"]
    commands, _, _ = run_op(monkeypatch, btrfs, btrfs.subvolumes, {btrfs.BtrfsSubvolumes: installed}, top=TOP, wanted=wanted)
    assert commands == [f"btrfs subvolume create {TOP}/@home"]


def test_writable_blank_is_drift(monkeypatch, wanted, installed):
    installed["@root-blank"]["ro"] = False
    with pytest.raises(TabulaError, match="@root-blank exists but is writable"):
        run_op(monkeypatch, btrfs, btrfs.subvolumes, {btrfs.BtrfsSubvolumes: installed}, top=TOP, wanted=wanted)


def test_blank_with_content_is_drift(monkeypatch, wanted, installed):
    installed["@root-blank"]["empty"] = False
    with pytest.raises(TabulaError, match="not empty"):
        run_op(monkeypatch, btrfs, btrfs.subvolumes, {btrfs.BtrfsSubvolumes: installed}, top=TOP, wanted=wanted)


def test_blank_missing_taken_only_while_root_is_empty(monkeypatch, wanted, installed):
    state = copy.deepcopy(installed)
    del state["@root-blank"]
    state["@root"]["empty"] = True                   # interrupted right after creating @root
    commands, _, _ = run_op(monkeypatch, btrfs, btrfs.subvolumes, {btrfs.BtrfsSubvolumes: state}, top=TOP, wanted=wanted)
    assert commands == [f"btrfs subvolume snapshot -r {TOP}/@root {TOP}/@root-blank"]
    state["@root"]["empty"] = False
    with pytest.raises(TabulaError, match="@root exists with content but @root-blank is missing"):
        run_op(monkeypatch, btrfs, btrfs.subvolumes, {btrfs.BtrfsSubvolumes: state}, top=TOP, wanted=wanted)


def test_root_missing_but_blank_present_is_restored_from_blank(monkeypatch, wanted, installed):
    del installed["@root"]
    commands, _, _ = run_op(monkeypatch, btrfs, btrfs.subvolumes, {btrfs.BtrfsSubvolumes: installed}, top=TOP, wanted=wanted)
    assert commands == [f"btrfs subvolume snapshot {TOP}/@root-blank {TOP}/@root"]


def test_top_level_mount(monkeypatch):
    commands, _, _ = run_op(monkeypatch, btrfs, btrfs.top_level, {Mounts: {}}, device="/dev/mapper/cryptroot", path=TOP)
    assert len(commands) == 1 and unjoined(commands) == [f"mkdir -p {TOP}", f"mount -t btrfs -o subvolid=5 /dev/mapper/cryptroot {TOP}"]
    mounts = parse_proc_mounts(fixture_lines("btrfs_proc_mounts_installed.txt"))
    commands, _, fake = run_op(monkeypatch, btrfs, btrfs.top_level, {Mounts: mounts, CanonicalPath: "/dev/dm-0"},
                               device="/dev/mapper/cryptroot", path=TOP)
    assert commands == [] and "already mounted" in fake.noops[0]
    mounts[TOP]["options"] = ["rw", "subvolid=256", "subvol=/@root"]
    with pytest.raises(TabulaError, match="not the top level"):
        run_op(monkeypatch, btrfs, btrfs.top_level, {Mounts: mounts, CanonicalPath: "/dev/dm-0"},
               device="/dev/mapper/cryptroot", path=TOP)


SWAPFILE = "/mnt/swap/swapfile"
SIZE = Swapfile(size="256M")
CREATE = ["truncate -s 0 /mnt/swap/swapfile", "chattr +C /mnt/swap/swapfile",
          "fallocate -l 268435456 /mnt/swap/swapfile", "chmod 600 /mnt/swap/swapfile", "mkswap /mnt/swap/swapfile"]


def test_parse_swapfile_state():
    state = btrfs.parse_swapfile_state(fixture_lines("btrfs_swapfile_state.txt"))
    assert state == {"size": 268435456, "type": "regular file", "mode": "600", "nocow": True, "swap": True,
                     "active": False}
    assert btrfs.parse_swapfile_state([]) is None


def test_swapfile_absent_present_drifted(monkeypatch):
    commands, _, _ = run_op(monkeypatch, btrfs, btrfs.swapfile, {}, path=SWAPFILE, swapfile=SIZE)
    assert len(commands) == 1 and unjoined(commands) == CREATE
    good = btrfs.parse_swapfile_state(fixture_lines("btrfs_swapfile_state.txt"))
    commands, _, fake = run_op(monkeypatch, btrfs, btrfs.swapfile, {btrfs.SwapfileState: good}, path=SWAPFILE, swapfile=SIZE)
    assert commands == [] and fake.noops == [f"{SWAPFILE} is already a NOCOW swapfile of 256M (268435456 bytes)"]
    small = dict(good, size=4096)
    commands, _, _ = run_op(monkeypatch, btrfs, btrfs.swapfile, {btrfs.SwapfileState: small}, path=SWAPFILE, swapfile=SIZE)
    assert len(commands) == 1 and unjoined(commands) == [f"rm -f {SWAPFILE}", *CREATE]
    cow = dict(good, nocow=False, active=True)
    with pytest.raises(TabulaError, match="No_COW.*active swap"):
        run_op(monkeypatch, btrfs, btrfs.swapfile, {btrfs.SwapfileState: cow}, path=SWAPFILE, swapfile=SIZE)


def test_a_run_says_where_the_top_level_stays_mounted_and_how_to_close_the_disks():
    """The guide's end of install (umount -R /mnt; cryptsetup close cryptroot) fails while the top
    level is mounted at /run/tabula/btrfs/<label>: each run that keeps it says so, with the commands
    (run by test_btrfs_profile in the VM). A profile without btrfs subvolumes says nothing."""
    from tests.unit.vm_vars import ZFS_VARS
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/x", "swap_size": "256M"})
    assert btrfs.top_level_notes(profile) == [
        "the top level of /dev/mapper/cryptroot stays mounted at /run/tabula/btrfs/nixos (the next run reads its "
        "subvolumes there); to close the disks after this run: umount -R /mnt; umount /run/tabula/btrfs/nixos; "
        "cryptsetup close cryptroot"]
    assert btrfs.top_level_notes(load_profile("zfs-raidz1", ZFS_VARS)) == []
