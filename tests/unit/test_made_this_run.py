"""What a run made itself is not read back before the next step (operations.run.Run:
record_created / is_fresh): a first run on a blank disk reads the target only where it must, a
re-run (which knows nothing of the run before it) reads everything, and each step that skips its
read carries the check inside its own command instead."""
from __future__ import annotations


import pytest

from operations import btrfs, filesystems, gpt, luks, mounts, nixos, persist, target, zfs
from operations.run import Made, Run
from operations.target import install_path
from operations.profile import load_profile
from operations.secrets import Secret
from operations.settings import Settings
from tests.unit.pyinfra_fake import FIXTURES, fake_run
from tests.unit.test_nixos_render import fake_ids
from tests.unit.vm_vars import NVME, ZFS_VARS


SECRETS = {luks.PASSPHRASE: Secret("unit test secret", "test")}


@pytest.fixture
def profile():
    return load_profile("zephyrus-btrfs", {"disk": NVME})


@pytest.fixture
def fake(profile) -> Run:
    """A run of the profile on a fake target (``fake.host`` answers its facts)."""
    return fake_run({}, Settings.of(profile), secrets=SECRETS)


def run(the_run: Run, op, **kwargs) -> list[str]:
    return [str(command) for command in op._inner(the_run, **kwargs)]


def first_run(profile, fake, knows_nothing: bool = False):
    """The zephyrus-btrfs stages in deploy order: ({stage: facts it read}, {stage: commands}).
    knows_nothing: each stage as if it were the first of a new run (a re-run after a fault)."""
    reads: dict[str, list[str]] = {}
    settings = Settings.of(profile)

    def stage(label, op, **kwargs):
        the_run = Run(fake.host, settings, secrets=SECRETS) if knows_nothing else fake
        before = len(fake.host.reads)
        commands = run(the_run, op, **kwargs)
        reads[label] = fake.host.reads[before:]
        return commands

    commands = {}
    commands["gpt"] = stage("gpt", gpt.partitions, disk_key="main", disk=profile.disks["main"])
    [(part, spec)] = profile.luks_devices()
    commands["format"] = stage("format", luks.container, device=part.device, luks=spec)
    commands["open"] = stage("open", luks.mapping, device=part.device, luks=spec)
    commands["mkfs"] = stage("mkfs", filesystems.formatted, filesystems=list(profile.filesystems()),
                             swaps=list(profile.swaps()))
    [(device, fs)] = btrfs.btrfs_filesystems(profile)
    top = btrfs.top_level_path(device, fs)
    commands["top"] = stage("top", btrfs.top_level, device=device, path=top, options=())
    commands["subvolumes"] = stage("subvolumes", btrfs.subvolumes, top=top, wanted=list(fs.subvolumes), device=device)
    commands["mounts"] = stage("mounts", mounts.mounted, mounts=profile.all_mounts())
    [sub] = [s for s in fs.subvolumes if s.swapfile]
    commands["swapfile"] = stage("swapfile", btrfs.swapfile, path=f"{install_path(sub.mountpoint)}/swapfile",
                                 swapfile=sub.swapfile)
    commands["ngc"] = stage("ngc", nixos.generate_config, root="/mnt")
    commands["config"] = stage("config", nixos.configuration, root="/mnt")
    commands["secrets"] = stage("secrets", persist.secrets, directory="/mnt/persist/secrets",
                                files={"root-password": Secret("$6$saltsalt$hash", "test")})
    commands["identity"] = stage("identity", persist.host_identity, etc="/mnt/persist/etc", keys=[("ed25519", None)])
    commands["copy"] = stage("copy", persist.config_copy, source="/mnt/etc/nixos", dest="/mnt/persist/etc/nixos")
    return reads, commands


def blank_target_facts(profile) -> dict:
    # What the target shows when read: blank disk, nothing mounted; after nixos-generate-config,
    # its hardware configuration. Devices' ids exist once formatted.
    generated = (FIXTURES / "nixos" / "zephyrus-btrfs-luks.nix").read_text()
    offset = btrfs.parse_resume_offset((FIXTURES / "btrfs_map_swapfile_resume_offset.txt").read_text().splitlines())
    return {gpt.PartitionTable: None, target.FileText: generated, target.BlockDeviceIds: fake_ids(profile),
            nixos.DmiProductName: "ROG Zephyrus G16", btrfs.SwapfileResumeOffset: offset}


def test_a_first_run_reads_only_what_it_did_not_make(fake, profile):
    fake.host.facts.update(blank_target_facts(profile))
    fake.read(mounts.Mounts)            # the guard's first read: /proc/mounts before the run changed anything
    reads, commands = first_run(profile, fake)
    # Read: the disk's table and what nixos-generate-config wrote. Nothing else: every other
    # stage works on what it made (what was mounted at the start is all the mounts can meet).
    assert reads == {"gpt": ["PartitionTable"], "format": [], "open": [], "mkfs": [], "top": [], "subvolumes": [],
                     "mounts": [], "swapfile": [], "ngc": [],
                     # (the swapfile's resume offset too: where its blocks went is the disk's to say)
                     "config": ["FileText", "BlockDeviceIds", "DmiProductName", "SwapfileResumeOffset"],
                     "secrets": [], "identity": [], "copy": []}
    assert all(commands[stage] for stage in reads), "every stage of a first run has a command"
    # ...and the unread steps check inside their own command what the read would have shown.
    assert "cryptsetup isLuks /dev/disk/by-partlabel/cryptroot" in commands["format"][0]
    assert "if [ -e /dev/mapper/cryptroot ]" in commands["open"][0]
    assert commands["mkfs"][0].count("blkid -p -o value -s TYPE") == 2
    assert "mountpoint -q /run/tabula/btrfs/nixos" in commands["top"][0]
    assert "already mounted, by something this run did not mount" in commands["mounts"][0]
    # all NixOS files are written over what nixos-generate-config left (configuration.nix)
    assert all(name in commands["config"][0] for name in ('"$s/"flake.nix', '"$s/"configuration.nix',
                                                           '"$s/"hardware-configuration.nix'))


