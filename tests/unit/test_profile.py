"""The profile model: the shipped profiles load as the references describe, bad input names its field."""

import textwrap

import pytest

from operations import persist
from operations.profile import ProfileError, host_hash, load_profile, parse_size
from operations.secrets import SecretError, read_secret
from operations.settings import load_settings
from tests.unit.vm_vars import LIGHT_VARS, NVME, ZFS_VARS



def test_sizes_are_binary_units():
    assert parse_size("1GiB") == parse_size("1G") == 1024**3
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="bad size"):
        parse_size("12Q")


def test_host_hash_is_sha256_prefix():
    # printf tabula-zfs | sha256sum | cut -c1-8
    assert host_hash("tabula-zfs") == "2790ee34"
    assert len(host_hash("x")) == 8


TREE = """
name: tree
nixos: {hostname: box, user: ada}
disks:
  main:
    device: /dev/disk/by-id/virtio-X
    partitions:
      - {label: ESP, type: ef00, size: 512M, content: {type: filesystem, format: vfat, mountpoint: /boot, mount_options: [umask=077]}}
      - {label: sw, type: "8200", size: 1G, content: {type: swap}}
      - label: sealed
        size: rest
        content:
          type: luks
          mapper: vault
          content:
            type: filesystem
            format: btrfs
            subvolumes:
              - {path: "@log", mountpoint: /var/log, mount_options: [noatime]}
              - {path: "@var", mountpoint: /var}
              - {path: "@root", mountpoint: /, mount_options: [compress=zstd]}
              - {path: "@swap", mountpoint: /swap, swapfile: {size: 1GiB}}
mounts:
  - {type: bind, source: /var/lib/x, mountpoint: /x, options: [nodev]}
"""


def test_the_model_derives_devices_and_mounts_from_the_tree(tmp_path):
    """What the stages use, derived from the nesting: a partition's device is its partlabel link,
    what a LUKS container holds is on its mapper, a subvolume mounts with subvol=, a bind with
    bind, and the mounts come parents first whatever order the YAML lists them in."""
    profile = load_profile(write_profile(tmp_path, TREE))
    assert [(device, fs.format) for device, fs in profile.filesystems()] == [
        ("/dev/disk/by-partlabel/ESP", "vfat"), ("/dev/mapper/vault", "btrfs")]
    assert [device for device, _ in profile.swaps()] == ["/dev/disk/by-partlabel/sw"]
    assert [(part.device, luks.mapper) for part, luks in profile.luks_devices()] == [
        ("/dev/disk/by-partlabel/sealed", "vault")]
    assert [(m.mountpoint, m.device, m.fstype, m.options) for m in profile.all_mounts()] == [
        ("/", "/dev/mapper/vault", "btrfs", ("subvol=@root", "compress=zstd")),
        ("/boot", "/dev/disk/by-partlabel/ESP", "vfat", ("umask=077",)),
        ("/swap", "/dev/mapper/vault", "btrfs", ("subvol=@swap",)),
        ("/var", "/dev/mapper/vault", "btrfs", ("subvol=@var",)),
        ("/x", "/var/lib/x", "none", ("bind", "nodev")),
        ("/var/log", "/dev/mapper/vault", "btrfs", ("subvol=@log", "noatime")),
    ]
    swapfile = next(s.swapfile for _, fs in profile.filesystems() for s in fs.subvolumes if s.swapfile)
    assert swapfile.size_bytes == 1024**3


def test_inventory_vars_override_defaults():
    profile = load_profile("zephyrus-btrfs", {
        "disk": NVME, "hostname": "g16", "user": "ada", "swap_size": "256M",
        "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000,
    })
    assert profile.nixos.hostname == "g16" and profile.nixos.user == "ada"
    luks = profile.luks_devices()[0][1]
    assert (luks.pbkdf, luks.pbkdf_iterations) == ("pbkdf2", 1000)  # typed, not the string "1000"
    assert luks.content.subvolumes[-1].swapfile.size_bytes == 256 * 1024**2


def test_labels_and_pool_names_derive_from_the_host_name():
    """${hash} is the host's: another host name gives other labels, pool name and hostId, so two
    machines' disks never clash by partlabel; pool members are found by those labels."""
    one, other = load_profile("zfs-raidz1", ZFS_VARS), load_profile("zfs-raidz1", ZFS_VARS | {"hostname": "nas-2"})
    for profile, hostname in ((one, "tabula-zfs"), (other, "nas-2")):
        h = host_hash(hostname)
        assert all(p.label.endswith(f"-{h}") for _, _, p in profile.partitions())
        assert profile.pools["rpool"].name == f"rpool-{h}" and profile.host_id == h
        assert all(device == f"/dev/disk/by-partlabel/{part.label}" for device, part in profile.pool_members("rpool"))
    assert not {p.label for _, _, p in one.partitions()} & {p.label for _, _, p in other.partitions()}


# --- bad input: each rejected with a message naming the field ------------------------------

