"""Faults, end to end in the live VM, for every profile: a run is stopped at stage boundaries and in
the middle of the longer stages, by SIGKILL of pyinfra on the controller or by cutting its SSH
connection in the guest, and re-run. Every point is exact: the guest's program waits at the chosen
call (before it runs, or after it ran and before the run learned it) until the fault has landed. Each profile is one chain: every re-run resumes from where
the previous fault left the disks and is itself stopped at the next fault point, so one chain
costs about one full install plus a fact pass per fault.

The chains run with the user's defaults: nixos-install at the end, ZFS pools exported after it.
The last stages are interrupted where their code is shared, once each, by the cheapest profile
that reaches them: nixos-install mid-way and after it finished but before its stamp (btrfs; the
light profile cuts SSH mid-install), the NixOS and persist stages on a ZFS root (zfs-raidz1; the
light profile keeps its persist on the same kind of encrypted dataset), and the pool export
(zfs-raidz1 killed during it, light killed just before it). A run interrupted during or after
nixos-install runs it again (the stamp is written only after success), counted in the stand-in's
log. The confirmed wipe is stopped by SIGKILL only: an SSH cut needs a new connection, which comes
after the whole wipe (a few quick commands) has run.

After the last fault a run without fault must complete; then a further run must change nothing
(ZFS: through a read-only view of the exported pool), the target must verify against the profile
with the verification command (ZFS: after a run that keeps the pools imported), no creating command (partition, luksFormat,
mkfs, subvolume, pool, dataset, snapshot) may have run twice over the whole chain, and what was
written to the persistent volumes before a fault must still be there.

A confirmed wipe interrupted half-way is finished only under the same confirmation while the disk
still holds foreign data, and needs none once the disk is blank.

A half-written LUKS header cannot be resumed safely: the run must stop before any change, naming
the partition and saying what to do.
"""
from __future__ import annotations

import json
import shlex

import pytest

from operations.profile import load_profile
from tests.e2e.faults import Fault, created, creations_of_faulted_run, disk_checksums, duplicated_creations
from tests.e2e.faults import duplicates, run_with_fault, strip_ansi
from tests.e2e.faults import changing_commands, dry_plan
from tests.e2e.helpers import assert_no_changes, assert_target_verified, executed_commands
from tests import profile_cases

SERIALS = ("TABULA-NVME0", "TABULA-RZ1", "TABULA-RZ2", "TABULA-RZ3", "TABULA-SSD")
SECRETS = {
    "TABULA_LUKS_PASSPHRASE": "tabula faults luks 91e2",
    "TABULA_ZFS_KEY": "tabula faults zfs 5c0d",
    "TABULA_ROOT_PASSWORD_HASH": "$6$faultsalt$Qe1bTnXpQvW1o0l2n3c4d5e6f7g8h9i0j1k2l3m4n5o6p7q8r9s0t1u2v3w4x5y6z7A8B9C0D1E2F3G4H5I6J7K",
    "TABULA_USER_PASSWORD_HASH": "$6$faultsalt$Zz1bTnXpQvW1o0l2n3c4d5e6f7g8h9i0j1k2l3m4n5o6p7q8r9s0t1u2v3w4x5y6z7A8B9C0D1E2F3G4H5I6J7K",
}


def profile_vars(livevm, profile: str) -> dict:
    """The profile's live-VM vars (tests/profile_cases.yaml)."""
    return profile_cases.vm_vars(profile, livevm.stable_path)


def deploy_args(profile: str, variables: dict, **data) -> list[str]:
    """The user's defaults (install, pools exported at the end) unless ``data`` says otherwise."""
    extra = [x for key, value in data.items() for x in ("--data", f"{key}={json.dumps(value)}")]
    return ["-vv", "--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}",
            *extra, "deploy.py"]


