"""Readable runs: the results table pyinfra prints at the end of a run fits in 120 columns, for
every profile. The operation names come from the real stages (``stages.deploy``, the guard
planning a confirmed wipe of every disk), with each operation replaced by a recorder; the table
is laid out by pyinfra's own ``print_rows`` and log formatter. The details a name used to carry
are the operation's own output: see the tests of each layer (``said``) and the e2e plans."""
from __future__ import annotations

import importlib
import logging
import pkgutil

import pytest
from pyinfra_cli.log import LogFormatter
from pyinfra_cli.prints import print_rows, truncate

import operations
from operations import disks, gpt, stages
from operations.profile import available_profiles, load_profile
from operations.settings import Settings
from tests.unit.pyinfra_fake import FakeHost
from tests import profile_cases

WIDTH = 120
HOST = "install-target"
HASH = "$6$saltsalt$" + "x" * 86
SECRETS = {"TABULA_LUKS_PASSPHRASE": "correct horse", "TABULA_ZFS_KEY": "battery staple",
           "TABULA_ROOT_PASSWORD_HASH": HASH, "TABULA_USER_PASSWORD_HASH": HASH}
PHOTOS = {"TYPE": "ext4", "LABEL": "family-photos", "UUID": "5c1f7a52-0d8e-4f6b-9d61-3f3c8a1e2b77"}


def pyinfra_name(op, name: str | None, args: tuple, kwargs: dict) -> str:
    """The row name pyinfra shows (pyinfra.api.operation: ``name=``, else module.function (args))."""
    if name:
        return name
    words = [str(a) for a in args] + [f"{key}={value}" for key, value in kwargs.items()]
    return f"{op.__module__.split('.')[-1]}.{op.__name__} ({', '.join(words)})"


def record_operations(monkeypatch, calls: list | None = None) -> list[str]:
    """Replace every pyinfra operation of the package by a recorder of its row name (and, into
    ``calls``, of (operation, arguments, keyword arguments) to run it later as pyinfra would)."""
    names: list[str] = []

    def recorder(op):
        def record(run, *args, name=None, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}   # global arguments
            names.append(pyinfra_name(op._inner, name, args, kwargs))
            if calls is not None:
                calls.append((op, args, kwargs))
        return record

    for info in pkgutil.walk_packages(operations.__path__, prefix="operations."):
        module = importlib.import_module(info.name)
        for attr, value in list(vars(module).items()):
            if callable(value) and hasattr(value, "_inner"):
                monkeypatch.setattr(module, attr, recorder(value))
    return names


def confirmed_foreign_disks(profile) -> tuple[dict, tuple[str, ...]]:
    """Facts for the guard: every profile disk present, blank but for a foreign ext4, confirmed."""
    table = {disks.ToolsPresent: {"commands": sorted(disks.required_tools(profile, True)), "modules": ["zfs"]},
             disks.ActiveSwaps: [], disks.ImportedPoolVdevs: {}, gpt.PartitionTable: None,
             disks.WholeDiskSignature: {}}
    devices = []
    for index, disk in enumerate(profile.disks.values()):
        kernel = f"/dev/vd{chr(ord('a') + index)}"
        devices.append({"name": kernel, "type": "disk", "size": 1 << 42, "serial": disk.serial, "partlabel": None,
                        "fstype": "ext4", "label": "family-photos", "parent": None, "mountpoints": []})
        table[(disks.StablePath, frozenset({("path", disk.device)}))] = {"device": kernel, "by_id": []}
        table[(disks.WholeDiskSignature, frozenset({("device", disk.device)}))] = PHOTOS
    table[disks.BlockDevices] = devices
    return table, tuple(disk.device for disk in profile.disks.values())


