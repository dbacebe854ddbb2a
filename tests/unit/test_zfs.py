"""The ZFS layer's pure parts: zpool status parsing, topology comparison, pool creation command,
property drift, dataset order, and the NixOS module (valid Nix, hostId, rollback service)."""

import pytest

from operations import zfs
from operations.nixpatch import parse
from operations.profile import ProfileError, host_hash, load_profile
from tests.unit.vm_vars import LIGHT_VARS, ZFS_VARS

HASH = host_hash("tabula-zfs")

# Captured in the live VM: `zpool status -PL` of the zfs-raidz1 profile's pool right after creation.
RAIDZ1_STATUS = f"""\
  pool: rpool-{HASH}
 state: ONLINE
config:

\tNAME            STATE     READ WRITE CKSUM
\trpool-{HASH}  ONLINE       0     0     0
\t  raidz1-0      ONLINE       0     0     0
\t    /dev/vdb1   ONLINE       0     0     0
\t    /dev/vdc1   ONLINE       0     0     0
\t    /dev/vdd1   ONLINE       0     0     0
\tlogs\t
\t  /dev/vde3     ONLINE       0     0     0
\tcache
\t  /dev/vde4     ONLINE       0     0     0

errors: No known data errors
"""

STRIPE_STATUS = """\
  pool: rpool-x
 state: ONLINE
config:

\tNAME         STATE     READ WRITE CKSUM
\trpool-x      ONLINE       0     0     0
\t  /dev/vde4  ONLINE       0     0     0

errors: No known data errors
"""


def raidz1_state(status: str = RAIDZ1_STATUS) -> dict:
    devices = {
        f"/dev/disk/by-partlabel/rpool-rz1-{HASH}": "/dev/vdb1",
        f"/dev/disk/by-partlabel/rpool-rz2-{HASH}": "/dev/vdc1",
        f"/dev/disk/by-partlabel/rpool-rz3-{HASH}": "/dev/vdd1",
        f"/dev/disk/by-partlabel/rpool-zil-{HASH}": "/dev/vde3",
        f"/dev/disk/by-partlabel/rpool-arc-{HASH}": "/dev/vde4",
    }
    return {"state": "imported", "topology": zfs.parse_zpool_status(status.splitlines()), "devices": devices}


def test_zpool_status_topology_is_parsed():
    topology = zfs.parse_zpool_status(RAIDZ1_STATUS.splitlines())
    assert topology["vdevs"] == [("raidz1", ["/dev/vdb1", "/dev/vdc1", "/dev/vdd1"])]
    assert topology["log"] == ["/dev/vde3"]
    assert topology["cache"] == ["/dev/vde4"]
    assert zfs.parse_zpool_status(STRIPE_STATUS.splitlines())["vdevs"] == [("stripe", ["/dev/vde4"])]


def test_the_profile_pool_matches_its_own_topology():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    devices = zfs.member_devices(profile, "rpool")
    assert zfs.topology_differences(profile.pools["rpool"], devices, raidz1_state()) == []


def test_a_pool_with_log_and_cache_swapped_differs():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    swapped = RAIDZ1_STATUS.replace("/dev/vde3", "/dev/TMP").replace("/dev/vde4", "/dev/vde3").replace("/dev/TMP", "/dev/vde4")
    problems = zfs.topology_differences(profile.pools["rpool"], zfs.member_devices(profile, "rpool"), raidz1_state(swapped))
    assert any(p.startswith("log") for p in problems) and any(p.startswith("cache") for p in problems)


def test_a_stripe_instead_of_raidz1_differs():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    flat = RAIDZ1_STATUS.replace("\t  raidz1-0      ONLINE       0     0     0\n", "").replace("\t    /dev/vd", "\t  /dev/vd")
    problems = zfs.topology_differences(profile.pools["rpool"], zfs.member_devices(profile, "rpool"), raidz1_state(flat))
    assert problems and problems[0].startswith("data vdevs")


def test_pool_is_created_with_exact_topology_and_properties():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    command = zfs.create_pool_command(profile.pools["rpool"], zfs.member_devices(profile, "rpool")).get_raw_value()
    part = "/dev/disk/by-partlabel/rpool"
    assert command.endswith(
        f"rpool-{HASH} raidz1 {part}-rz1-{HASH} {part}-rz2-{HASH} {part}-rz3-{HASH} "
        f"log {part}-zil-{HASH} cache {part}-arc-{HASH}"
    )
    for option in ("-o ashift=12", "-o cachefile=none", "-O compression=zstd", "-O xattr=sa",
                   "-O acltype=posixacl", "-O mountpoint=none"):
        assert option in command