# Fault points per profile (every profile of tests/profile_cases.yaml has a chain: a test fails
# naming one that lacks it): (fault, what it interrupts). Operation names are the stages' own.
# Every point is exact (faults.py's hold): the program's chosen call waits in the guest, before it
# runs or after it ran, until the kill or the SSH cut has landed. "Before the run learned it" is
# what an SSH cut during a command leaves: the command's work done, the run gone without its result.
CHAINS = {
    "zephyrus-btrfs": [
        (Fault("kill", op=r"^LUKS format cryptroot$", hold="cryptsetup luksFormat"), "after partitioning"),
        (Fault("cut", cmd=r"cryptsetup luksFormat", hold="cryptsetup luksFormat", held="after"),
         "after luksFormat wrote its header, before the run learned it (SSH cut)"),
        (Fault("kill", op=r"^Filesystems$", hold="mkfs.vfat"), "after luksFormat + open"),
        (Fault("cut", cmd=r"mkfs\.btrfs", hold="mkfs.btrfs", held="after"),
         "after mkfs.btrfs, before the run learned it (SSH cut)"),
        (Fault("kill", op=r"^Btrfs subvolumes ", hold="btrfs subvolume create"), "after mkfs"),
        (Fault("kill", cmd=r"btrfs subvolume create", hold="btrfs subvolume create", call=2),
         "mid subvolumes (the first made, the second held)"),
        (Fault("kill", op=r"^Mounts under /mnt$", hold="mount", match="*' /mnt '"), "after subvolumes"),
        (Fault("kill", op=r"^Btrfs swapfile ", hold="truncate"), "after mounts"),
        (Fault("cut", cmd=r"fallocate", hold="fallocate", held="after"),
         "mid swapfile: allocated, before the run learned it (SSH cut)"),
        (Fault("kill", op=r"^nixos-generate-config", hold="nixos-generate-config"), "after swapfile"),
        (Fault("cut", op=r"^Persist host identity$", hold="ssh-keygen", call=2),
         "mid persist host identity: one key made, the next held (SSH cut)"),
        (Fault("kill", out=r"stand-in: copying the system closure"), "mid nixos-install"),
        (Fault("kill", out=r"installation finished!"), "after nixos-install, before its stamp"),
    ],
    "zfs-raidz1": [
        (Fault("kill", op=r"^ZFS pool ", hold="zpool create"), "after partitioning"),
        (Fault("cut", cmd=r"zpool create", hold="zpool create", held="after"),
         "after zpool create, before the run learned it (SSH cut)"),
        (Fault("kill", op=r"^ZFS dataset .*/temp$", hold="zfs create"), "after pool create"),
        # (a temp dataset and its @empty are made by one command: Tabula refuses a temp dataset
        # without @empty, so a fault between the two is not a point a run can leave)
        (Fault("kill", cmd=r"zfs create", hold="zfs create", call=5),
         "mid datasets (temp/root and its @empty made, temp/tmp held)"),
        (Fault("kill", cmd=r"mount -t zfs", hold="mount", match="'-t zfs '*", call=2),
         "after datasets, mid mounts (the first mounted, the second held)"),
        (Fault("cut", cmd=r"nixos-generate-config --root", hold="nixos-generate-config", held="after"),
         "after nixos-generate-config on a ZFS root, before the run learned it (SSH cut)"),
        (Fault("kill", op=r"^Persist host identity$", hold="ssh-keygen", call=2),
         "mid persist on the encrypted dataset (one key made, the next held)"),
        (Fault("kill", cmd=r"zpool export", hold="zpool export"), "mid pool export (unmounted, the export held)"),
    ],
    "light-tmpfs-f2fs": [
        (Fault("kill", op=r"^LUKS open local-", hold="cryptsetup open"), "after luksFormat"),
        (Fault("cut", cmd=r"mkfs\.f2fs", hold="mkfs.f2fs", held="after"),
         "after mkfs.f2fs, before the run learned it (SSH cut)"),
        (Fault("kill", op=r"^ZFS dataset .*/remote/system$", hold="zfs create", call=2),
         "after pool create and encrypted dataset"),
        (Fault("cut", out=r"stand-in: building the flake"), "mid nixos-install (SSH cut)"),
        (Fault("kill", op=r"^ZFS export ", hold="zpool export"), "after the install and its stamp, before the pool export"),
    ],
    "tmpfs-root": [
        (Fault("kill", op=r"^LUKS format crypted-", hold="cryptsetup luksFormat"), "after partitioning"),
        (Fault("kill", cmd=r"btrfs subvolume create", hold="btrfs subvolume create", call=2),
         "mid subvolumes (the first made, the second held)"),
        (Fault("kill", op=r"^Mounts under /mnt$", hold="mount", match="'-t tmpfs '*"),
         "after subvolumes (the tmpfs root's mount held)"),
        (Fault("cut", op=r"^Persist host identity$", hold="ssh-keygen", call=2),
         "mid persist host identity: one key made, the next held (SSH cut)"),
    ],
}
# Faults that stop nixos-install before its stamp: each means one more run of it.
INSTALL_FAULTS = ("mid nixos-install", "after nixos-install")
# Test-only knobs of the nixos-install stand-in (tools/guest/standins/nixos-install), one-shot:
# the next install that finishes waits this long after its work (time to kill pyinfra "after the
# install, before the stamp"); the next install takes this long per step (an SSH cut needs a new
# connection, seconds under TCG: time to land it in the middle).
PAUSE_KNOB = "/run/tabula-standins/nixos-install.pause"
SLOW_KNOB = "/run/tabula-standins/nixos-install.slow"
INSTALL_LOG = "/var/log/tabula-standins/nixos-install.log"

