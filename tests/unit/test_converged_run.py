"""A converged re-run reads the target in the guard's two round trips and nothing else: every
layer's ``observe`` names exactly what its steps read (tools/benchmark.py's (c) in the VM: 2).
The target here is zephyrus-btrfs as the deploy leaves it, from outputs captured in the VM."""
from __future__ import annotations

import hashlib

import pytest

from operations import disks, gpt, luks, mounts, nixos, persist, stages
from operations.btrfs import (RESUME_OFFSET, BtrfsSubvolumes, SwapfileResumeOffset, SwapfileState, parse_resume_offset,
                              parse_subvolume_list, parse_swapfile_state)
from operations.nixfiles import render_files
from operations.profile import load_profile
from operations.settings import Settings
from operations.target import BlockDeviceIds, CanonicalPath, DirectoryDigest, FileText, PathsState, parse_blkid_export
from tests.unit.pyinfra_fake import FIXTURES, FakeHost, fixture_lines
from tests.unit.test_op_names import record_operations
from tests.unit.vm_vars import NVME

HASH = "$6$saltsalt$" + "x" * 86
DMI = "Standard PC (Q35 + ICH9, 2009)"


def canonical(path: str, target: str):
    return (CanonicalPath, frozenset({("path", path)})), target


def installed_target(profile) -> dict:
    blkid = lambda name: parse_blkid_export(fixture_lines(name))     # noqa: E731
    signature = lambda device, value: ((disks.WholeDiskSignature, frozenset({("device", device)})), value)  # noqa: E731
    ids = BlockDeviceIds().process(fixture_lines("nixos/real-zephyrus-btrfs.ids.txt"))
    module, _ = nixos.choose_hardware_module(profile, DMI)
    generated = (FIXTURES / "nixos" / "real-zephyrus-btrfs.nix").read_text()
    offset = parse_resume_offset(fixture_lines("btrfs_map_swapfile_resume_offset.txt"))
    files = render_files(profile, generated, ids, hardware_module=module, facts={RESUME_OFFSET: offset})
    paths = {f"/mnt/etc/nixos/{name}": text for name, text in files.items()}
    where = persist.paths(profile)
    seeded = [f"/mnt{path}" for path in where.password_files.values()]
    seeded += [f"/mnt{where.etc}/ssh/ssh_host_{kind}_key" for kind in ("ed25519", "rsa")] + [f"/mnt{where.etc}/machine-id"]
    state = {path: {"type": "file", "mode": "644", "user": "root", "sha256": hashlib.sha256(text.encode()).hexdigest()}
             for path, text in paths.items()}
    state[f"/mnt{where.secrets_dir}"] = {"type": "directory", "mode": "700", "user": "root", "sha256": ""}
    state.update({path: {"type": "file", "mode": "444" if path.endswith("machine-id") else "600", "user": "root",
                         "sha256": "x"} for path in seeded})
    needed = disks.required_tools(profile, False)
    return dict([
        (disks.ToolsPresent, {"commands": sorted(needed), "modules": []}),
        (disks.BlockDevices, disks.parse_lsblk("\n".join(fixture_lines("btrfs_lsblk_installed.json")))),
        (disks.StablePath, disks.parse_stable_path(fixture_lines("btrfs_stable_path.txt"))),
        (disks.ActiveSwaps, []), (disks.ImportedPoolVdevs, {}),
        (mounts.Mounts, mounts.parse_proc_mounts(fixture_lines("btrfs_proc_mounts_installed.txt"))),
        (gpt.PartitionTable, gpt.parse_partition_table(fixture_lines("btrfs_partition_table_installed.txt"))),
        signature(NVME, {"PTTYPE": "gpt"}), signature("/dev/nvme0n1p1", blkid("btrfs_blkid_efi.txt")),
        signature("/dev/nvme0n1p2", blkid("btrfs_blkid_luks.txt")),
        signature("/dev/disk/by-partlabel/EFI", blkid("btrfs_blkid_efi.txt")),
        signature("/dev/disk/by-partlabel/cryptroot", blkid("btrfs_blkid_luks.txt")),
        signature("/dev/mapper/cryptroot", blkid("btrfs_blkid_mapper.txt")),
        (luks.LuksHeader, luks.parse_luks_dump(fixture_lines("btrfs_luksdump_cryptroot.txt"))),
        (luks.LuksMapping, luks.parse_cryptsetup_status(fixture_lines("btrfs_cryptsetup_status.txt"))),
        canonical("/dev/disk/by-partlabel/cryptroot", "/dev/nvme0n1p2"), canonical("/dev/mapper/cryptroot", "/dev/dm-0"),
        canonical("/dev/disk/by-partlabel/EFI", "/dev/nvme0n1p1"), canonical("/dev/nvme0n1p1", "/dev/nvme0n1p1"),
        (BtrfsSubvolumes, parse_subvolume_list(fixture_lines("btrfs_subvolumes_installed.txt"))),
        (SwapfileState, parse_swapfile_state(fixture_lines("btrfs_swapfile_state.txt"))),
        (SwapfileResumeOffset, offset),
        (FileText, files["hardware-configuration.nix"]), (BlockDeviceIds, ids), (nixos.DmiProductName, DMI),
        (PathsState, state), (DirectoryDigest, "d1g3st"),
    ])


@pytest.fixture
def converged(monkeypatch):
    for key in ("LUKS_PASSPHRASE", "ROOT_PASSWORD_HASH", "USER_PASSWORD_HASH"):
        monkeypatch.setenv(f"TABULA_{key}", HASH if key != "LUKS_PASSPHRASE" else "correct horse")
        monkeypatch.delenv(f"TABULA_{key}_FILE", raising=False)
    profile = load_profile("zephyrus-btrfs", {"disk": NVME, "swap_size": "256M", "luks_pbkdf": "pbkdf2",
                                              "luks_pbkdf_iterations": 1000})
    fake = FakeHost(installed_target(profile))
    monkeypatch.setattr(stages, "host", fake)
    monkeypatch.setattr(disks, "_is_local_connector", lambda host: True)
    return profile, fake


def test_a_converged_rerun_reads_the_target_twice_and_changes_nothing(monkeypatch, converged):
    profile, fake = converged
    planned = []
    record_operations(monkeypatch, planned)     # the steps' operations, kept to be run as pyinfra would
    run = stages.deploy(Settings.of(profile, tabula_install=False, tabula_nix_check=False))
    assert fake.round_trips == 2                  # the guard's read, and the partitions' with every observe
    commands = [str(command) for op, args, kwargs in planned for command in op._inner(run, *args, **kwargs)]
    assert commands == []                         # converged: every step has nothing to do...
    assert fake.round_trips == 2                  # ...and read nothing the batch had not read
    assert len(fake.noops) == len(planned)
