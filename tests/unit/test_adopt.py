"""adopt.py's pure parts: what the layers infer from what was read (the reads themselves and the
whole adoption are proven in the VM: tests/e2e/test_adopt.py)."""
from __future__ import annotations

import pytest

from operations import btrfs
from operations.adopt import AdoptError, Draft, Found, load_adopt_settings
from operations.adoptlit import adopted_system, configured_persistence, size_text, user_options
from operations.errors import TabulaError
from operations.gpt import adopted_entry_problem
from operations.mounts import option_problems, parse_proc_mounts
from operations.nixfiles import render_files
from operations.profile import load_profile
from tests.unit.pyinfra_fake import fixture_lines
from tests.unit.vm_vars import ZFS_VARS

ZEPHYRUS_VARS = {"disk": "/dev/disk/by-id/x", "swap_size": "256M", "hostname": "zeph", "user": "ada"}


def test_a_blank_snapshot_is_found_after_the_install_and_on_the_booted_system():
    installed = btrfs.parse_subvolume_list(fixture_lines("btrfs_subvolumes_installed.txt"))
    assert btrfs.blank_snapshots(installed) == {"@root": "@root-blank"}
    # booted: @root was made again from @root-blank (its parent_uuid is the blank's uuid)
    booted = {path: dict(sub) for path, sub in installed.items()}
    booted["@root"]["parent_uuid"], booted["@root-blank"]["parent_uuid"] = booted["@root-blank"]["uuid"], None
    assert btrfs.blank_snapshots(booted) == {"@root": "@root-blank"}
    # a read-only subvolume that is no snapshot of another is no blank snapshot
    alone = {path: dict(sub) for path, sub in installed.items()}
    alone["@root-blank"]["parent_uuid"] = None
    assert btrfs.blank_snapshots(alone) == {}
    # a read-only snapshot that holds data is a backup, never a blank to roll back to
    backup = {path: dict(sub) for path, sub in installed.items()}
    backup["@root-blank"]["empty"] = False
    assert btrfs.blank_snapshots(backup) == {}


def test_mount_options_read_back_keep_what_the_profile_mounts_with():
    mounts = parse_proc_mounts(fixture_lines("btrfs_proc_mounts_installed.txt"))
    home = mounts["/mnt/home"]["options"]
    kept = user_options(home)
    assert not any(o.startswith(("subvol", "space_cache", "rw")) or o in ("ssd", "relatime") for o in kept), kept
    assert option_problems(["compress=zstd", "noatime", "discard=async"], kept) == []
    assert user_options(["rw", "nosuid", "size=1048576k", "mode=755", "inode64"]) == ["nosuid", "size=1G"]
    assert size_text(1024**3) == "1GiB" and size_text(64 * 1024**2) == "64MiB" and size_text(1000) == "1000"


@pytest.mark.parametrize("profile_name, variables", [("zephyrus-btrfs", ZEPHYRUS_VARS), ("zfs-raidz1", ZFS_VARS)])
def test_the_host_and_what_persists_are_read_from_the_configuration_tabula_writes(profile_name, variables):
    profile = load_profile(profile_name, variables)
    files = render_files(profile, None, None, hardware_module=profile.nixos.hardware_module, placeholder=True)
    system, notes = adopted_system(files, [], "install-target", has_resume_swap=True)
    n = profile.nixos
    assert system["hostname"] == n.hostname and system["user"] == n.user and notes == []
    assert (system["timezone"], system["state_version"]) == (n.timezone, n.state_version)
    assert system.get("hardware_module") == n.hardware_module
    assert system.get("hibernate", False) == n.hibernate
    persisted = configured_persistence(files)
    assert persisted == {"root": profile.persistence.root, "directories": profile.persistence.directories,
                         "files": profile.persistence.files}


def test_without_a_configuration_the_host_and_user_are_inferred_and_said():
    system, notes = adopted_system({}, ["grace"], "Install_Target", has_resume_swap=False)
    assert system == {"hostname": "install-target", "user": "grace"}
    assert notes == ["nixos.hostname install-target: no networking.hostName in /etc/nixos, the inventory host's name",
                     "nixos.user grace: no users.users.<name> with isNormalUser in /etc/nixos, the only folder in /home"]


def test_gpt_entries_a_profile_cannot_hold_are_named():
    assert adopted_entry_problem(1, {"number": 1, "name": "EFI", "code": "EF00"}) is None
    assert adopted_entry_problem(2, {"number": 3, "name": "x", "code": "8300"}) == \
        "GPT entry 3 in place 2: a profile's partitions are entries 1, 2, ... in order"
    assert adopted_entry_problem(1, {"number": 1, "name": "", "code": "8300"}).startswith("no GPT partition name")
    assert adopted_entry_problem(1, {"number": 1, "name": "x", "code": "A504"}) == \
        "GPT type code A504 is not one Tabula knows (operations/gpt/types.py)"


def draft(partial: bool) -> Draft:
    found = Found(root="/mnt", devices=[], ids={}, mounts={}, pools=[])
    made = Draft(found, "adopted-t", "t", partial=partial)
    made.nixos = {"hostname": "t", "user": "ada"}
    made.disks["disk1"] = {"device": "/dev/disk/by-id/virtio-X", "partitions": [
        {"label": "scratch", "type": "8300", "size": "64MiB", "kernel_name": "/dev/vdb1"}]}
    made.mounts.append({"type": "tmpfs", "mountpoint": "/", "options": ["mode=755"], "needed_for_boot": True})
    made.refuse("/dev/vdb1", "LVM2_member: not a filesystem a profile describes")
    return made