def test_a_run_resumed_at_any_stage_reads_before_it_acts(fake, profile):
    # The same target, but each stage as the first of a new run (resumed after a fault there):
    # nothing is known, so every stage reads the target before it decides.
    fake.host.facts.update(blank_target_facts(profile))
    reads, _ = first_run(profile, fake, knows_nothing=True)
    assert all(reads.values()), reads
    assert "LuksHeader" in reads["format"] and "LuksMapping" in reads["open"]
    assert reads["mkfs"] == ["WholeDiskSignature", "WholeDiskSignature"] and reads["top"] == ["Mounts"]
    assert "BtrfsSubvolumes" in reads["subvolumes"] and "SwapfileState" in reads["swapfile"]


def test_what_the_target_shows_is_not_trusted_over_a_fresh_make(fake, profile):
    # If read, the partition would show a LUKS header (say, stale data from an old table at the
    # same offset) and the stage would keep it. This run made the partition: it is not read, and
    # the format command's own check (isLuks, blkid) stops the run on the target instead.
    [(part, spec)] = profile.luks_devices()
    fake.host.facts.update({luks.LuksHeader: {"version": 2, "uuid": "old"}})
    assert run(fake, luks.container, device=part.device, luks=spec) == [] and "already holds" in fake.host.noops[-1]
    fake.record_created(Made.device(part.device))
    [command] = run(fake, luks.container, device=part.device, luks=spec)
    script = command
    assert script.index("cryptsetup isLuks") < script.index("cryptsetup luksFormat")
    assert "already carries a signature: not formatting it" in script


def test_mounts_record_which_places_are_empty(fake, profile):
    for sub in ("@root", "@nix", "@persist"):
        fake.record_created(Made.subvolume("/dev/mapper/cryptroot", sub))
    fake.record_created(Made.filesystem("/dev/disk/by-partlabel/EFI"))
    run(fake, mounts.mounted, mounts=profile.all_mounts())
    assert fake.is_fresh("/mnt/etc/nixos") and fake.is_fresh("/mnt/persist/secrets")
    assert fake.is_fresh("/mnt/boot") and fake.is_fresh("/mnt/nix/store")
    assert not fake.is_fresh("/mnt/home/ana")        # @home was not made by this run: read it
    assert not fake.is_fresh("/mnt/var/log") and not fake.is_fresh("/srv")


def test_fresh_places_follow_the_nearest_record(fake):
    fake.record_fresh("/mnt", True)
    fake.record_fresh("/mnt/nix", False)
    fake.record_fresh("/mnt/persist/etc/ssh", False)
    assert fake.is_fresh("/mnt") and fake.is_fresh("/mnt/etc/nixos/")
    assert fake.is_fresh("/mnt/persist/etc/nixos")
    assert not fake.is_fresh("/mnt/nix/store") and not fake.is_fresh("/mnt/persist/etc/ssh/key")
    assert not fake.is_fresh("/mntx") and not fake.is_fresh("/")


def test_a_plan_never_lends_its_assumptions_to_the_execution(fake):
    fake.host.state = type("PrepareState", (), {"is_executing": False})()
    fake.record_created(Made.device("/dev/disk/by-partlabel/cryptroot"))
    fake.record_fresh("/mnt", True)
    assert fake.created_this_run(Made.device("/dev/disk/by-partlabel/cryptroot")) and fake.is_fresh("/mnt/x")
    fake.host.state = type("ExecutingState", (), {"is_executing": True})()
    assert not fake.created_this_run(Made.device("/dev/disk/by-partlabel/cryptroot"))
    assert not fake.is_fresh("/mnt/x")


def test_a_pool_on_new_partitions_is_created_and_filled_without_reading_it(fake):
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    pool_def = profile.pools["rpool"]
    devices = zfs.member_devices(profile, "rpool")
    for path in devices.values():
        fake.record_created(Made.device(path))
    [create] = run(fake, zfs.pool, pool=pool_def, devices=devices)
    assert "zpool create" in create and "zpool labelclear" in create   # its own refusal of an old label says what to do
    assert run(fake, zfs.dataset, dataset_name=pool_def.name, properties=dict(pool_def.root_properties), create=False) == []
    for ds in zfs.ordered_datasets(pool_def):
        [command] = run(fake, zfs.dataset, dataset_name=f"{pool_def.name}/{ds.name}", properties=zfs.dataset_properties(ds),
                        encryption=ds.encryption.model_dump() if ds.encryption else None,
                        empty_snapshot=ds.empty_snapshot)
        assert command.startswith("zfs create")
    assert fake.host.reads == []
    run(fake, mounts.mounted, mounts=profile.all_mounts())
    zfs_mounts = [m for m in profile.all_mounts() if m.fstype == "zfs"]
    assert zfs_mounts and all(fake.is_fresh(install_path(m.mountpoint)) for m in zfs_mounts)


def test_a_pool_with_a_member_from_before_is_looked_for(fake):
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    devices = zfs.member_devices(profile, "rpool")
    for path in list(devices.values())[1:]:
        fake.record_created(Made.device(path))
    run(fake, zfs.pool, pool=profile.pools["rpool"], devices=devices)
    assert fake.host.reads == ["ZfsPoolState", "ZfsImportablePools"]
