"""Disk identity and the guard: lsblk / blkid / by-id parsing (captured in the VM), and every
refusal, from facts only, before any operation exists."""
import pytest

from operations import disks, filesystems, gpt
from operations.errors import TabulaError
from operations.profile import load_profile
from operations.settings import Settings
from tests.unit.pyinfra_fake import fake_run, fixture_lines
from tests.unit.vm_vars import TEST_AUTHORIZED_KEY

BY_ID = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"
NVME = "/dev/nvme0n1"


def lsblk(name):
    return disks.parse_lsblk("\n".join(fixture_lines(name)))


def test_parse_lsblk_blank():
    devices = lsblk("btrfs_lsblk_blank.json")
    nvme = next(d for d in devices if d["name"] == NVME)
    assert (nvme["type"], nvme["serial"], nvme["size"]) == ("disk", "TABULA-NVME0", 16 * 1024**3)
    assert not [d for d in devices if d["parent"] == NVME]


def test_parse_lsblk_installed():
    devices = {d["name"]: d for d in lsblk("btrfs_lsblk_installed.json")}
    assert devices["/dev/nvme0n1p1"]["partlabel"] == "EFI"
    assert devices["/dev/nvme0n1p1"]["mountpoints"] == ["/mnt/boot"]
    crypt = devices["/dev/mapper/cryptroot"]
    assert crypt["type"] == "crypt" and crypt["parent"] == "/dev/nvme0n1p2"
    assert "/mnt" in crypt["mountpoints"] and "/run/tabula/btrfs/nixos" in crypt["mountpoints"]


def test_parse_stable_path():
    found = disks.parse_stable_path(fixture_lines("btrfs_stable_path.txt"))
    assert found["device"] == NVME
    assert any(p.endswith("TABULA-NVME0") for p in found["by_id"])
    assert disks.parse_stable_path([]) == {"device": None, "by_id": []}


def profile(**variables):
    return load_profile("zephyrus-btrfs", {"disk": BY_ID, **variables})


ALL_TOOLS = {"commands": [*disks.BASE_COMMANDS, *(program for program, _ in filesystems.MKFS.values()), "cryptsetup", "btrfs", "chattr",
                         "mkswap", "swapon", "zpool", "zfs", "nixos-install"], "modules": ["zfs"]}


def facts(lsblk_name, table=None, signatures=None, swaps=(), stable=None, tools=ALL_TOOLS):
    signatures = signatures or {}
    result = {
        disks.ToolsPresent: tools,
        disks.BlockDevices: lsblk(lsblk_name),
        disks.StablePath: stable or disks.parse_stable_path(fixture_lines("btrfs_stable_path.txt")),
        disks.ActiveSwaps: list(swaps),
        disks.ImportedPoolVdevs: {},
        gpt.PartitionTable: table,
        disks.WholeDiskSignature: {},
    }
    for device, value in signatures.items():
        device = BY_ID if device == NVME else device      # the guard reads the disk itself by its stable path
        result[(disks.WholeDiskSignature, frozenset({("device", device)}))] = value
    return result


