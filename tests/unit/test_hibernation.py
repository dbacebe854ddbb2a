"""Hibernation (nixos.hibernate): where a hibernated system resumes from, refused where it cannot,
and the resume offset of a btrfs swapfile read from the real file (output captured in the VM:
``btrfs inspect-internal map-swapfile -r`` on a 256M NOCOW swapfile). The evaluated options are
tests/nix/test_evaluation.py's; the offset on an installed target, tests/e2e/test_btrfs_profile.py's."""
from __future__ import annotations

import pytest

from operations import btrfs, filesystems, zfs
from operations.nixfiles import render_files
from operations.nixlit import DeviceIds, MissingDeviceIds
from operations.profile import ProfileError, load_profile
from tests import profile_cases
from tests.unit.pyinfra_fake import fixture_lines

OFFSET = btrfs.parse_resume_offset(fixture_lines("btrfs_map_swapfile_resume_offset.txt"))


def profile(name: str, **extra):
    return load_profile(name, {**profile_cases.render_vars(name), **extra})


def test_the_offset_is_the_number_map_swapfile_prints():
    assert OFFSET == 35680
    assert btrfs.parse_resume_offset([]) is None       # no swapfile: the command prints nothing
    assert btrfs.SwapfileResumeOffset().command("/mnt/swap/swapfile") == (
        "if [ -f /mnt/swap/swapfile ]; then btrfs inspect-internal map-swapfile -r /mnt/swap/swapfile; fi")


def test_zephyrus_hibernates_by_default_to_its_swapfile():
    g16 = profile("zephyrus-btrfs")
    assert g16.nixos.hibernate
    device, subvolume, swap = g16.resume_swap()
    assert (device, subvolume.swapfile_path, swap) == ("/dev/mapper/cryptroot", "/swap/swapfile", None)
    assert btrfs.LAYER.nix_reads(g16, "/mnt") == {
        btrfs.RESUME_OFFSET: (btrfs.SwapfileResumeOffset, {"path": "/mnt/swap/swapfile"})}
    assert btrfs.LAYER.nix_reads(g16, "/") == {
        btrfs.RESUME_OFFSET: (btrfs.SwapfileResumeOffset, {"path": "/swap/swapfile"})}


def test_the_offset_read_is_the_one_written_and_a_placeholder_says_so():
    g16 = profile("zephyrus-btrfs")
    real = render_files(g16, None, None, placeholder=True, facts={btrfs.RESUME_OFFSET: OFFSET})["configuration.nix"]
    assert '  boot.resumeDevice = "/dev/mapper/cryptroot";\n  boot.kernelParams = [ "resume_offset=35680" ];' in real
    review = render_files(g16, None, None, placeholder=True)["configuration.nix"]
    assert ("  # (0: a placeholder, the swapfile does not exist yet; the install writes its real offset)\n"
            '  boot.kernelParams = [ "resume_offset=0" ];') in review


def test_a_swapfile_read_on_the_target_and_not_there_stops_the_rendering():
    g16 = profile("zephyrus-btrfs")
    with pytest.raises(MissingDeviceIds) as refused:
        btrfs.resume_configuration(g16, DeviceIds({}, facts={btrfs.RESUME_OFFSET: None}))
    assert str(refused.value) == "/swap/swapfile: no resume offset yet (the swapfile does not exist)"


def test_without_hibernation_nothing_resumes_and_nothing_is_read():
    g16 = profile("zephyrus-btrfs", hibernate=False)
    assert btrfs.LAYER.nix_reads(g16, "/mnt") == {}
    text = render_files(g16, None, None, placeholder=True)["configuration.nix"]
    assert "resumeDevice" not in text and "resume_offset" not in text


def test_zfs_hibernates_to_its_swap_partition_with_a_stored_key_only():
    raidz1 = profile("zfs-raidz1", hibernate=True, swap_random_encryption=False)
    swap = f"/dev/disk/by-partlabel/swap-{raidz1.hash}"
    assert raidz1.resume_swap()[0] == swap
    assert filesystems.LAYER.nix(raidz1, DeviceIds(placeholder=True)).configuration.endswith(
        f'  # Hibernation: resume from the swap partition.\n  boot.resumeDevice = "{swap}";\n')
    config = zfs.LAYER.nix(raidz1, DeviceIds(placeholder=True)).configuration
    assert "  boot.zfs.allowHibernation = true;\n  boot.zfs.forceImportRoot = false;\n" in config
    assert "allowHibernation" not in zfs.LAYER.nix(profile("zfs-raidz1"), DeviceIds(placeholder=True)).configuration


@pytest.mark.parametrize("name", ["zfs-raidz1", "light-tmpfs-f2fs"])
def test_a_swap_with_a_new_key_at_every_boot_cannot_be_resumed_from(name):
    with pytest.raises(ProfileError) as refused:
        profile(name, hibernate=True)
    swap = f"/dev/disk/by-partlabel/swap-{profile(name).hash}"
    assert str(refused.value).endswith(
        f"nixos.hibernate (tabula_vars['hibernate']) with swap on {swap} encrypted with a new random key at every "
        "boot (tabula_vars['swap_random_encryption']): the image written at hibernation could never be read back; "
        "set one of the two to false")


def test_a_profile_without_swap_cannot_hibernate():
    with pytest.raises(ProfileError) as refused:
        profile("tmpfs-root", hibernate=True)
    assert str(refused.value).endswith(
        "nixos.hibernate (tabula_vars['hibernate']): the profile has no swap to hibernate to (a btrfs swapfile or a "
        "swap partition); add one or set it to false")


def test_a_swapfile_the_run_makes_again_is_read_at_execution_not_planned_over():
    """The swapfile gone (removed by hand, or made again at a new size): the plan does not stop
    on its missing offset, the NixOS files wait for it; at execution, with the swapfile still
    missing, the run stops saying what is missing."""
    from operations import nixos, target
    from operations.settings import Settings
    from tests.unit.pyinfra_fake import FIXTURES, fake_run
    from tests.unit.test_nixos_render import fake_ids
    g16 = profile("zephyrus-btrfs")
    facts = {target.FileText: (FIXTURES / "nixos" / "zephyrus-btrfs-luks.nix").read_text(),
             target.BlockDeviceIds: fake_ids(g16), nixos.DmiProductName: "ROG Zephyrus G16",
             btrfs.SwapfileResumeOffset: None, target.PathsState: {}}
    planned = fake_run(dict(facts), Settings.of(g16), executing=False)
    assert list(nixos.configuration._inner(planned, root="/mnt")) == []
    assert planned.host.noops == ["NixOS files render once this exists: /swap/swapfile: no resume offset yet "
                                  "(the swapfile does not exist)"]
    executing = fake_run(dict(facts), Settings.of(g16), executing=True)
    with pytest.raises(MissingDeviceIds) as stopped:
        list(nixos.configuration._inner(executing, root="/mnt"))
    assert str(stopped.value) == "/swap/swapfile: no resume offset yet (the swapfile does not exist)"
    # with the swapfile there, the files carry its offset
    facts[btrfs.SwapfileResumeOffset] = OFFSET
    made = fake_run(dict(facts), Settings.of(g16), executing=True)
    [command] = [str(c) for c in nixos.configuration._inner(made, root="/mnt")]
    assert "configuration.nix" in command