def test_what_cannot_be_expressed_refuses_the_profile_unless_partial():
    with pytest.raises(AdoptError) as refused:
        draft(partial=False).yaml()
    assert str(refused.value) == ("the target holds what no Tabula profile can express, so no profile was written "
                                  "(tabula_adopt_partial=true writes one without these parts):\n"
                                  "  /dev/vdb1: LVM2_member: not a filesystem a profile describes")
    text = draft(partial=True).yaml()
    assert "# Left out, no profile can express them (tabula_adopt_partial=true):\n" \
           "#   - /dev/vdb1: LVM2_member: not a filesystem a profile describes\n" in text
    assert "kernel_name" not in text


def test_a_bad_adopt_setting_is_named():
    with pytest.raises(TabulaError) as bad:
        load_adopt_settings({"tabula_adopt_partial": "yes"})
    assert str(bad.value) == "tabula_adopt_partial: must be true or false, got 'yes'"
    with pytest.raises(TabulaError) as bad:
        load_adopt_settings({"tabula_adopt_profile": "out.txt"})
    assert str(bad.value) == "tabula_adopt_profile: must be a path ending in .yaml, got 'out.txt'"
    assert str(load_adopt_settings({}).destination("install-target")).endswith("profiles/adopted-install-target.yaml")


@pytest.mark.parametrize("signature", ["LVM2_member", "linux_raid_member", "xfs"])
def test_lvm_mdraid_and_other_filesystems_are_refused_with_their_device(signature):
    """The gpt and filesystems layers' adoption of a disk whose partition holds LVM, mdraid or a
    filesystem no profile describes: the partition is kept, its content refused by name."""
    from operations import filesystems, gpt
    from operations.run import request_key

    devices = [{"name": "/dev/vdb", "type": "disk", "size": 4 * 1024**3, "serial": "TABULA-RZ1", "partlabel": None,
                "fstype": None, "label": None, "parent": None, "mountpoints": []},
               {"name": "/dev/vdb1", "type": "part", "size": 1024**3, "serial": None, "partlabel": "data",
                "fstype": signature, "label": None, "parent": "/dev/vdb", "mountpoints": []}]
    table = {"label": "gpt", "device": "/dev/vdb", "sectorsize": 512, "lastlba": 8388574,
             "partitions": [{"node": "/dev/vdb1", "number": 1, "start": 2048, "size": 2097152, "code": "8E00",
                             "name": "data"}]}
    found = Found(root="/mnt", devices=devices, ids={"/dev/disk/by-id/virtio-TABULA-RZ1": "/dev/vdb"}, mounts={}, pools=[])
    found.facts[request_key(gpt.PartitionTable, {"disk": "/dev/vdb"})] = table
    made = Draft(found, "adopted-t", "t")
    gpt.LAYER.adopt(found, made)
    filesystems.LAYER.adopt(found, made)
    assert made.disks == {"disk1": {"device": "/dev/disk/by-id/virtio-TABULA-RZ1", "serial": "TABULA-RZ1", "partitions": [
        {"label": "data", "type": "8e00", "size": "1GiB", "kernel_name": "/dev/vdb1"}]}}
    assert made.refused == [f"/dev/vdb1: {signature}: not a filesystem a profile describes "
                            "(btrfs, ext4, f2fs, vfat, swap, LUKS, ZFS)"]


def test_pools_a_profile_cannot_hold_are_named_and_mount_points_lose_the_altroot():
    from operations.zfs import local_properties, unadoptable_pool

    plain = {"vdevs": [("raidz1", ["/dev/vdb1", "/dev/vdc1", "/dev/vdd1"])], "log": ["/dev/vda3"], "cache": [], "spare": []}
    assert unadoptable_pool(plain, {"encryption": ("off", "default")}) is None
    assert unadoptable_pool({**plain, "log": [("mirror", ["/dev/a", "/dev/b"])]}, {}).startswith("a mirrored log")
    assert unadoptable_pool({**plain, "spare": ["/dev/vde1"]}, {}) == "hot spares: a profile has no place for them"
    assert unadoptable_pool(plain, {"encryption": ("aes-256-gcm", "local")}).startswith("its root dataset is encrypted")
    props = {"mountpoint": ("/mnt/home", "local"), "compression": ("zstd", "local"), "atime": ("on", "default"),
             "keylocation": ("prompt", "local")}
    assert local_properties(props, "/mnt") == {"mountpoint": "/home", "compression": "zstd"}
    assert local_properties(props, "/") == {"mountpoint": "/mnt/home", "compression": "zstd"}


def test_persistence_entries_given_as_attribute_sets_are_left_out():
    text = {"c": 'environment.persistence."/persist" = {\n directories = [\n "/var/lib/nixos"\n'
                 '  { directory = "/var/lib/colord"; user = "colord"; mode = "u=rwx,g=rx,o="; }\n ];\n'
                 ' files = [ "/etc/machine-id" ];\n};'}
    assert configured_persistence(text) == {"root": "/persist", "directories": ["/var/lib/nixos"],
                                            "files": ["/etc/machine-id"]}