# Where each profile keeps data that must survive (mount points under /mnt).
PERSISTENT = {"zephyrus-btrfs": ["/mnt/persist", "/mnt/home"], "zfs-raidz1": ["/mnt/remote", "/mnt/local"],
              "light-tmpfs-f2fs": ["/mnt/remote", "/mnt/.local"], "tmpfs-root": ["/mnt/persist", "/mnt/home"]}


def test_every_profile_has_a_fault_chain():
    lacking = [name for name in profile_cases.profile_names() if name not in CHAINS or name not in PERSISTENT]
    assert not lacking, f"profiles without a fault chain (CHAINS, PERSISTENT): {lacking}"


def zfs_history_commands(history: str) -> list[str]:
    """The commands of `zpool history` ("2026-11-22.06:30:01 zfs create -o a=b pool/ds"), as run."""
    return [line.split(" ", 1)[1] for line in history.splitlines()
            if line[:4].isdigit() and " " in line]


@pytest.fixture
def secrets_env(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
        monkeypatch.delenv(f"{key}_FILE", raising=False)


def write_markers(livevm, profile: str, written: dict) -> None:
    """A marker on every persistent volume mounted right now (once per volume)."""
    for mountpoint in PERSISTENT[profile]:
        if mountpoint in written:
            continue
        if livevm.run(f"mountpoint -q {mountpoint}", check=False).returncode == 0:
            text = f"written before a fault to {mountpoint}"
            livevm.run(f"echo {shlex.quote(text)} > {mountpoint}/tabula-fault-marker && sync")
            written[mountpoint] = text + "\n"


def installs_so_far(livevm) -> int:
    return int(livevm.run(f"cat {INSTALL_LOG} 2>/dev/null | wc -l").stdout.strip() or 0)


@pytest.mark.parametrize("profile", profile_cases.profile_names())
def test_faults_converge(profile, clean_disks, livevm, target, secrets_env):
    livevm.install_standins()
    livevm.run(f"mkdir -p $(dirname {PAUSE_KNOB}) && rm -f {PAUSE_KNOB} {SLOW_KNOB}")
    if any(what.startswith("after nixos-install") for _, what in CHAINS[profile]):
        livevm.run(f"echo 5 > {PAUSE_KNOB}")
    if any(fault.kind == "cut" and what.startswith("mid nixos-install") for fault, what in CHAINS[profile]):
        livevm.run(f"echo 15 > {SLOW_KNOB}")
    installs_before = installs_so_far(livevm)
    variables = profile_vars(livevm, profile)
    args = deploy_args(profile, variables)
    creations: list[str] = []
    markers: dict[str, str] = {}
    log = []
    try:
        converge_through_faults(profile, livevm, target, variables, args, creations, markers, log, installs_before)
    finally:
        livevm.run(f"rm -f {PAUSE_KNOB} {SLOW_KNOB}")


def converge_through_faults(profile, livevm, target, variables, args, creations, markers, log, installs_before):
    for fault, what in CHAINS[profile]:
        run = run_with_fault(livevm, args, fault)
        creations += creations_of_faulted_run(livevm, run.commands)
        output = strip_ansi(run.output)
        log.append(f"{what}: {fault.describe()} -> rc {run.returncode}, fired={run.fired} ({run.seconds:.0f} s)")
        assert run.fired, f"{profile}: fault point {what!r} never reached:\n" + "\n".join(log) + "\n" + output[-5000:]
        assert run.returncode != 0, f"{profile}: the run interrupted {what} reported success:\n{output[-3000:]}"
        for secret in SECRETS.values():
            assert secret not in run.output
        write_markers(livevm, profile, markers)

    final = run_with_fault(livevm, args, None)
    creations += created(final.commands)
    assert final.returncode == 0, "\n".join(log) + "\n" + strip_ansi(final.output)[-8000:]
    write_markers(livevm, profile, markers)
    assert markers, f"{profile}: no persistent volume was ever mounted"

    again = run_with_fault(livevm, args, None)
    assert again.returncode == 0, strip_ansi(again.output)[-8000:]
    output = strip_ansi(again.output)
    assert_no_changes(output)

    # the dry plan of the installed, converged target: every step, none with a change, no command
    # run, the disks byte-identical (ZFS: read through the read-only view, left exported)
    _plan, rows = dry_plan(livevm, args, SERIALS)
    assert len(rows) > 10 and not any(rows.values()), rows
    if load_profile(profile, variables).pools:
        assert livevm.run("zpool list -H").stdout.strip() == "", "the dry run left a pool imported"

    # every install a fault cut short (or whose stamp it prevented) ran again: one per such fault + the last
    install_faults = sum(1 for _, what in CHAINS[profile] if what.startswith(INSTALL_FAULTS))
    assert installs_so_far(livevm) - installs_before == install_faults + 1, "\n".join(log)
    pools = [pool.name for pool in load_profile(profile, variables).pools.values()]
    if pools:
        # exported at the end: a run that keeps them imported mounts everything again to verify
        kept = run_with_fault(livevm, deploy_args(profile, variables, tabula_export_pools=False), None)
        assert kept.returncode == 0, strip_ansi(kept.output)[-8000:]
        creations += created(kept.commands)
    stamp = livevm.run("cat /mnt/nix/var/lib/tabula/installed-config.sha256").stdout.strip()
    digest = livevm.run('cd /mnt/etc/nixos && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum '
                        '| sha256sum | cut -d" " -f1').stdout.strip()
    assert stamp == digest, "the stamp does not name the installed configuration"

    assert_target_verified(livevm, {"tabula_profile": profile, "tabula_vars": variables})
    # ZFS keeps its own record of what really ran (zpool history): a command pyinfra echoed just
    # before a kill may never have reached the target, so pools, datasets and snapshots are
    # counted from the pool's history, everything else from the commands pyinfra executed (the
    # last command of a faulted run only as far as the target shows it).
    zfs_kinds = r"^(pool|dataset|snapshot) "
    dupes = duplicates(creations, allowed=(zfs_kinds,) if pools else ())
    for pool in pools:
        history = livevm.run(f"zpool history {shlex.quote(pool)}").stdout
        dupes += duplicated_creations(zfs_history_commands(history))
    assert dupes == [], f"{profile}: created more than once over the chain: {dupes}\n" + "\n".join(log)
    for path, text in markers.items():
        assert livevm.run(f"cat {path}/tabula-fault-marker").stdout == text, f"{path}: data lost"
    print("\n".join(log))


LUKS_HEADER_PARTITION = "/dev/disk/by-partlabel/cryptroot"


def test_half_written_luks_header_stops_with_advice(clean_disks, livevm, secrets_env):
    """A LUKS2 header whose metadata areas never got written (luksFormat cut short): refused."""
    variables = profile_vars(livevm, "zephyrus-btrfs")
    args = deploy_args("zephyrus-btrfs", variables)
    run = run_with_fault(livevm, args, Fault("kill", op=r"^LUKS format cryptroot$", hold="cryptsetup luksFormat"))
    assert run.fired, strip_ansi(run.output)[-4000:]
    # The first 4 KiB of a real LUKS2 header (magic, version, checksum of the JSON area that
    # follows), nothing after it: what a luksFormat stopped after its first write leaves.
    livevm.run("truncate -s 32M /run/tabula-hdr.img && "
               "echo x | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "
               "/run/tabula-hdr.img - && "
               f"dd if=/run/tabula-hdr.img of={LUKS_HEADER_PARTITION} bs=4096 count=1 conv=fsync status=none && "
               "rm -f /run/tabula-hdr.img && udevadm settle")
    assert livevm.run(f"cryptsetup isLuks {LUKS_HEADER_PARTITION}", check=False).returncode != 0 or \
        livevm.run(f"cryptsetup luksDump {LUKS_HEADER_PARTITION}", check=False).returncode != 0
    before = disk_checksums(livevm, SERIALS)
    result = run_with_fault(livevm, args, None)
    output = strip_ansi(result.output)
    assert result.returncode != 0, output[-4000:]
    assert "cryptroot" in output and "wipefs" in output, output[-4000:]
    assert changing_commands(output) == [], changing_commands(output)
    assert executed_commands(output)
    assert disk_checksums(livevm, SERIALS) == before


def test_confirmed_wipe_interrupted_is_finished_only_while_the_disk_holds_foreign_data(clean_disks, livevm,
                                                                                      secrets_env):
    """A confirmed wipe cut short: while the disk still holds foreign data, a run without the
    confirmation is refused (naming what is left) and the confirmed run finishes the wipe; once
    the wipe has made the disk blank, no confirmation is asked for any more. One profile: the
    wipe is the guard's, the same for every profile (zephyrus-btrfs, without the install)."""
    nvme = livevm.disk_by_serial("TABULA-NVME0")
    livevm.run(f"sgdisk -n 1:0:+64M -c 1:photos -n 2:0:+64M -c 2:music {nvme} >/dev/null && udevadm settle && "
               "mkfs.ext4 -q -L family-photos /dev/disk/by-partlabel/photos && "
               "mkfs.ext4 -q -L music /dev/disk/by-partlabel/music && udevadm settle")
    variables = profile_vars(livevm, "zephyrus-btrfs")
    unconfirmed = deploy_args("zephyrus-btrfs", variables, tabula_install=False)
    confirmed = deploy_args("zephyrus-btrfs", variables, tabula_install=False, tabula_confirm_wipe=["TABULA-NVME0"])

    # 1. killed as the wipe reaches the second partition: the table and (at least) its data remain
    run = run_with_fault(livevm, confirmed, Fault("kill", cmd=r"wipefs -a \S+p2'$"))
    assert run.fired and run.returncode != 0, strip_ansi(run.output)[-4000:]
    assert "Wipe " in strip_ansi(run.output)
    assert livevm.run(f"blkid -p -o value -s PTTYPE {nvme}", check=False).stdout.strip() == "gpt"
    music_left = livevm.run(f"blkid -p -o value -s TYPE {nvme}p2", check=False).stdout.strip() == "ext4"

    # 2. without the confirmation: refused, naming what is left, nothing run, disk unchanged
    before = disk_checksums(livevm, ["TABULA-NVME0"])
    refused = run_with_fault(livevm, unconfirmed, None)
    output = strip_ansi(refused.output)
    assert refused.returncode != 0 and "refusing" in output and "tabula_confirm_wipe" in output, output[-4000:]
    assert "(partlabel 'music')" in output, output[-4000:]
    if music_left:
        assert "ext4 filesystem labelled 'music'" in output, output[-4000:]
    assert changing_commands(output) == []
    assert disk_checksums(livevm, ["TABULA-NVME0"]) == before

    # 3. confirmed again, killed as the partition table is zapped: the signatures are gone by then
    # (SIGKILL of pyinfra: an SSH cut needs a new connection and lands after the whole wipe)
    run = run_with_fault(livevm, confirmed, Fault("kill", cmd=r"sgdisk --zap-all"))
    assert run.fired and run.returncode != 0, strip_ansi(run.output)[-4000:]
    assert livevm.run(f"blkid -p -o export {nvme}; blkid -p -o export {nvme}p1 {nvme}p2",
                      check=False).stdout.strip() == "", "the wipe should have cleared every signature"

    # 4. blank now: no confirmation needed, the run installs; the next one changes nothing
    final = run_with_fault(livevm, unconfirmed, None)
    output = strip_ansi(final.output)
    assert final.returncode == 0, output[-6000:]
    assert "Wipe " not in output
    again = run_with_fault(livevm, unconfirmed, None)
    assert again.returncode == 0, strip_ansi(again.output)[-6000:]
    assert_no_changes(strip_ansi(again.output))
    assert_target_verified(livevm, {"tabula_profile": "zephyrus-btrfs", "tabula_vars": variables,
                                    "tabula_install": False})
