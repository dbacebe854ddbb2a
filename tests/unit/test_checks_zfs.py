"""The zfs and filesystems layers' checks (``problems``, what ``tests/verify`` runs), each line shown
on a drifted target. The target is zfs-raidz1 and light-tmpfs-f2fs as Tabula installed them:
every command the checks ran there, answered with what the VM printed
(tests/unit/fixtures/capture_checks.py); a drift is that output changed as the drifted target
would print it (a property set, a snapshot destroyed, a pool exported, another filesystem)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest

from operations import filesystems, verify, zfs
from operations.profile import load_profile
from operations.settings import Settings
from tests.unit.pyinfra_fake import FIXTURES
from tests.unit.test_checks import FakeTestinfraHost, captured as captured_text


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str = ""


class ReplayHost:
    """A testinfra host that answers each command with what the VM printed for it."""

    def __init__(self, answers: dict[str, list]):
        self.answers = answers

    def run(self, command: str) -> Result:
        assert command in self.answers, f"a command the capture did not run: {command[:200]}"
        return Result(*self.answers[command])

    def check_output(self, command: str) -> str:
        return self.run(command).stdout.strip()


def captured(profile_name: str) -> tuple[Settings, dict[str, list]]:
    data = json.loads((FIXTURES / f"checks_{profile_name}.json").read_text())
    return Settings.of(load_profile(profile_name, data["variables"]), tabula_install=False), data["answers"]


def problems(profile_name: str, layer, edit=None) -> list[str]:
    """The layer's lines on the captured target, each command's output passed through
    ``edit(command, output)`` first."""
    settings, answers = captured(profile_name)
    if edit is not None:
        answers = {command: [rc, edit(command, out), err] for command, (rc, out, err) in answers.items()}
    return layer.LAYER.problems(verify.HostTarget(ReplayHost(answers), settings, "/mnt"))


def pool_of(profile_name: str) -> str:
    settings, _ = captured(profile_name)
    (pool,) = settings.profile.pools.values()
    return pool.name


def in_command(word: str, change):
    """An edit that changes the output of the commands containing ``word`` only."""
    return lambda command, out: change(out) if word in command else out


def dataset_lines(out: str, dataset: str, keep: bool) -> str:
    """The ``zfs get`` output with (keep=False: without) the lines of exactly ``dataset``."""
    return "".join(line for line in out.splitlines(keepends=True) if (line.split("\t")[0] == dataset) == keep)


def set_property(out: str, dataset: str, key: str, value: str) -> str:
    return re.sub(rf"^({re.escape(dataset)}\t{key}\t)[^\t]*\t[^\t\n]*$", rf"\g<1>{value}\tlocal", out, flags=re.M)


@pytest.mark.parametrize("profile_name", ["zfs-raidz1", "light-tmpfs-f2fs"])
@pytest.mark.parametrize("layer", [zfs, filesystems])
def test_as_installed_nothing_is_reported(profile_name, layer):
    assert problems(profile_name, layer) == []


def test_an_exported_pool_is_not_imported():
    pool = pool_of("zfs-raidz1")
    found = problems("zfs-raidz1", zfs, in_command("zpool status", lambda out: re.sub(
        r"state imported\n(.|\n)*", "state absent\n", out)))
    assert found == [f"pool {pool}: not imported (an install exports it at the end: zpool import -N -R /mnt {pool}, "
                     "or run with tabula_export_pools=false)"]


def test_a_missing_log_device_is_a_topology_line():
    pool = pool_of("zfs-raidz1")
    found = problems("zfs-raidz1", zfs, in_command("zpool status", lambda out: re.sub(
        r"\tlogs\t\n\t  /dev/vde3 .*\n", "", out)))
    assert found == [f"pool {pool}: log [] (profile: ['/dev/vde3'])"]


def test_a_pool_option_that_differs():
    pool = pool_of("zfs-raidz1")
    found = problems("zfs-raidz1", zfs, in_command("zpool get", lambda out: out.replace("ashift\t12", "ashift\t9")))
    assert found == [f"pool {pool}: ashift=9, the profile wants 12"]


def test_a_root_property_and_a_dataset_property_that_differ():
    pool = pool_of("zfs-raidz1")
    found = problems("zfs-raidz1", zfs, in_command("zfs get", lambda out: set_property(
        set_property(out, pool, "compression", "lz4"), f"{pool}/temp", "sync", "standard")))
    assert found == [f"{pool}: compression=lz4, the profile wants zstd",
                     f"{pool}/temp: sync=standard, the profile wants disabled"]


def test_a_missing_dataset():
    pool = pool_of("zfs-raidz1")
    found = problems("zfs-raidz1", zfs, in_command("zfs get", lambda out: dataset_lines(out, f"{pool}/local/logs", False)))
    assert found == [f"{pool}/local/logs: dataset missing"]


def test_a_missing_empty_snapshot_and_one_the_profile_does_not_take():
    pool = pool_of("zfs-raidz1")

    def drift(out: str) -> str:
        out = dataset_lines(out, f"{pool}/temp/tmp@empty", False)
        taken = dataset_lines(out, f"{pool}/temp/root@empty", True)
        return out + taken.replace(f"{pool}/temp/root@empty", f"{pool}/local/nix@empty")
    found = problems("zfs-raidz1", zfs, in_command("zfs get", drift))
    assert found == [f"{pool}/temp/tmp: no @empty snapshot",        # (in the profile's order of datasets)
                     f"{pool}/local/nix: has an @empty snapshot the profile does not take"]


def test_an_encrypted_dataset_locked_and_a_child_with_its_own_key():
    pool = pool_of("zfs-raidz1")
    found = problems("zfs-raidz1", zfs, in_command("zfs get", lambda out: set_property(
        set_property(out, f"{pool}/remote", "keystatus", "unavailable"),
        f"{pool}/remote/home", "encryptionroot", f"{pool}/remote/home")))
    assert found == [f"{pool}/remote: keystatus=unavailable, the profile wants available",
                     f"{pool}/remote/home: encryptionroot={pool}/remote/home, the profile wants {pool}/remote"]


def test_another_filesystem_on_the_boot_partition():
    settings, _ = captured("zfs-raidz1")
    boot = f"/dev/disk/by-partlabel/boot-{settings.profile.hash}"
    found = problems("zfs-raidz1", filesystems, in_command(boot, lambda out: out.replace("TYPE=vfat", "TYPE=ext4")))
    assert found == [f"{boot}: filesystem ext4, the profile wants vfat"]


def test_no_filesystem_where_the_profile_has_one():
    settings, _ = captured("light-tmpfs-f2fs")
    [(device, fs)] = [(device, fs) for device, fs in settings.profile.filesystems() if fs.format == "f2fs"]
    found = problems("light-tmpfs-f2fs", filesystems, in_command(device, lambda out: ""))
    assert found == [f"{device}: filesystem none, the profile wants f2fs"]


def test_a_filesystem_label_that_differs():
    """(zephyrus-btrfs labels its filesystems: blkid's output captured there, tests/unit/test_checks.py)"""
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/nvme-TEST"})
    settings = Settings.of(profile, tabula_install=False)
    efi, mapper = captured_text("btrfs_blkid_efi.txt"), captured_text("btrfs_blkid_mapper.txt")
    host = FakeTestinfraHost([(r"/dev/disk/by-partlabel/EFI", efi.replace("LABEL=EFI", "LABEL=BOOT")),
                              (r"/dev/mapper/cryptroot", mapper)])
    assert filesystems.LAYER.problems(verify.HostTarget(host, settings, "/mnt")) == [
        "/dev/disk/by-partlabel/EFI: label 'BOOT', the profile wants 'EFI'"]