def test_property_drift_splits_settable_from_one_time():
    current = {"sync": ("standard", "default"), "encryption": ("off", "default"), "atime": ("off", "local")}
    settable, fixed = zfs.property_drift({"sync": "disabled", "atime": "off", "encryption": "aes-256-gcm"}, current)
    assert settable == {"sync": "disabled"}
    assert fixed == {"encryption": ("off", "aes-256-gcm")}


def test_datasets_are_ordered_parents_first_and_mounted_ones_are_legacy():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    ordered = zfs.ordered_datasets(profile.pools["rpool"])
    names = [d.name for d in ordered]
    for ds in names:
        if "/" in ds:
            assert names.index(ds.rsplit("/", 1)[0]) < names.index(ds)
    assert all(zfs.dataset_properties(d)["mountpoint"] == "legacy" for d in ordered if d.mountpoint)


def test_layout_categories_and_properties():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    pool = profile.pools["rpool"]
    by_mount = {d.mountpoint: d for d in pool.datasets if d.mountpoint}
    assert {mp: d.name for mp, d in by_mount.items()} == {
        "/": "temp/root", "/tmp": "temp/tmp", "/local": "local/system", "/nix": "local/nix",
        "/var/log": "local/logs", "/remote": "remote/system", "/home": "remote/home",
    }
    for mp in ("/", "/tmp", "/nix"):
        assert by_mount[mp].properties["sync"] == "disabled" and by_mount[mp].properties["logbias"] == "throughput"
    assert all(set(d.mount_options) >= {"nosuid", "nodev", "noatime"} for d in by_mount.values())
    assert [d.name for d in pool.datasets if d.empty_snapshot] == ["temp/root", "temp/tmp"]
    assert [d.name for d in pool.datasets if d.encryption] == ["remote"]
    assert pool.name == f"rpool-{HASH}" and pool.options["ashift"] == "12"


def test_rollback_script_rolls_back_every_temp_dataset():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    assert zfs.rollback_script(profile) == (
        f"set -eu\nzfs rollback -r rpool-{HASH}/temp/root@empty\nzfs rollback -r rpool-{HASH}/temp/tmp@empty\n"
    )


def as_module(bindings: str) -> str:
    return "{ config, lib, pkgs, ... }:\n{\n" + bindings + "}\n"


def test_nix_for_raidz1_is_valid_with_host_id_unlock_and_rollback_service():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    configuration, service = zfs.nix_configuration(profile), zfs.nix_rollback_service(profile)
    parse(as_module(configuration))  # raises on a syntax error
    parse(as_module(service))
    assert f'networking.hostId = "{profile.host_id}";' in configuration and profile.host_id == HASH
    assert 'boot.supportedFilesystems = [ "zfs" ];' in configuration
    assert f'boot.zfs.requestEncryptionCredentials = [ "rpool-{HASH}/remote" ];' in configuration
    assert f'after = [ "zfs-import-rpool-{HASH}.service" "systemd-hibernate-resume.service" ];' in service
    assert 'before = [ "sysroot.mount" ];' in service
    body = service.split("script = \'\'\n", 1)[1].split("    \'\';", 1)[0]
    assert [line.strip() for line in body.splitlines()] == zfs.rollback_script(profile).splitlines()


def test_nix_for_light_has_no_rollback():
    profile = load_profile("light-tmpfs-f2fs", LIGHT_VARS)
    configuration = zfs.nix_configuration(profile)
    parse(as_module(configuration))
    assert zfs.nix_rollback_service(profile) == ""
    assert f'networking.hostId = "{host_hash("tabula-light")}";' in configuration
    assert "f2fs" not in configuration      # the filesystems layer's (tests/unit/test_filesystems.py)


def test_no_pools_no_zfs_nix():
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"})
    assert zfs.nix_configuration(profile) == zfs.nix_rollback_service(profile) == ""


def test_a_dataset_without_its_parent_is_refused(tmp_path):
    import yaml
    from operations.profile import profile_path

    raw = yaml.safe_load(profile_path("light-tmpfs-f2fs").read_text())
    raw["pools"]["rpool"]["datasets"] = [d for d in raw["pools"]["rpool"]["datasets"] if d["name"] != "remote"]
    path = tmp_path / "orphan.yaml"
    path.write_text(yaml.safe_dump(raw))
    # refused when the profile loads, naming the field, before any fact is read
    with pytest.raises(ProfileError, match=r"pools\.rpool.*needs its parent 'remote'"):
        load_profile(str(path), LIGHT_VARS)


def test_aliased_values_read_back_canonical_and_cause_no_drift():
    # zfs set acltype=posixacl reads back as "posix" (OpenZFS 2.1+): not drift
    settable, fixed = zfs.property_drift({"acltype": "posixacl", "xattr": "sa"},
                                         {"acltype": ("posix", "local"), "xattr": ("on", "default")})
    assert settable == {"xattr": "sa"} and fixed == {}
