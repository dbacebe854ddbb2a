"""The TPM2 token of a LUKS2 container (tpm2_unlock): the header's tokens and the TPM devices as
read in the VM (tests/unit/fixtures/capture_luks_tpm2.py), the enroll command (the passphrase on
stdin only), a token already there, one sealed to other PCRs, the refusal of a target without a TPM,
the verification's lines, the NixOS fragment and the profile's refusals at load."""

import pytest

from operations import luks, nixos
from operations.profile import ProfileError
from operations.luks import tpm2
from operations.luks.facts import LuksTokens, Tpm2Devices
from operations.profile import load_profile
from operations.secrets import Secret
from operations.settings import Settings
from tests.unit.pyinfra_fake import fake_run, fixture_lines
from tests.unit.pyinfra_fake import run_op as run_fake_op

DEVICE = "/dev/disk/by-partlabel/cryptroot"
SECRET = "unit test secret"
VARS = {"disk": "/dev/disk/by-id/x", "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000, "tpm2_unlock": True}


def zephyrus(**extra):
    return load_profile("zephyrus-btrfs", {**VARS, **extra})


def run_op(facts, luks_node, executing=True):
    run = fake_run(facts, secrets={luks.PASSPHRASE: Secret(SECRET, "test")}, executing=executing)
    return run_fake_op(None, luks, tpm2.tpm2_token, facts, run=run, device=DEVICE, luks=luks_node)


def captured_tokens(name: str) -> dict | None:
    return LuksTokens().process(fixture_lines(name))


def test_the_tokens_of_a_header_as_read_in_the_vm():
    tokens = captured_tokens("luks_tokens_tpm2.json")
    assert tpm2.tpm2_tokens(tokens) == [{"id": "0", "keyslots": ["1"], "pcrs": [7]}]
    assert captured_tokens("luks_tokens_none.json") == {}
    assert LuksTokens().process([]) is None                     # no LUKS2 header
    assert Tpm2Devices().process(fixture_lines("tpm_devices.txt")) == ["/dev/tpmrm0"]
    assert Tpm2Devices().process([]) == []


def test_a_container_without_a_token_gets_one_the_passphrase_on_stdin_only():
    commands, stdins, _ = run_op({LuksTokens: captured_tokens("luks_tokens_none.json")}, zephyrus().luks_devices()[0][1])
    assert len(commands) == 1
    assert commands[0].endswith(f"IFS= read -r PASSWORD; export PASSWORD; "
                                f"systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=7 {DEVICE}")
    assert f"cryptsetup isLuks --type luks2 {DEVICE}" in commands[0] and "ls /dev/tpmrm*" in commands[0]
    assert stdins == [SECRET] and SECRET not in commands[0]


def test_a_token_sealed_as_the_profile_says_is_kept():
    commands, _, host = run_op({LuksTokens: captured_tokens("luks_tokens_tpm2.json")}, zephyrus().luks_devices()[0][1])
    assert commands == []
    assert host.noops == [f"{DEVICE} already has a TPM2 token sealed to PCRs 7 (keyslot 1)"]


def test_a_token_sealed_to_other_pcrs_is_replaced_in_one_command():
    node = zephyrus(tpm2_pcrs=[0, 7]).luks_devices()[0][1]
    commands, stdins, _ = run_op({LuksTokens: captured_tokens("luks_tokens_tpm2.json")}, node)
    assert commands[0].endswith(f"systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=0+7 --wipe-slot=tpm2 {DEVICE}")
    assert stdins == [SECRET]


def test_without_tpm2_unlock_there_is_no_token_step_read_or_tool():
    profile = zephyrus(tpm2_unlock=False)
    run = fake_run({}, settings=Settings.of(profile, tabula_install=False))
    assert luks.LAYER.refusal_reads(run) == [] and luks.LAYER.refusals(run) == []
    assert "systemd-cryptenroll" not in luks.LAYER.tools(profile)
    assert [read for read in luks.LAYER.observe(run) if read[0] is LuksTokens] == []


def test_a_target_without_a_tpm_is_refused_before_any_change():
    profile = zephyrus()
    assert luks.LAYER.tools(profile)["systemd-cryptenroll"] == "the TPM2 token of cryptroot (tpm2_unlock)"
    without = fake_run({Tpm2Devices: []}, settings=Settings.of(profile, tabula_install=False))
    assert luks.LAYER.refusal_reads(without) == [(Tpm2Devices, {})]
    assert luks.LAYER.refusals(without) == [
        "tpm2_unlock (tabula_vars['tpm2_unlock']) for cryptroot: install-target has no TPM 2.0 (no /dev/tpmrm* "
        "device: none fitted, or off in the firmware settings); turn it on in the firmware, or set tpm2_unlock "
        "to false and unlock with the passphrase"]
    with_tpm = fake_run({Tpm2Devices: ["/dev/tpmrm0"]}, settings=Settings.of(profile, tabula_install=False))
    assert luks.LAYER.refusals(with_tpm) == []


def test_the_verification_names_a_missing_or_other_token_and_a_lost_passphrase():
    node = zephyrus().luks_devices()[0][1]
    header = {"keyslots": {"0": {"type": "luks2"}, "1": {"type": "luks2"}}}
    sealed = captured_tokens("luks_tokens_tpm2.json")
    assert tpm2.tpm2_problem(node, sealed) is None and tpm2.recovery_problem(header, sealed) is None
    assert tpm2.tpm2_problem(node, {}) == "no TPM2 token (tpm2_unlock), the profile wants one sealed to PCRs 7"
    assert tpm2.tpm2_problem(zephyrus(tpm2_pcrs=[]).luks_devices()[0][1], sealed) == (
        "TPM2 token(s) sealed to PCRs 7, the profile wants one sealed to PCRs none")
    assert tpm2.recovery_problem({"keyslots": {"1": {"type": "luks2"}}}, sealed) == (
        "no passphrase keyslot left (every keyslot belongs to a token): the rescue could not open it")


def test_the_verification_reads_the_header_with_its_token_as_enrolled_in_the_vm():
    """The passphrase's keyslot derives with argon2id as the profile says; the token's keyslot
    (systemd-cryptenroll's pbkdf2) is not taken for a passphrase's; a header without the token is named."""
    from tests.unit.test_checks import READLINK, FakeTestinfraHost, captured, problems
    settings = Settings.of(zephyrus(luks_pbkdf="argon2id", luks_pbkdf_iterations=None), tabula_install=False)
    status = (r"cryptsetup status", captured("btrfs_cryptsetup_status.txt"))
    dump = (r"cryptsetup luksDump /", captured("luks_dump_tpm2.txt"))
    enrolled = FakeTestinfraHost([(r"dump-json-metadata", captured("luks_tokens_tpm2.json")), dump, status, *READLINK])
    assert problems(luks, enrolled, settings, "/mnt") == []
    assert any("dump-json-metadata" in command for command in enrolled.commands)
    bare = FakeTestinfraHost([(r"dump-json-metadata", captured("luks_tokens_none.json")), dump, status, *READLINK])
    assert problems(luks, bare, settings, "/mnt") == [
        f"{DEVICE}: key slots derive keys with argon2id, pbkdf2, the profile wants argon2id",
        f"{DEVICE}: no TPM2 token (tpm2_unlock), the profile wants one sealed to PCRs 7"]


def test_the_initrd_unlocks_with_the_tpm_only_when_asked():
    from operations.nixlit import DeviceIds
    devices = DeviceIds({DEVICE: {"UUID": "11111111-2222-3333-4444-555555555555"}})
    with_tpm = luks.LAYER.nix(zephyrus(), devices)
    assert '    crypttabExtraOpts = [ "tpm2-device=auto" ];' in with_tpm.hardware
    # only storage in hardware-configuration.nix: the patch replaces it there, and nothing else
    assert "enableTpm2" not in with_tpm.hardware
    assert with_tpm.configuration == "  boot.initrd.systemd.enableTpm2 = true;"
    without = luks.LAYER.nix(zephyrus(tpm2_unlock=False), devices)
    assert "tpm2" not in (without.hardware + without.configuration).lower()


def test_the_files_rendered_again_over_themselves_are_the_same():
    """A re-run patches the hardware-configuration.nix it wrote: it must come back unchanged (an
    option outside the storage the patch owns would be written twice)."""
    from operations.nixfiles import render_files
    from tests.unit.pyinfra_fake import FIXTURES
    profile = zephyrus()
    generated = (FIXTURES / "nixos" / "real-zephyrus-btrfs.nix").read_text()
    first = render_files(profile, generated, None, profile.nixos.hardware_module, True)
    again = render_files(profile, first["hardware-configuration.nix"], None, profile.nixos.hardware_module, True)
    assert again == first
    assert first["configuration.nix"].count("boot.initrd.systemd.enableTpm2 = true;") == 1


@pytest.mark.parametrize("extra, message", [
    ({"tpm2_pcrs": [7, 24]}, r"tpm2_pcrs.*PCRs \[24\] do not exist: a TPM 2.0 has PCRs 0 to 23"),
    ({"tpm2_pcrs": [7, 7]}, r"tpm2_pcrs.*PCRs named twice"),
])
def test_pcrs_that_do_not_exist_are_refused_at_load(extra, message):
    with pytest.raises(ProfileError, match=message):
        zephyrus(**extra)


def test_a_token_on_a_luks1_container_is_refused_at_load(tmp_path):
    import yaml
    from operations.profile import PROFILE_DIR
    data = yaml.safe_load((PROFILE_DIR / "zephyrus-btrfs.yaml").read_text())
    data["disks"]["main"]["partitions"][1]["content"]["luks_type"] = "luks1"
    path = tmp_path / "luks1.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=r"tpm2_unlock \(tabula_vars\['tpm2_unlock'\]\) needs a LUKS2 container, "
                                           r"this one is luks1"):
        load_profile(str(path), VARS)