BAD_VARS = [
    ({}, "tabula_vars['disk']"),
    ({"disk": "/dev/sda"}, "disks.main.device"),
    ({"disk": NVME, "swap_size": "12Q"}, "swapfile.size"),
    ({"disk": NVME, "hostname": "Bad_Host"}, "nixos.hostname"),
    ({"disk": NVME, "user": "root"}, "nixos.user"),
    ({"disk": NVME, "luks_pbkdf": "scrypt"}, "pbkdf"),
    ({"disk": NVME, "luks_pbkdf_iterations": 10}, "pbkdf_iterations"),
    ({"disk": NVME, "luks_pbkdf_iterations": "many"}, "pbkdf_iterations"),
    ({"disk": NVME, "dsik": NVME}, "unknown variable(s) ['dsik']"),
    ({"disk": NVME, "disk_size": "512M"}, "declared as 512M"),
]


@pytest.mark.parametrize("variables,expected", BAD_VARS, ids=[e for _, e in BAD_VARS])
def test_bad_vars_name_the_field(variables, expected):
    with pytest.raises(ProfileError) as err:
        load_profile("zephyrus-btrfs", variables)
    assert expected in str(err.value)


def write_profile(tmp_path, body: str):
    path = tmp_path / "custom.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


BASE = """
name: custom
nixos: {hostname: box, user: ada}
disks:
  main:
    device: /dev/disk/by-id/virtio-X
    partitions:
      - {label: EFI, type: ef00, size: 512M, content: {type: filesystem, format: vfat, mountpoint: /boot}}
      - label: data
        size: rest
        content:
          type: filesystem
          format: btrfs
          subvolumes: [SUBVOLS]
"""


@pytest.mark.parametrize("subvols,expected", [
    ("{path: '@root', mountpoint: /}, {path: 'a/b', mountpoint: /x}", "invalid subvolume name 'a/b'"),
    ("{path: '@root', mountpoint: /}, {path: '@home', mountpoint: /home}, {path: '@h2', mountpoint: /home}", "mount points used twice"),
    ("{path: '@root', mountpoint: /}, {path: '@root', mountpoint: /r}", "subvolume names used twice"),
    ("{path: '@root', mountpoint: /, mount_option: [noatime]}", "unknown key"),
    ("{path: '@home', mountpoint: /home}", "no file system is mounted at '/'"),
    ("{path: '@root', mountpoint: 'relative'}", "must be an absolute path"),
])
def test_bad_layouts_are_rejected(tmp_path, subvols, expected):
    with pytest.raises(ProfileError) as err:
        load_profile(write_profile(tmp_path, BASE.replace("SUBVOLS", subvols)))
    assert expected in str(err.value)


def test_raidz1_with_two_disks_is_rejected(tmp_path):
    import yaml
    from operations.profile import profile_path

    raw = yaml.safe_load(profile_path("zfs-raidz1").read_text())
    raw["pools"]["rpool"]["vdevs"][0]["members"].pop()
    del raw["disks"]["raidz3"]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"raidz1 needs at least 3 members, got 2"):
        load_profile(str(path), ZFS_VARS | {})  # rz3 var is still declared, just unused


def test_invalid_dataset_name_is_rejected(tmp_path):
    import yaml
    from operations.profile import profile_path

    raw = yaml.safe_load(profile_path("zfs-raidz1").read_text())
    raw["pools"]["rpool"]["datasets"][1]["name"] = "temp/ro ot"
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"pools.rpool.datasets.1.name: invalid dataset name"):
        load_profile(str(path), ZFS_VARS)


def test_two_disks_on_one_device_are_rejected():
    with pytest.raises(ProfileError, match="two disks name the same device"):
        load_profile("zfs-raidz1", ZFS_VARS | {"rz2": ZFS_VARS["rz1"]})


def test_pool_member_must_be_a_zfs_partition(tmp_path):
    import yaml
    from operations.profile import profile_path

    raw = yaml.safe_load(profile_path("zfs-raidz1").read_text())
    raw["pools"]["rpool"]["log"] = ["boot-${hash}"]
    path = tmp_path / "log.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"has no content 'type: zfs, pool: rpool'"):
        load_profile(str(path), ZFS_VARS)


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ProfileError, match=r"unknown profile 'zephyrus-zfs'.*zephyrus-btrfs"):
        load_profile("zephyrus-zfs", {})


def test_misspelled_key_in_yaml_is_named(tmp_path):
    body = BASE.replace("SUBVOLS", "{path: '@root', mountpoint: /}").replace("format: vfat", "fromat: vfat")
    with pytest.raises(ProfileError, match=r"fromat: unknown key"):
        load_profile(write_profile(tmp_path, body))