@pytest.fixture
def wipes(monkeypatch):
    calls = []
    monkeypatch.setattr(disks, "wipe", lambda run, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(disks, "_is_local_connector", lambda host: True)
    yield calls


def run_guard(monkeypatch, the_profile, fact_table, confirm=()):
    return disks.guard(fake_run(fact_table, Settings.of(the_profile, tabula_confirm_wipe=tuple(confirm))))


def installed_table():
    return gpt.parse_partition_table(fixture_lines("btrfs_partition_table_installed.txt"))


def test_target_without_the_installer_tools_is_refused_naming_them(monkeypatch, wipes):
    lacking = {"commands": [c for c in ALL_TOOLS["commands"] if c not in ("nixos-install", "cryptsetup")],
               "modules": []}
    with pytest.raises(TabulaError) as refused:
        run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json", tools=lacking))
    message = str(refused.value)
    assert "nixos-install (for the install (tabula_install))" in message
    assert "cryptsetup (for LUKS container cryptroot)" in message
    assert "zfs kernel module" not in message      # this profile has no pool
    assert "nothing was touched" in message
    assert not wipes


def test_tools_fact_in_a_real_shell():
    import subprocess
    command = disks.ToolsPresent().command(commands=["sh", "no-such-command-tabula"], modules=["no_such_module_tabula"])
    out = subprocess.run(command.get_raw_value(), shell=True, capture_output=True, text=True)
    assert out.returncode == 0
    assert disks.ToolsPresent().process(out.stdout.splitlines()) == {"commands": ["sh"], "modules": []}


def test_tools_follow_the_profile_layers():
    btrfs = disks.required_tools(profile(), install=False)
    assert {"cryptsetup", "mkfs.btrfs", "mkfs.vfat", "btrfs", "chattr", "mkswap"} <= set(btrfs)
    assert "nixos-install" not in btrfs and "zpool" not in btrfs
    light = load_profile("light-tmpfs-f2fs", {"disk": BY_ID, "hostname": "light"})
    needed = disks.required_tools(light, install=True)
    assert {"mkfs.f2fs", "zpool", "zfs", "zfs kernel module", "nixos-install", "mkswap"} <= set(needed)
    assert "btrfs" not in needed
    _, request = disks.tools_request(light, install=True)
    assert request["modules"] == ["zfs"] and "nix" in request["commands"]


def test_blank_disk_passes(monkeypatch, wipes):
    checks = run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json"))
    assert [(c.device, c.serial, c.foreign) for c in checks] == [(NVME, "TABULA-NVME0", [])]
    assert wipes == []


def test_own_installed_state_in_use_passes(monkeypatch, wipes):
    signatures = {"/dev/nvme0n1p1": {"TYPE": "vfat"}, "/dev/nvme0n1p2": {"TYPE": "crypto_LUKS"},
                  NVME: {"PTTYPE": "gpt"}}
    checks = run_guard(monkeypatch, profile(), facts("btrfs_lsblk_installed.json", installed_table(), signatures))
    assert checks[0].foreign == [] and wipes == []


def test_absent_disk_names_field_and_lists_ids(monkeypatch, wipes):
    fact_table = facts("btrfs_lsblk_blank.json", stable={"device": None, "by_id": ["nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"]})
    with pytest.raises(TabulaError, match=r"disks.main.device: .* does not exist .*\n.*/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"):
        run_guard(monkeypatch, profile(), fact_table)


def test_smaller_than_declared(monkeypatch, wipes):
    with pytest.raises(TabulaError, match="disks.main.size: .* less than the declared 32G"):
        run_guard(monkeypatch, profile(disk_size="32G"), facts("btrfs_lsblk_blank.json"))


def test_serial_mismatch(monkeypatch, wipes):
    with pytest.raises(TabulaError, match="disks.main.serial: .* serial 'TABULA-NVME0', the profile declares 'S7KG'"):
        run_guard(monkeypatch, profile(disk_serial="S7KG"), facts("btrfs_lsblk_blank.json"))
    run_guard(monkeypatch, profile(disk_serial="TABULA-NVME0", disk_size="16G"), facts("btrfs_lsblk_blank.json"))


def test_same_disk_twice(monkeypatch, wipes):
    two = load_profile("zfs-raidz1", {"hostname": "nas", "ssd": BY_ID, "rz1": BY_ID + "-x", "rz2": BY_ID + "-y",
                                      "rz3": BY_ID + "-z", "ssd_size": "8G", "data_disk_size": "4G",
                                      "authorized_keys": [TEST_AUTHORIZED_KEY]})
    with pytest.raises(TabulaError, match="are the same disk"):
        run_guard(monkeypatch, two, facts("btrfs_lsblk_blank.json"))


def test_foreign_whole_disk_filesystem_refused_unless_confirmed(monkeypatch, wipes):
    fact_table = facts("btrfs_lsblk_blank.json", signatures={NVME: {"TYPE": "ext4", "UUID": "x"}})
    with pytest.raises(TabulaError, match="whole-disk ext4 filesystem(.|\n)*tabula_confirm_wipe"):
        run_guard(monkeypatch, profile(), fact_table)
    # a confirmation naming another disk does not count: the same refusal
    with pytest.raises(TabulaError) as refused:
        run_guard(monkeypatch, profile(), fact_table, confirm=["/dev/disk/by-id/virtio-TABULA-SSD"])
    assert str(refused.value) == (
        f"disks.main.device: refusing {BY_ID} (/dev/nvme0n1): it holds content the profile does not describe:\n"
        "    a whole-disk ext4 filesystem without a label, UUID x, 16.0 GiB\n"
        "  What is on it:\n    /dev/nvme0n1: ext4 filesystem without a label, UUID x, 16.0 GiB\n"
        f"  To wipe this disk, confirm it by its stable id: --data tabula_confirm_wipe='[\"{BY_ID}\"]'")
    assert wipes == []
    run_guard(monkeypatch, profile(), fact_table, confirm=["TABULA-NVME0"])
    assert wipes[0]["disk_path"] == BY_ID and wipes[0]["partitions"] == []
    run_guard(monkeypatch, profile(), fact_table, confirm=[BY_ID])
    assert len(wipes) == 2


def test_foreign_partitions_refused(monkeypatch, wipes):
    table = installed_table()
    table["partitions"][1]["name"] = "data"
    with pytest.raises(TabulaError, match="labelled 'data'"):
        run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json", table, {NVME: {"PTTYPE": "gpt"}}))
    with pytest.raises(TabulaError, match="a dos partition table"):
        run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json", None, {NVME: {"PTTYPE": "dos"}}))


def test_wrong_signature_in_own_partition_is_foreign(monkeypatch, wipes):
    signatures = {"/dev/nvme0n1p1": {"TYPE": "vfat"}, "/dev/nvme0n1p2": {"TYPE": "ext4"}, NVME: {"PTTYPE": "gpt"}}
    fact_table = facts("btrfs_lsblk_installed_closed.json", installed_table(), signatures)
    with pytest.raises(TabulaError, match="nvme0n1p2 \\(cryptroot\\) holds ext4"):
        run_guard(monkeypatch, profile(), fact_table)


def test_prefix_table_is_not_foreign(monkeypatch, wipes):
    table = installed_table()
    table["partitions"] = table["partitions"][:1]
    checks = run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json", table, {NVME: {"PTTYPE": "gpt"}}))
    assert checks[0].foreign == []


def test_mounted_elsewhere_refused_even_confirmed(monkeypatch, wipes):
    for confirm in ((), (BY_ID,)):
        with pytest.raises(TabulaError, match="in use(.|\n)*mounted at /media/data"):
            run_guard(monkeypatch, profile(), facts("btrfs_lsblk_foreign_mounted.json"), confirm)
    assert wipes == []


def test_foreign_mapping_and_swap_refused():
    the_profile = profile()
    devices = lsblk("btrfs_lsblk_installed.json")
    for dev in devices:
        if dev["name"] == "/dev/mapper/cryptroot":
            dev["name"], dev["mountpoints"] = "/dev/mapper/other", []
        elif dev["type"] == "part":
            dev["mountpoints"] = []
    check = disks.DiskCheck("main", the_profile.disks["main"], NVME, "TABULA-NVME0", disks._tree_of(NVME, devices))
    problems = disks.usage_problems(the_profile, check, ["/dev/nvme0n1p1"], {})
    assert any("open mapping on /dev/nvme0n1p2 that the profile does not declare" in p for p in problems)
    assert "/dev/nvme0n1p1 is active swap" in problems


def test_running_system_refused():
    the_profile = profile()
    devices = lsblk("btrfs_lsblk_blank.json")
    devices[[d["name"] for d in devices].index(NVME)]["mountpoints"] = ["/"]
    check = disks.DiskCheck("main", the_profile.disks["main"], NVME, None, disks._tree_of(NVME, devices))
    assert disks.usage_problems(the_profile, check, [], {}) == [f"{NVME} holds the running system (mounted at /)"]


def test_partlabel_on_another_disk_refused(monkeypatch, wipes):
    fact_table = facts("btrfs_lsblk_clash.json")
    with pytest.raises(TabulaError, match="partlabel 'EFI' .* used by /dev/vd.1"):
        run_guard(monkeypatch, profile(), fact_table)


def test_wipe_commands(monkeypatch):
    commands = [str(c) for c in disks.wipe._inner(fake_run(), disk_path=BY_ID, partitions=["/dev/nvme0n1p1"], reasons=["x"])]
    assert commands[:4] == ["wipefs -a /dev/nvme0n1p1", f"wipefs -a {BY_ID}", f"sgdisk --zap-all {BY_ID}",
                            f"wipefs -a {BY_ID}"]


def test_a_partlabel_of_the_profile_on_the_controller_is_refused(monkeypatch):
    """Over SSH the controller's own disks count too (a disk moved between them would make
    by-partlabel ambiguous): the controller's lsblk, here the installed NVMe as captured in the VM,
    holds the profile's labels. @local, the controller is the target: nothing more to read."""
    captured = "\n".join(fixture_lines("btrfs_lsblk_installed.json"))
    calls = []

    def fake_subprocess_run(argv, **kwargs):
        calls.append(argv)
        return type("Done", (), {"returncode": 0, "stdout": captured})()

    monkeypatch.setattr(disks.subprocess, "run", fake_subprocess_run)
    monkeypatch.setattr(disks.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(disks, "wipe", lambda run, **kwargs: None)
    monkeypatch.setattr(disks, "_is_local_connector", lambda host: False)
    with pytest.raises(TabulaError) as refused:
        run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json"))
    assert str(refused.value) == (
        "partlabel 'EFI' of the profile is used by /dev/nvme0n1p1 on this controller: a disk moved between "
        "them would make by-partlabel ambiguous. Rename that partition or pick other labels.")
    assert calls == [["lsblk", "-J", "-p", "-o", "NAME,TYPE,PARTLABEL"]]
    monkeypatch.setattr(disks, "_is_local_connector", lambda host: True)
    calls.clear()
    run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json"))
    assert calls == []
