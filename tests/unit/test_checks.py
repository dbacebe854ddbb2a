"""The layers' problems (``Layer.problems``, read through a testinfra host) on outputs
captured in the VM: an installed target gives no line, a target that differs gives one line per
mismatch naming it; the verification's settings come from the inventory as the deploy's do."""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

import pytest

from operations import btrfs, gpt, luks, mounts, nixos, persist, verify
from operations.errors import TabulaError
from operations.nixfiles import render_files
from operations.profile import load_profile
from operations.settings import Settings
from tests.unit.pyinfra_fake import FIXTURES
from tests.unit.vm_vars import NVME

VM_VARS = {"disk": NVME, "swap_size": "256M", "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000}


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str = ""


class FakeTestinfraHost:
    """Answers commands by the first pattern that matches them; an unexpected command fails."""

    def __init__(self, answers: list[tuple[str, str | Result]]):
        self.answers = answers
        self.commands: list[str] = []

    def run(self, command: str) -> Result:
        self.commands.append(command)
        for pattern, answer in self.answers:
            if re.search(pattern, command):
                return answer if isinstance(answer, Result) else Result(0, answer)
        raise AssertionError(f"unexpected command: {command}")

    def check_output(self, command: str) -> str:
        return self.run(command).stdout.strip()


def problems(layer_module, host, settings, root: str) -> list[str]:
    """A layer's problems, read through the (fake) testinfra host as verify reads them."""
    return layer_module.LAYER.problems(verify.HostTarget(host, settings, root))


def stat_output(states: dict[str, tuple[str, str, str]]) -> str:
    """What PathsState's command prints for {path: (type, "mode user", sha256 or "")}."""
    kinds = {"file": "regular file", "directory": "directory"}
    lines = [f"{kinds[kind]}\t{mode_user}\t{path}" for path, (kind, mode_user, _) in states.items()]
    lines += ["##sha256##"] + [f"{sha}  {path}" for path, (kind, _, sha) in states.items() if kind == "file"]
    return "\n".join(lines) + "\n"


def captured(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def settings():
    return Settings.of(load_profile("zephyrus-btrfs", VM_VARS), tabula_install=False)


READLINK = [(r"readlink -f /dev/disk/by-partlabel/EFI", "/dev/nvme0n1p1\n"),
            (r"readlink -f /dev/nvme0n1p1", "/dev/nvme0n1p1\n"),
            (r"readlink -f /dev/disk/by-partlabel/cryptroot", "/dev/nvme0n1p2\n"),
            (r"readlink -f /dev/nvme0n1p2", "/dev/nvme0n1p2\n")]


def test_mounts_as_installed_match(settings):
    host = FakeTestinfraHost([(r"cat /proc/mounts", captured("btrfs_proc_mounts_installed.txt")), *READLINK])
    assert problems(mounts, host, settings, "/mnt") == []


def test_a_mount_option_that_differs_is_one_line(settings):
    text = captured("btrfs_proc_mounts_installed.txt").replace("/mnt/home btrfs rw,noatime,", "/mnt/home btrfs rw,relatime,")
    text = "\n".join(line for line in text.splitlines() if " /mnt/var/log " not in line)
    host = FakeTestinfraHost([(r"cat /proc/mounts", text), *READLINK])
    assert problems(mounts, host, settings, "/mnt") == [
        "/mnt/home: options rw,relatime,compress=zstd:3,ssd,discard=async,space_cache=v2,subvolid=259,"
        "subvol=/@home lack noatime",
        "/mnt/var/log: not mounted (the profile mounts btrfs /dev/mapper/cryptroot there)",
    ]


def test_on_the_booted_system_the_mounts_are_at_root_and_swap_is_active(settings):
    text = captured("btrfs_proc_mounts_installed.txt").replace(" /mnt", " ").replace("  btrfs", " / btrfs")
    host = FakeTestinfraHost([(r"cat /proc/mounts", text), *READLINK,
                              (r"cat /proc/swaps", "Filename Type Size Used Priority\n")])
    assert problems(mounts, host, settings, "/") == ["/swap/swapfile: not active swap"]


@pytest.mark.parametrize("wanted, actual, problems", [
    (["size=2G"], ["rw", "size=2097152k", "mode=755"], []),
    (["size=1G"], ["rw", "size=2097152k"], ["size=1G"]),          # a wrong bound is a mismatch
    (["size=50%"], ["rw", "size=2009216k"], []),                  # a share of RAM: not compared
])
def test_a_tmpfs_size_is_compared_by_value(wanted, actual, problems):
    assert mounts.size_problems(wanted, actual) == problems


def test_luks_as_installed_matches_and_missing_flags_are_named(settings):
    answers = [(r"luksDump --dump-json-metadata", captured("luks_tokens_none.json")),
               (r"cryptsetup luksDump", captured("btrfs_luksdump_cryptroot.txt")), *READLINK]
    host = FakeTestinfraHost([*answers, (r"cryptsetup status", captured("btrfs_cryptsetup_status.txt"))])
    assert problems(luks, host, settings, "/mnt") == []
    plain = captured("btrfs_cryptsetup_status.txt").replace("discards no_read_workqueue no_write_workqueue", "discards")
    host = FakeTestinfraHost([*answers, (r"cryptsetup status", plain)])
    assert problems(luks, host, settings, "/mnt") == [
        "/dev/mapper/cryptroot: flags discards lack no_read_workqueue no_write_workqueue"]
    host = FakeTestinfraHost([*answers, (r"cryptsetup status", "")])
    assert problems(luks, host, settings, "/mnt") == ["/dev/mapper/cryptroot: not open"]


def test_gpt_as_installed_matches_and_a_wrong_type_guid_is_named(settings):
    efi = captured("btrfs_blkid_efi.txt")
    root = efi.replace("PART_ENTRY_NAME=EFI", "PART_ENTRY_NAME=cryptroot").replace(
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "0fc63daf-8483-4772-8e79-3d69d8477de4")
    answers = [(r"sgdisk -p", captured("btrfs_partition_table_installed.txt")),
               (r"blkid -p -o export /dev/disk/by-partlabel/EFI", efi)]
    host = FakeTestinfraHost([*answers, (r"blkid -p -o export /dev/disk/by-partlabel/cryptroot", root)])
    assert problems(gpt, host, settings, "/mnt") == []
    wrong = root.replace("0fc63daf-8483-4772-8e79-3d69d8477de4", gpt.type_guid("8309").lower())
    host = FakeTestinfraHost([*answers, (r"blkid -p -o export /dev/disk/by-partlabel/cryptroot", wrong)])
    assert problems(gpt, host, settings, "/mnt") == [
        "/dev/disk/by-partlabel/cryptroot: type GUID ca7d7ccb-63ed-4c53-861c-1742536059cc, the profile wants "
        "0fc63daf-8483-4772-8e79-3d69d8477de4 (8300)"]


def test_btrfs_as_installed_matches_and_a_blank_of_another_parent_is_named(settings):
    listed = captured("btrfs_subvolumes_installed.txt")
    swapfile = [(r"lsattr", captured("btrfs_swapfile_state.txt")),
                (r"stat -c %a /mnt/swap/swapfile", "600\n")]
    host = FakeTestinfraHost([(r"btrfs subvolume list", listed), *swapfile])
    assert problems(btrfs, host, settings, "/mnt") == []
    other = listed.replace("parent_uuid e1f161af-689e-c84c-a452-cfd9fde8b4b8", "parent_uuid 5aa071dc-2e9c-3247-879e-136408641013")
    host = FakeTestinfraHost([(r"btrfs subvolume list", other), *swapfile])
    assert problems(btrfs, host, settings, "/mnt") == [
        "/dev/mapper/cryptroot: @root-blank is not a snapshot of @root (its parent 5aa071dc-2e9c-3247-879e-136408641013, "
        "@root is e1f161af-689e-c84c-a452-cfd9fde8b4b8) nor is @root restored from it"]


def test_btrfs_after_a_rollback_the_root_is_restored_from_the_blank(settings):
    """On the booted system @root is a snapshot of @root-blank (the initrd restored it)."""
    listed = captured("btrfs_subvolumes_installed.txt").replace(
        "parent 5 top level 5 parent_uuid -                                    uuid e1f161af",
        "parent 5 top level 5 parent_uuid 80689318-894b-0140-860f-e356dd1d970d uuid 11111111").replace(
        "parent_uuid e1f161af-689e-c84c-a452-cfd9fde8b4b8", "parent_uuid e1f161af-0000-0000-0000-000000000000")
    host = FakeTestinfraHost([(r"btrfs subvolume list", listed), (r"lsattr", captured("btrfs_swapfile_state.txt")),
                              (r"stat -c %a /swap/swapfile", "600\n")])
    assert problems(btrfs, host, settings, "/") == []


def test_persist_names_a_seeded_file_with_the_wrong_mode(settings):
    wanted = {"/mnt/persist/secrets": ("directory", "700 root", ""), "/mnt/persist/etc/machine-id": ("file", "444 root", "x")}
    for key_type in ("ed25519", "rsa"):
        key = f"/mnt/persist/etc/ssh/ssh_host_{key_type}_key"
        wanted[key] = ("file", "644 root", "x") if key_type == "ed25519" else ("file", "600 root", "x")
        wanted[f"{key}.pub"] = ("file", "644 root", "x")
    state = stat_output(wanted)
    host = FakeTestinfraHost([
        (r"stat -c", state),
        (r"ssh-keygen -lf \S+ed25519", "256 SHA256:aaaa root@zephyrus (ED25519)\n"),
        (r"ssh-keygen -lf \S+rsa", "4096 SHA256:bbbb root@zephyrus (RSA)\n"),
        (r"sha256sum", "d1g3st\n"),
        (r"cat /mnt/persist/etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
    ])
    assert problems(persist, host, settings, "/mnt") == [
        "/mnt/persist/etc/ssh/ssh_host_ed25519_key: file 644 root, the profile wants file 600 root"]
    # a run that installs must have seeded the password hashes
    installing = Settings.of(settings.profile, tabula_install=True)
    assert problems(persist, host, installing, "/mnt")[:2] == [
        "/mnt/persist/secrets/root-password: missing", "/mnt/persist/secrets/sean-password: missing"]


def test_a_check_that_cannot_read_the_target_says_so(settings):
    host = FakeTestinfraHost([(r"sgdisk", Result(1, "", "tabula: sgdisk (gdisk) is missing on the target"))])
    assert verify.check_layer(gpt.LAYER, host, settings, "/mnt") == [
        "could not read the target: reading PartitionTable failed (exit 1): tabula: sgdisk (gdisk) is missing on the target"]


def test_the_install_root_is_found_or_given():
    installed = captured("btrfs_proc_mounts_installed.txt")
    assert verify.install_root(FakeTestinfraHost([(r"cat /proc/mounts", installed)])) == "/mnt"
    booted = "\n".join(line for line in installed.splitlines() if " /mnt" not in line)
    assert verify.install_root(FakeTestinfraHost([(r"cat /proc/mounts", booted)])) == "/"
    assert verify.install_root(FakeTestinfraHost([]), "/") == "/"
    assert verify.settings_from_inventory("nas-live", data={"tabula_root": "/"}).tabula_root == "/"


def test_settings_come_from_the_inventory_as_the_deploys_do():
    data = verify.parse_data([f'tabula_vars={{"disk": "{NVME}"}}', "tabula_install=false"])
    settings = verify.settings_from_inventory("install-target", data=data)
    assert settings.profile.name == "zephyrus-btrfs" and settings.profile.disks["main"].device == NVME
    assert settings.tabula_install is False
    # a named host of inventory.py brings its own profile and vars
    nas = verify.settings_from_inventory("nas-live")
    assert nas.profile.name == "zfs-raidz1" and nas.profile.nixos.hostname == "nas"
    # a host the inventory does not list gets group_data/all.py, as `pyinfra <host> deploy.py` does
    with pytest.raises(TabulaError, match="tabula_vars\\['disk'\\]"):
        verify.settings_from_inventory("192.0.2.44")
    with pytest.raises(TabulaError, match="KEY=VALUE"):
        verify.parse_data(["tabula_vars"])


def test_the_command_is_testinfras():
    argv = verify.command("ssh://install-target", {"tabula_profile": "zfs-raidz1", "tabula_vars": {"hostname": "n"},
                                                   "tabula_root": "/"}, ssh_config="/tmp/ssh_config")
    assert argv[1:6] == ["-m", "pytest", "tests/verify", "--hosts=ssh://install-target", "-p"]
    assert argv[argv.index("--ssh-config=/tmp/ssh_config") + 1:] == [
        "--tabula-data", "tabula_profile=zfs-raidz1", "--tabula-data", 'tabula_vars={"hostname": "n"}',
        "--tabula-data", "tabula_root=/"]


def test_generated_files_as_rendered_match_and_a_changed_line_is_quoted(settings):
    """nixos.checks renders the profile with the target's generated hardware configuration, UUIDs
    and DMI name (the real nixos-generate-config's file and ids captured in the VM) and compares."""
    ids_text = captured("nixos/real-zephyrus-btrfs.ids.txt")
    ids = nixos.BlockDeviceIds().process(ids_text.splitlines())
    generated = captured("nixos/real-zephyrus-btrfs.nix")
    module, _ = nixos.choose_hardware_module(settings.profile, "Standard PC (Q35 + ICH9, 2009)")
    offset_text = captured("btrfs_map_swapfile_resume_offset.txt")
    on_target = render_files(settings.profile, generated, ids, hardware_module=module,
                             facts={btrfs.RESUME_OFFSET: int(offset_text)})

    def host_with(files: dict[str, str], swapfile_offset: str = offset_text) -> FakeTestinfraHost:
        def filetext(name):
            return "present\n" + base64.b64encode(files[name].encode()).decode() + "\n"
        state = stat_output({f"/mnt/etc/nixos/{name}": ("file", "644 root", hashlib.sha256(text.encode()).hexdigest())
                             for name, text in files.items()})
        return FakeTestinfraHost([
            (r"filetext /mnt/etc/nixos/hardware-configuration.nix", filetext("hardware-configuration.nix")),
            (r"filetext /mnt/etc/nixos/configuration.nix", filetext("configuration.nix")),
            (r"blkid -o export", ids_text), (r"product_name", "Standard PC (Q35 + ICH9, 2009)\n"),
            (r"map-swapfile -r /mnt/swap/swapfile", swapfile_offset), (r"stat -c", state)])

    assert problems(nixos, host_with(on_target), settings, "/mnt") == []
    # hibernation: the swapfile made again elsewhere on the disk, the configuration still names the old offset
    written = f'  boot.kernelParams = [ "resume_offset={int(offset_text)}" ];'
    line = on_target["configuration.nix"].splitlines().index(written) + 1
    assert problems(nixos, host_with(on_target, swapfile_offset="99999\n"), settings, "/mnt") == [
        f"/mnt/etc/nixos/configuration.nix: differs from the profile's rendering at line {line}: "
        f"{written.strip()!r}, the profile has 'boot.kernelParams = [ \"resume_offset=99999\" ];'"]
    edited = dict(on_target, **{"configuration.nix": on_target["configuration.nix"].replace(
        'time.timeZone = "America/New_York";', 'time.timeZone = "UTC";')})
    found = problems(nixos, host_with(edited), settings, "/mnt")
    assert len(found) == 1 and found[0].startswith(
        "/mnt/etc/nixos/configuration.nix: differs from the profile's rendering at line "), found
    assert "'time.timeZone = \"UTC\";', the profile has 'time.timeZone = \"America/New_York\";'" in found[0]