def test_settings_name_the_data_key():
    with pytest.raises(ProfileError, match="tabula_profile|unknown profile"):
        load_settings({"tabula_profile": "nope"})
    from operations.errors import TabulaError

    with pytest.raises(TabulaError, match="tabula_vars: must be a mapping"):
        load_settings({"tabula_profile": "zephyrus-btrfs", "tabula_vars": "disk=x"})
    with pytest.raises(TabulaError, match="tabula_confirm_wipe"):
        load_settings({"tabula_profile": "zephyrus-btrfs", "tabula_vars": {"disk": NVME}, "tabula_confirm_wipe": [1]})
    settings = load_settings({"tabula_profile": "zephyrus-btrfs", "tabula_vars": {"disk": NVME}, "tabula_confirm_wipe": NVME})
    assert settings.tabula_confirm_wipe == (NVME,)


# --- secrets from the controller -----------------------------------------------------------


def test_secret_from_env_does_not_print_itself(monkeypatch):
    monkeypatch.setenv("TABULA_LUKS_PASSPHRASE", "hunter2-correct-horse")
    secret = read_secret("LUKS_PASSPHRASE")
    assert secret.reveal() == "hunter2-correct-horse"
    assert "hunter2" not in repr(secret) and "hunter2" not in f"{secret}"


def test_secret_missing_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("TABULA_LUKS_PASSPHRASE", raising=False)
    monkeypatch.delenv("TABULA_LUKS_PASSPHRASE_FILE", raising=False)
    with pytest.raises(SecretError, match="TABULA_LUKS_PASSPHRASE or TABULA_LUKS_PASSPHRASE_FILE"):
        read_secret("LUKS_PASSPHRASE")


def test_secret_file_must_be_private_and_readable(monkeypatch, tmp_path):
    monkeypatch.delenv("TABULA_LUKS_PASSPHRASE", raising=False)
    path = tmp_path / "pass"
    path.write_text("s3cret\n")
    path.chmod(0o644)
    monkeypatch.setenv("TABULA_LUKS_PASSPHRASE_FILE", str(path))
    with pytest.raises(SecretError, match="readable by others"):
        read_secret("LUKS_PASSPHRASE")
    path.chmod(0o600)
    assert read_secret("LUKS_PASSPHRASE").reveal() == "s3cret"
    monkeypatch.setenv("TABULA_LUKS_PASSPHRASE_FILE", str(tmp_path / "absent"))
    with pytest.raises(SecretError, match="cannot read the file"):
        read_secret("LUKS_PASSPHRASE")


def test_headless_profile_without_a_way_in_is_refused_naming_the_var():
    from tests.unit.vm_vars import TEST_AUTHORIZED_KEY, ZFS_VARS
    no_key = {k: v for k, v in ZFS_VARS.items() if k != "authorized_keys"}
    with pytest.raises(ProfileError, match=r"nobody could log in to this headless machine.*tabula_vars\['authorized_keys'\]"):
        load_profile("zfs-raidz1", no_key)
    # a key for root is a way in; so is SSH password login (the install then needs the hash)
    assert load_profile("zfs-raidz1", {**no_key, "root_authorized_keys": [TEST_AUTHORIZED_KEY],
                                       "remote_unlock": False}).nixos.root_authorized_keys
    assert load_profile("zfs-raidz1", {**no_key, "ssh_password_login": True, "remote_unlock": False}).nixos.ssh_password_login
    # a machine with a console (the G16) logs in there with its password hash
    assert load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/nvme-X"}).nixos.authorized_keys == []


def test_authorized_keys_are_checked_and_remote_unlock_needs_one():
    from tests.unit.vm_vars import TEST_AUTHORIZED_KEY, LIGHT_VARS
    with pytest.raises(ProfileError, match=r"nixos\.authorized_keys: not an SSH public key line: 'ssh-ed25519 nope'"):
        load_profile("light-tmpfs-f2fs", {**LIGHT_VARS, "authorized_keys": ["ssh-ed25519 nope"]})
    with pytest.raises(ProfileError, match=r"remote_unlock needs an SSH key.*tabula_vars\['authorized_keys'\]"):
        load_profile("light-tmpfs-f2fs", {**LIGHT_VARS, "remote_unlock": True})
    light = load_profile("light-tmpfs-f2fs", {**LIGHT_VARS, "remote_unlock": True,
                                              "authorized_keys": [f"  {TEST_AUTHORIZED_KEY}\n"]})
    assert light.nixos.authorized_keys == [TEST_AUTHORIZED_KEY]
    assert persist.paths(light).initrd_host_key == "/remote/etc/secrets/initrd/ssh_host_ed25519_key"


def test_inventory_examples_load():
    """The named hosts of inventory.py are what users copy: each loads with its own data, and
    the headless server can be logged in to and unlocked over SSH."""
    import runpy
    from pathlib import Path

    inventory = runpy.run_path(str(Path(__file__).resolve().parents[2] / "inventory.py"))
    hosts = dict(inventory["laptops"] + inventory["servers"])
    for data in hosts.values():
        load_profile(data["tabula_profile"], data["tabula_vars"])
    nas = load_profile(hosts["nas-live"]["tabula_profile"], hosts["nas-live"]["tabula_vars"])
    assert nas.nixos.headless and nas.nixos.authorized_keys and nas.nixos.remote_unlock