def test_a_swap_smaller_than_the_memory_is_warned_of_with_both_sizes():
    profile = zephyrus(swap_size="4GiB")
    assert nixos.hibernation_warning(profile, 8 << 30) == (
        "hibernate: the swap to resume from (/dev/mapper/cryptroot, 4.00 GiB) is smaller than the memory (8.00 GiB): "
        "a hibernation image of fuller RAM will not fit, and hibernating then fails; make the swap at least as large "
        "as the memory (swap_size)")
    assert nixos.hibernation_warning(profile, 4 << 30) is None
    assert nixos.hibernation_warning(zephyrus(swap_size="4GiB", hibernate=False), 8 << 30) is None
    run = fake_run({}, settings=Settings.of(profile, tabula_install=False))
    assert nixos.LAYER.refusal_reads(run) == [(nixos.MemoryBytes, {})]
    # as read in the VM (4 GiB less the kernel's): KiB, an integer (mawk would print a product as 4.1e+09)
    assert nixos.MemoryBytes().process(fixture_lines("meminfo_total_kib.txt")) == 4009256 * 1024


def test_the_disko_export_unlocks_with_the_tpm_too():
    from operations import disko
    luks_node = disko.devices(zephyrus())["disk"]["main"]["content"]["partitions"]["cryptroot"]["content"]
    assert luks_node["settings"]["crypttabExtraOpts"] == ["tpm2-device=auto"]
    plain = disko.devices(zephyrus(tpm2_unlock=False))["disk"]["main"]["content"]["partitions"]["cryptroot"]["content"]
    assert "crypttabExtraOpts" not in plain["settings"]
