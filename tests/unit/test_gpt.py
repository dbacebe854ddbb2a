"""GPT layer: sfdisk --json parsing (captured in the VM) and the partition operation's commands
for absent, partial (interrupted), present and drifted tables."""
import copy

import pytest
import yaml

from operations import gpt
from operations.errors import TabulaError
from operations.profile import ProfileError, load_profile, profile_path
from tests.unit.pyinfra_fake import fixture_lines, run_op, unjoined

DISK = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"


@pytest.fixture
def profile():
    return load_profile("zephyrus-btrfs", {"disk": DISK, "swap_size": "256M"})


@pytest.fixture
def installed():
    return gpt.parse_partition_table(fixture_lines("btrfs_partition_table_installed.txt"))


def test_parse_installed_table(installed):
    assert installed["label"] == "gpt"
    assert installed["sectorsize"] == 512
    names = [(p["node"], p["number"], p["name"], p["code"]) for p in installed["partitions"]]
    assert names == [("/dev/nvme0n1p1", 1, "EFI", "EF00"), ("/dev/nvme0n1p2", 2, "cryptroot", "8300")]
    assert installed["lastlba"] == 33554398
    assert installed["partitions"][0]["size"] * 512 == 1024**3


def test_partition_nodes():
    assert gpt.partition_node("/dev/nvme0n1", 2) == "/dev/nvme0n1p2"
    assert gpt.partition_node("/dev/vda", 1) == "/dev/vda1"


def test_parse_blank_disk_and_absent_disk():
    assert gpt.parse_partition_table(fixture_lines("btrfs_partition_table_blank.txt")) is None
    assert gpt.parse_partition_table([]) is None


def test_compare_full_spec(profile, installed):
    disk = profile.disks["main"]
    assert gpt.compare(disk, installed).problems == []
    assert gpt.compare(disk, installed).present == 2
    prefix = copy.deepcopy(installed)
    prefix["partitions"] = prefix["partitions"][:1]
    assert (gpt.compare(disk, prefix).present, gpt.compare(disk, prefix).problems) == (1, [])

    for change, expected in [
        (lambda t: t["partitions"][0].update(name="ESP"), "labelled 'ESP'"),
        (lambda t: t["partitions"][0].update(code="8300"), "has type 8300"),
        (lambda t: t["partitions"][0].update(size=4096), "has 2097152 bytes"),
        (lambda t: t["partitions"][1].update(size=4096), "fill the disk"),
        (lambda t: t["partitions"].reverse(), "is entry 2"),
        (lambda t: t["partitions"].append(dict(t["partitions"][1], node="/dev/nvme0n1p3", number=3)), "does not have"),
        (lambda t: t.update(label="dos"), "dos partition table"),
    ]:
        table = copy.deepcopy(installed)
        change(table)
        problems = gpt.compare(disk, table).problems
        assert problems and expected in " ".join(problems), (expected, problems)


def facts(table):
    return {gpt.PartitionTable: table}


def test_blank_disk_gets_new_table(monkeypatch, profile):
    commands, _, _ = run_op(monkeypatch, gpt, gpt.partitions, facts(None), disk_key="main", disk=profile.disks["main"])
    assert len(commands) == 1
    commands = unjoined(commands)
    assert commands[0] == (f"sgdisk --clear -n 1:0:+1048576K -t 1:EF00 -c 1:EFI -n 2:0:0 -t 2:8300 -c 2:cryptroot {DISK}")
    assert "udevadm settle" in commands[1] and "/dev/disk/by-partlabel/cryptroot" in commands[1]


def test_partial_table_gets_missing_partitions_only(monkeypatch, profile, installed):
    installed["partitions"] = installed["partitions"][:1]
    commands, _, _ = run_op(monkeypatch, gpt, gpt.partitions, facts(installed), disk_key="main", disk=profile.disks["main"])
    commands = unjoined(commands)
    assert commands[0] == f"sgdisk -n 2:0:0 -t 2:8300 -c 2:cryptroot {DISK}"
    assert "--clear" not in commands[0]


def test_present_table_is_a_noop(monkeypatch, profile, installed):
    commands, _, fake = run_op(monkeypatch, gpt, gpt.partitions, facts(installed), disk_key="main", disk=profile.disks["main"])
    assert commands == []
    assert fake.noops == [f"{DISK} already has the GPT partitions EFI (ef00, 1GiB), cryptroot (8300, rest)"]


def test_drifted_table_stops(monkeypatch, profile, installed):
    installed["partitions"][1]["name"] = "other"
    with pytest.raises(TabulaError, match="disks.main: the partition table .* does not match the profile"):
        run_op(monkeypatch, gpt, gpt.partitions, facts(installed), disk_key="main", disk=profile.disks["main"])


def test_unknown_type_code_is_refused_when_the_profile_loads(tmp_path):
    """Known from the profile alone: refused at load, naming the field, not at plan time."""
    data = yaml.safe_load(profile_path("zephyrus-btrfs").read_text())
    data["disks"]["main"]["partitions"][0]["type"] = "1234"
    path = tmp_path / "odd-type.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=r"disks\.main\.partitions\.0\.type.*GPT type code '1234'"):
        load_profile(str(path), {"disk": "/dev/disk/by-id/nvme-TEST"})
    data["disks"]["main"]["partitions"][0]["type"] = "ef02"      # known: loads
    path.write_text(yaml.safe_dump(data))
    profile = load_profile(str(path), {"disk": "/dev/disk/by-id/nvme-TEST"})
    assert gpt.type_guid(profile.disks["main"].partitions[0].type) == "21686148-6449-6E6F-744E-656564454649"
