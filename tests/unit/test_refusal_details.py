"""Refusals that help a person decide: what was found on a refused disk or partition is named by
type, label, UUID and size; a LUKS header by its UUID and label; a ZFS member by its pool's name,
id and state. The e2e side: tests/e2e/test_bad_input.py and tests/e2e/test_safety.py."""
import pytest

from operations import disks
from operations.errors import TabulaError
from tests.unit.pyinfra_fake import fake_run, told
from tests.unit.test_disks import BY_ID, NVME, facts, installed_table, profile, run_guard, wipes  # noqa: F401

WIPE = disks.wipe          # the operation itself (the wipes fixture replaces it in the module)

PHOTOS = {"TYPE": "ext4", "LABEL": "family-photos", "UUID": "5c1f7a52-0d8e-4f6b-9d61-3f3c8a1e2b77"}
VAULT = {"TYPE": "crypto_LUKS", "VERSION": "2", "LABEL": "vault", "UUID": "9a7e2c1d-55aa-4c3b-8e0f-1b2c3d4e5f60"}
TANK = {"TYPE": "zfs_member", "LABEL": "tank", "UUID": "13117309625795050669", "VERSION": "5000"}

# `zpool list -H -o name,guid,health | sed 's/^/imported /'; zpool import` as captured in the VM
POOLS_OUTPUT = """\
imported rpool-2790ee34\t9385102260159387623\tONLINE
   pool: tank
     id: 13117309625795050669
  state: ONLINE
 action: The pool can be imported using its name or numeric identifier.
 config:

\ttank        ONLINE
\t  vdb1      ONLINE
"""


def test_whole_disk_filesystem_is_named_by_type_label_uuid_and_size(monkeypatch, wipes):
    with pytest.raises(TabulaError) as refused:
        run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json", signatures={NVME: PHOTOS}))
    message = str(refused.value)
    assert ("a whole-disk ext4 filesystem labelled 'family-photos', UUID 5c1f7a52-0d8e-4f6b-9d61-3f3c8a1e2b77, "
            "16.0 GiB") in message
    assert "What is on it:" in message and "tabula_confirm_wipe" in message


def test_a_filesystem_without_a_label_says_so():
    assert disks.describe_signature({"TYPE": "vfat", "UUID": "AB12-CD34"}, 64 << 20) == \
        "vfat filesystem without a label, UUID AB12-CD34, 64.0 MiB"


def test_luks_header_is_named_by_its_uuid_and_label(monkeypatch, wipes):
    signatures = {"/dev/nvme0n1p1": VAULT, "/dev/nvme0n1p2": {"TYPE": "crypto_LUKS"}, NVME: {"PTTYPE": "gpt"}}
    with pytest.raises(TabulaError) as refused:
        run_guard(monkeypatch, profile(), facts("btrfs_lsblk_installed_closed.json", installed_table(), signatures))
    message = str(refused.value)
    assert ("partition /dev/nvme0n1p1 (EFI) holds LUKS2 header UUID 9a7e2c1d-55aa-4c3b-8e0f-1b2c3d4e5f60, "
            "label 'vault', 1.0 GiB; the profile puts filesystem there") in message
    # every partition of the refused disk is listed with what is on it
    assert "/dev/nvme0n1p1 (partlabel 'EFI'): LUKS2 header UUID 9a7e2c1d" in message
    assert "/dev/nvme0n1p2 (partlabel 'cryptroot'): LUKS header UUID (none), no label" in message


def test_zfs_member_is_named_by_pool_id_and_state(monkeypatch, wipes):
    pools = disks.parse_pools_found(POOLS_OUTPUT.splitlines())
    assert pools == {"9385102260159387623": {"name": "rpool-2790ee34", "state": "ONLINE", "imported": True},
                     "13117309625795050669": {"name": "tank", "state": "ONLINE", "imported": False}}
    table = facts("btrfs_lsblk_blank.json", signatures={NVME: TANK})
    table[disks.ZfsPoolsFound] = pools
    with pytest.raises(TabulaError) as refused:
        run_guard(monkeypatch, profile(), table)
    assert ("a whole-disk member of ZFS pool 'tank' (pool id 13117309625795050669, ONLINE, exported: importable), "
            "16.0 GiB") in str(refused.value)


def test_zfs_member_of_a_pool_nobody_lists_says_the_state_is_unknown():
    text = disks.describe_signature(TANK, 4 << 30, {})
    assert "member of ZFS pool 'tank' (pool id 13117309625795050669, state unknown" in text


def test_the_pools_are_read_only_when_a_member_is_there(monkeypatch, wipes):
    from operations.settings import Settings
    run = fake_run(facts("btrfs_lsblk_blank.json", signatures={NVME: PHOTOS}), Settings.of(profile()))
    with pytest.raises(TabulaError, match=r"^disks\.main\.device: refusing (.|\n)*What is on it:\n    /dev/nvme0n1: ext4 "
                                          r"filesystem labelled 'family-photos'"):
        disks.guard(run)
    assert "ZfsPoolsFound" not in run.host.reads


def test_a_refused_disk_in_use_says_what_is_on_it(monkeypatch, wipes):
    with pytest.raises(TabulaError) as refused:
        run_guard(monkeypatch, profile(), facts("btrfs_lsblk_foreign_mounted.json",
                                                signatures={"/dev/nvme0n1p1": PHOTOS}))
    message = str(refused.value)
    assert "mounted at /media/data" in message
    assert "ext4 filesystem labelled 'family-photos', UUID 5c1f7a52" in message


def test_the_confirmed_wipe_step_says_what_it_destroys(monkeypatch, wipes, caplog):
    run_guard(monkeypatch, profile(), facts("btrfs_lsblk_blank.json", signatures={NVME: PHOTOS}),
              confirm=["TABULA-NVME0"])
    [step] = wipes
    assert step["name"] == "Wipe disks.main"                 # short: the results table stays narrow
    # what the disk holds is the step's own output: the plan (--dry) and the run print it
    arguments = {key: value for key, value in step.items() if key != "name"}
    assert told(caplog, lambda: list(WIPE._inner(fake_run(), **arguments))) == [
        f"[install-target] wipe {BY_ID} (confirmed), which holds: {NVME}: ext4 filesystem labelled "
        "'family-photos', UUID 5c1f7a52-0d8e-4f6b-9d61-3f3c8a1e2b77, 16.0 GiB"]


def test_sizes_read_as_people_say_them():
    assert disks.human_size(17179869184) == "16.0 GiB"
    assert disks.human_size(512 << 20) == "512.0 MiB"
    assert disks.human_size(None) == "size unknown"