def run_names(monkeypatch, profile_name: str) -> list[str]:
    """The operation names of a whole run of the profile: a confirmed wipe of every disk, every
    stage, the install and the pool export."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
        monkeypatch.delenv(f"{key}_FILE", raising=False)
    profile = load_profile(profile_name, profile_cases.render_vars(profile_name))
    facts, confirm = confirmed_foreign_disks(profile)
    monkeypatch.setattr(stages, "host", FakeHost(facts))
    monkeypatch.setattr(disks, "_is_local_connector", lambda host: True)
    names = record_operations(monkeypatch)
    stages.deploy(Settings.of(profile, tabula_confirm_wipe=confirm, tabula_install=True, tabula_export_pools=True, tabula_nix_check=False))
    return names


def _log_lines(rows) -> list[str]:
    """The table as pyinfra prints it: ``print_rows`` through its log formatter (4 spaces of indent)."""
    formatter, lines = LogFormatter(), []
    emit = lambda line: lines.append(formatter.format(logging.LogRecord("pyinfra", logging.INFO, "", 0, line, None, None)))  # noqa: E731
    print_rows([(emit, columns) for columns in rows])
    return lines


def results_table(names: list[str]) -> list[str]:
    """pyinfra_cli.prints.print_results for one host where every operation changed something."""
    rows = [["Operation", "Hosts", "Success", "Error", "No Change"]]
    rows += [[name, "1", "1", "-", "-"] for name in names]
    rows.append(["Grand total", str(len(names)), str(len(names)), "-", "-"])
    return _log_lines(rows)


def plan_table(names: list[str]) -> list[str]:
    """pyinfra_cli.prints.print_meta (the plan under "Detected changes"), every operation a change."""
    rows = [["Operation", "Change", "Conditional Change"]]
    rows += [[name, f"1 ({truncate(HOST, 48)})", "-"] for name in names]
    return _log_lines(rows)


@pytest.mark.parametrize("profile_name", available_profiles())
def test_the_results_table_fits_in_120_columns(monkeypatch, profile_name):
    names = run_names(monkeypatch, profile_name)
    profile = load_profile(profile_name, profile_cases.render_vars(profile_name))
    # every stage is there: the wipes, a partition table per disk, the install
    assert sum(name.startswith("Wipe ") for name in names) == len(profile.disks), names
    assert f"nixos-install {profile.nixos.hostname}" in names, names
    assert len(set(names)) == len(names), "two steps with the same name"
    for table in (results_table(names), plan_table(names)):
        width = max(len(line) for line in table)
        assert width <= WIDTH, f"{width} columns; the longest name: {max(names, key=len)!r}"


def test_the_table_layout_is_pyinfras():
    # (a name of 75 characters is the widest the results table takes in 120 columns)
    assert max(len(line) for line in results_table(["x" * 75])) == WIDTH
    assert max(len(line) for line in results_table(["x" * 76])) == WIDTH + 1


# --- the details a name used to carry: told by the operation when it acts -------------------

from operations import filesystems, mounts  # noqa: E402
from operations.target import WholeDiskSignature, parse_blkid_export  # noqa: E402
from tests.unit.pyinfra_fake import fixture_lines, run_op, told  # noqa: E402

BTRFS_VARS = {"disk": "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0", "swap_size": "256M"}
P = f"[{HOST}] "


def test_a_step_that_acts_tells_what_it_does(monkeypatch, caplog):
    profile = load_profile("zephyrus-btrfs", BTRFS_VARS)
    disk = profile.disks["main"]
    lines = told(caplog, lambda: run_op(monkeypatch, gpt, gpt.partitions, {gpt.PartitionTable: None},
                                        disk_key="main", disk=disk))
    assert lines == [f"{P}a new GPT on {disk.device}: partitions EFI (ef00, 1GiB), cryptroot (8300, rest)"]

    lines = told(caplog, lambda: run_op(monkeypatch, filesystems, filesystems.formatted, {},
                                        filesystems=list(profile.filesystems()), swaps=[]))
    assert lines == [f"{P}make vfat on /dev/disk/by-partlabel/EFI, labelled 'EFI'",
                     f"{P}make btrfs on /dev/mapper/cryptroot, labelled 'nixos'"]

    wanted = profile.all_mounts()
    lines = told(caplog, lambda: run_op(monkeypatch, mounts, mounts.mounted, {mounts.Mounts: {}}, mounts=wanted))
    assert len(lines) == len(wanted)
    assert lines[0] == f"{P}mount / at /mnt (btrfs /dev/mapper/cryptroot subvol=@root,compress=zstd,noatime,discard=async)"
    assert f"{P}mount /home at /mnt/home (btrfs /dev/mapper/cryptroot subvol=@home,compress=zstd,noatime,discard=async)" in lines


def test_a_step_with_nothing_to_do_tells_nothing_but_its_noop(monkeypatch, caplog):
    profile = load_profile("zephyrus-btrfs", BTRFS_VARS)
    found = parse_blkid_export(fixture_lines("btrfs_blkid_mapper.txt"))
    btrfs_only = [(device, fs) for device, fs in profile.filesystems() if fs.format == "btrfs"]
    lines = told(caplog, lambda: run_op(monkeypatch, filesystems, filesystems.formatted, {WholeDiskSignature: found},
                                        filesystems=btrfs_only, swaps=[]))
    assert lines == []
