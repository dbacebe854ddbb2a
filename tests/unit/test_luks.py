"""LUKS layer: luksDump / cryptsetup status parsing (captured in the VM) and the commands for an
absent, present and drifted container and mapping. The passphrase only ever travels as _stdin."""

import pytest

from operations import luks, target
from operations.target import WholeDiskSignature
from operations.errors import TabulaError
from operations.profile import load_profile
from operations.secrets import Secret
from tests.unit.pyinfra_fake import fake_run, fixture_lines
from tests.unit.pyinfra_fake import run_op as run_fake_op

DEVICE = "/dev/disk/by-partlabel/cryptroot"
SECRET = "unit test secret"


@pytest.fixture
def profile_luks():
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/x", "luks_pbkdf": "pbkdf2",
                                              "luks_pbkdf_iterations": 1000})
    return profile.luks_devices()[0][1]


def run_op(monkeypatch, module, op, facts, **kwargs):
    """The operation on a run whose secrets hold the passphrase (read once by the stages)."""
    return run_fake_op(monkeypatch, module, op, facts, run=fake_run(facts, secrets={luks.PASSPHRASE: Secret(SECRET, "test")}),
                       **kwargs)


def test_parse_luks2_dump():
    header = luks.parse_luks_dump(fixture_lines("btrfs_luksdump_cryptroot.txt"))
    assert header["version"] == 2
    assert len(header["uuid"]) == 36
    assert header["cipher"] == "aes-xts-plain64"
    assert header["keyslots"]["0"]["type"] == "luks2"
    assert header["keyslots"]["0"]["pbkdf"] == "pbkdf2"


def test_parse_no_header():
    assert luks.parse_luks_dump([]) is None
    assert luks.parse_luks_dump(["Device /dev/vda is not a valid LUKS device."]) is None


def test_parse_status():
    status = luks.parse_cryptsetup_status(fixture_lines("btrfs_cryptsetup_status.txt"))
    assert status["type"] == "LUKS2"
    assert status["device"] == "/dev/nvme0n1p2"
    assert {"discards", "no_read_workqueue", "no_write_workqueue"} <= set(status["flags"])
    assert luks.parse_cryptsetup_status(fixture_lines("btrfs_cryptsetup_status_inactive.txt")) is None


def test_format_blank_device(monkeypatch, profile_luks):
    commands, stdins, _ = run_op(monkeypatch, luks, luks.container, {}, device=DEVICE, luks=profile_luks)
    assert len(commands) == 1 and commands[0].startswith("udevadm settle; ")     # in pyinfra's own shell
    assert commands[0].endswith("; cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 "
                                f"--pbkdf-force-iterations 1000 {DEVICE}")
    assert f"cryptsetup isLuks {DEVICE}" in commands[0] and "not formatting it" in commands[0]
    assert stdins == [SECRET]
    assert SECRET not in " ".join(commands)


def test_default_key_derivation_is_not_weakened(monkeypatch):
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/x"})
    commands, _, _ = run_op(monkeypatch, luks, luks.container, {}, device=DEVICE, luks=profile.luks_devices()[0][1])
    assert "--pbkdf argon2id" in commands[0] and "iterations" not in commands[0]


def test_existing_header_is_kept(monkeypatch, profile_luks):
    header = luks.parse_luks_dump(fixture_lines("btrfs_luksdump_cryptroot.txt"))
    commands, _, fake = run_op(monkeypatch, luks, luks.container, {luks.LuksHeader: header},
                               device=DEVICE, luks=profile_luks)
    assert commands == []
    assert fake.noops == [f"{DEVICE} already holds a luks2 header (UUID {header['uuid']})"]


def test_luks1_header_is_drift(monkeypatch, profile_luks):
    with pytest.raises(TabulaError, match="LUKS1 header.*refusing to re-format"):
        run_op(monkeypatch, luks, luks.container, {luks.LuksHeader: {"version": 1}}, device=DEVICE, luks=profile_luks)


def test_other_signature_refused(monkeypatch, profile_luks):
    with pytest.raises(TabulaError, match="refusing to luksFormat .* ext4"):
        run_op(monkeypatch, luks, luks.container, {WholeDiskSignature: {"TYPE": "ext4"}}, device=DEVICE, luks=profile_luks)


def test_open_closed_mapping(monkeypatch, profile_luks):
    commands, stdins, _ = run_op(monkeypatch, luks, luks.mapping, {}, device=DEVICE, luks=profile_luks)
    script = commands[0]
    assert script.startswith("if [ -e /dev/mapper/cryptroot ]; then echo 'tabula: /dev/mapper/cryptroot is already "
                             "open on another device")    # a name in use stops the run: no read needed for that
    # the passphrase opens it, never a TPM2 token the header may hold (a wrong passphrase must stop the run)
    assert ("; cryptsetup open --disable-external-tokens --allow-discards --perf-no_read_workqueue "
            f"--perf-no_write_workqueue {DEVICE} cryptroot || ") in script
    assert "passphrase does not open" in commands[0]
    assert "--key-file" not in commands[0]            # stdin up to the newline, like the boot prompt
    assert stdins == [SECRET]


def test_open_mapping_is_a_noop(monkeypatch, profile_luks):
    status = luks.parse_cryptsetup_status(fixture_lines("btrfs_cryptsetup_status.txt"))
    facts = {luks.LuksMapping: status, target.CanonicalPath: "/dev/nvme0n1p2"}
    commands, _, fake = run_op(monkeypatch, luks, luks.mapping, facts, device=DEVICE, luks=profile_luks)
    assert commands == [] and fake.noops == ["/dev/mapper/cryptroot is already open on /dev/nvme0n1p2"]


def test_mapping_on_another_device_refused(monkeypatch, profile_luks):
    facts = {luks.LuksMapping: {"device": "/dev/vdb", "flags": []}, target.CanonicalPath: "/dev/nvme0n1p2"}
    with pytest.raises(TabulaError, match="open on /dev/vdb, not on"):
        run_op(monkeypatch, luks, luks.mapping, facts, device=DEVICE, luks=profile_luks)


def test_passphrase_with_newline_refused():
    run = fake_run(secrets={luks.PASSPHRASE: Secret("two\nlines", "$TABULA_LUKS_PASSPHRASE")})
    with pytest.raises(TabulaError, match="line break"):
        luks.passphrase(run)
