"""The zephyrus-btrfs profile's disk stages in the live VM: blank NVMe -> GPT, LUKS2, btrfs
subvolumes with @root-blank, mounts under /mnt, swapfile (its dry plan from blank disks:
tests/e2e/test_dry_plans.py). Every deploy runs twice: the second run
must change nothing (results table and executed commands) and re-create nothing (identities).
Over SSH from the controller; the deploy as ``pyinfra @local`` in the guest is proven on the
tmpfs-root profile (tests/e2e/test_local_install.py). The installed target passes the verification
command users run (``pytest tests/verify``), which fails, one line per mismatch, once the target
differs from the profile."""
from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from tests.e2e.helpers import (assert_no_changes, assert_results_table_fits, assert_target_verified, executed_commands,
                               gap_report, grand_total, lost_paths, run_verification)

GiB, MiB = 1024**3, 1024**2
NVME_SERIAL = "TABULA-NVME0"
# A test-only passphrase; it must never show up in output, argv or files.
PASSPHRASE = "tabula test passphrase 7f3c"
SWAP = "256M"
TEST_VARS = {"swap_size": SWAP, "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000}
SUBVOLUMES = ["@root", "@nix", "@home", "@persist", "@log", "@swap"]
BTRFS_OPTS = ["noatime", "compress=zstd:3", "discard=async"]
MOUNTS = {   # /proc/mounts target -> (fstype, options that must be there)
    "/mnt": ("btrfs", ["subvol=/@root", *BTRFS_OPTS]),
    "/mnt/nix": ("btrfs", ["subvol=/@nix", *BTRFS_OPTS]),
    "/mnt/home": ("btrfs", ["subvol=/@home", *BTRFS_OPTS]),
    "/mnt/persist": ("btrfs", ["subvol=/@persist", *BTRFS_OPTS]),
    "/mnt/var/log": ("btrfs", ["subvol=/@log", *BTRFS_OPTS]),
    "/mnt/swap": ("btrfs", ["subvol=/@swap", "noatime"]),
    "/mnt/boot": ("vfat", ["fmask=0022", "dmask=0022"]),
}


def nvme_by_id(livevm) -> str:
    return livevm.stable_path(NVME_SERIAL)


def profile_vars(livevm, extra_vars=None) -> dict:
    return {"disk": nvme_by_id(livevm), **TEST_VARS, **(extra_vars or {})}


def deploy_args(livevm, extra_vars=None, confirm=None) -> list[str]:
    data = profile_vars(livevm, extra_vars)
    args = ["deploy.py", "--data", f"tabula_vars={json.dumps(data)}", "--data", "tabula_install=false"]
    if confirm:
        args += ["--data", f"tabula_confirm_wipe={json.dumps(confirm)}"]
    return args


@pytest.fixture
def passphrase_env(monkeypatch):
    monkeypatch.setenv("TABULA_LUKS_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("TABULA_LUKS_PASSPHRASE_FILE", raising=False)


def run_over_ssh(run_pyinfra, args, *flags):
    result = run_pyinfra([*args, *flags])
    return result, result.stdout + result.stderr


def partitions(livevm, serial: str = NVME_SERIAL) -> list[dict]:
    """The disk's partitions as blkid probes them from the disk: number, name, type GUID, uuid,
    offset and size in 512-byte sectors."""
    nvme = livevm.disk_by_serial(serial)
    script = (f"for p in $(lsblk -lnpo NAME,TYPE {nvme} | awk '$2 == \"part\" {{print $1}}'); do "
              "echo; blkid -p -o export $p | grep ^PART_ENTRY_; done")
    found = []
    for block in livevm.run(script).stdout.split("\n\n"):
        entry = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if entry:
            found.append(entry)
    return sorted(found, key=lambda e: int(e["PART_ENTRY_NUMBER"]))


def identities(livevm) -> dict:
    """What would change if anything were re-created: partition GUIDs, LUKS and btrfs UUIDs,
    subvolume ids/uuids, the swapfile's inode."""
    return {
        "partitions": partitions(livevm),
        "luks": livevm.run("cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot").stdout.strip(),
        "efi": livevm.run("blkid -p -o value -s UUID /dev/disk/by-partlabel/EFI").stdout.strip(),
        "btrfs": livevm.run("blkid -p -o value -s UUID /dev/mapper/cryptroot").stdout.strip(),
        # id, uuid, path (not the generation: it moves with every write)
        "subvolumes": livevm.run("btrfs subvolume list -u /mnt | awk '{print $2, $(NF-2), $NF}'").stdout,
        "swapfile": livevm.run("stat -c %i /mnt/swap/swapfile").stdout.strip(),
    }


def assert_installed_layout(livevm, target, disk_serial: str = NVME_SERIAL):
    """Real outcomes on the real devices of the guest (the profile installed on that disk)."""
    parts = partitions(livevm, disk_serial)
    assert [p["PART_ENTRY_NAME"] for p in parts] == ["EFI", "cryptroot"]
    assert [p["PART_ENTRY_SCHEME"] for p in parts] == ["gpt", "gpt"]
    assert parts[0]["PART_ENTRY_TYPE"] == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"      # ef00
    assert parts[1]["PART_ENTRY_TYPE"] == "0fc63daf-8483-4772-8e79-3d69d8477de4"      # 8300
    assert int(parts[0]["PART_ENTRY_SIZE"]) * 512 == 1 * GiB                           # blkid: 512-byte units
    disk_bytes = int(livevm.run(f"blockdev --getsize64 {livevm.disk_by_serial(disk_serial)}").stdout)
    end = (int(parts[1]["PART_ENTRY_OFFSET"]) + int(parts[1]["PART_ENTRY_SIZE"])) * 512
    assert disk_bytes - end <= MiB, "cryptroot does not fill the disk"
    for label in ("EFI", "cryptroot"):
        assert target.file(f"/dev/disk/by-partlabel/{label}").exists

    dump = livevm.run("cryptsetup luksDump /dev/disk/by-partlabel/cryptroot").stdout
    assert dump.startswith("LUKS header information") and "Version:       \t2" in dump
    assert livevm.run("cryptsetup isLuks --type luks2 /dev/disk/by-partlabel/cryptroot", check=False).returncode == 0
    assert "pbkdf2" in dump
    status = livevm.run("cryptsetup status cryptroot").stdout
    assert "is active" in status and "discards" in status and "no_read_workqueue" in status
    assert target.file("/dev/mapper/cryptroot").exists

    assert livevm.run("blkid -p -o value -s TYPE /dev/mapper/cryptroot").stdout.strip() == "btrfs"
    assert livevm.run("blkid -p -o value -s LABEL /dev/mapper/cryptroot").stdout.strip() == "nixos"
    assert livevm.run("blkid -p -o value -s TYPE /dev/disk/by-partlabel/EFI").stdout.strip() == "vfat"
    assert livevm.run("blkid -p -o value -s LABEL /dev/disk/by-partlabel/EFI").stdout.strip() == "EFI"

    top = "/run/tabula/btrfs/nixos"
    listed = livevm.run(f"btrfs subvolume list {top}").stdout.split("\n")
    names = sorted(line.rsplit(" path ", 1)[1] for line in listed if " path " in line)
    assert names == sorted([*SUBVOLUMES, "@root-blank"])
    for line in listed:
        if " path " in line:
            assert " top level 5 " in line, line          # all top-level
    assert livevm.run(f"btrfs property get -ts {top}/@root-blank ro").stdout.strip() == "ro=true"
    assert livevm.run(f"btrfs property get -ts {top}/@root ro").stdout.strip() == "ro=false"
    assert livevm.run(f"ls -A {top}/@root-blank").stdout == ""
    # @root-blank is a snapshot of @root
    root_uuid = livevm.run(f"btrfs subvolume show {top}/@root | awk '$1 == \"UUID:\" {{print $2}}'").stdout.strip()
    blank_parent = livevm.run(f"btrfs subvolume show {top}/@root-blank | awk '$1 == \"Parent\" && $2 == \"UUID:\" {{print $3}}'").stdout.strip()
    assert blank_parent == root_uuid

    # After a close and re-open, btrfs may report the mapper by its kernel name (/dev/dm-0):
    # the same device, so compare canonical paths.
    mapper_node = livevm.run("readlink -f /dev/mapper/cryptroot").stdout.strip()
    mounts = {}
    for line in livevm.run("cat /proc/mounts").stdout.splitlines():
        device, mountpoint, fstype, options = line.split()[:4]
        mounts[mountpoint] = (device, fstype, options.split(","))
    for mountpoint, (fstype, options) in MOUNTS.items():
        assert mountpoint in mounts, f"{mountpoint} not mounted"
        device, have_type, have = mounts[mountpoint]
        assert have_type == fstype, (mountpoint, have_type)
        missing = [o for o in options if o not in have]
        assert not missing, (mountpoint, have, missing)
        if fstype == "btrfs":
            assert device == "/dev/mapper/cryptroot" or device == mapper_node, (mountpoint, device)

    swapfile = target.file("/mnt/swap/swapfile")
    assert swapfile.is_file and swapfile.size == 256 * MiB and swapfile.mode == 0o600
    assert livevm.run("lsattr /mnt/swap/swapfile").stdout.split()[0].count("C") == 1
    assert livevm.run("blkid -p -o value -s TYPE /mnt/swap/swapfile").stdout.strip() == "swap"
    # hibernation (the profile's default): the installed configuration resumes from the real
    # swapfile, at the offset btrfs gives for it on the target
    offset = livevm.run("btrfs inspect-internal map-swapfile -r /mnt/swap/swapfile").stdout.strip()
    config = livevm.run("cat /mnt/etc/nixos/configuration.nix").stdout
    assert re.findall(r'^  boot\.kernelParams = \[ "resume_offset=(\d+)" \];$', config, re.M) == [offset], config
    assert '  boot.resumeDevice = "/dev/mapper/cryptroot";' in config.splitlines()


def assert_secret_kept(livevm, output):
    assert PASSPHRASE not in output
    # argv: the passphrase is on no command line pyinfra ran (the echoed commands) ...
    assert all(PASSPHRASE not in cmd for cmd in executed_commands(output))
    # ... and in no file of the repository or of the guest's usual places (the test's own secret
    # file in /root is the controller-side source for @local runs and is skipped)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found = os.popen(f"grep -rlF {shlex.quote(PASSPHRASE)} {here} --exclude-dir=.git --exclude-dir=.venv "
                     "--exclude-dir=__pycache__ --exclude=test_btrfs_profile.py 2>/dev/null").read()
    assert found == ""
    guest = livevm.run(f"grep -rlF {shlex.quote(PASSPHRASE)} /opt/tabula/src /tmp /run/tabula /mnt /var/log "
                       "--exclude=test_btrfs_profile.py 2>/dev/null || true").stdout
    assert guest == ""


def test_install_over_ssh_converges(clean_disks, livevm, target, passphrase_env, run_pyinfra):
    first, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vvv", "--debug")
    assert first.returncode == 0, output[-8000:]
    assert grand_total(output)[1] != "-"
    assert_secret_kept(livevm, output)
    assert_installed_layout(livevm, target)
    before = identities(livevm)

    second, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    assert second.returncode == 0, output[-8000:]
    assert_no_changes(output)
    assert identities(livevm) == before
    assert_results_table_fits(output)     # (at -vv: no debug lines between its rows)

    livevm.run("echo kept-home > /mnt/home/marker && echo kept-persist > /mnt/persist/marker && sync")
    third, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    assert third.returncode == 0, output[-8000:]
    assert_no_changes(output)
    assert identities(livevm) == before
    assert target.file("/mnt/home/marker").content_string == "kept-home\n"
    assert target.file("/mnt/persist/marker").content_string == "kept-persist\n"
    assert_installed_layout(livevm, target)
    # the gap report: written to @root, to a persisted path and to other subvolumes' mounts; only
    # the first are lost at the next boot (compared with @root-blank), and it says how to keep them
    livevm.run("mkdir -p /mnt/var/lib/gaptest /mnt/etc/ssh && echo db > /mnt/var/lib/gaptest/db && "
               "echo conf > /mnt/etc/gaptest.conf && echo key > /mnt/etc/ssh/gaptest_key && "
               "echo log > /mnt/var/log/gaptest.log && echo home > /mnt/home/gaptest")
    # names a user's tools may write: a line break, a quote and ${ (issue #22's day-two fixes)
    livevm.run("cat > \"$(printf '/mnt/etc/new\\nline')\"", input="x")
    livevm.run("cat > '/mnt/etc/${builtins.abort \"x\"}'", input="x")
    gaps, output = run_over_ssh(run_pyinfra, ["gaps.py", "--data", deploy_args(livevm)[2]])
    assert gaps.returncode == 0 and grand_total(output)[1] == "-", output[-4000:]
    report = gap_report(output)
    assert report[0].startswith("gaps: what the ephemeral root of the system at /mnt holds since the last boot "
                                "(btrfs @root against @root-blank on /dev/mapper/cryptroot)"), report
    assert lost_paths(report) == ['/etc/${builtins.abort', "/etc/gaptest.conf", "/etc/new\\nline", "/var/lib/gaptest/"], report
    assert '    persist_directories: ["/var/lib/gaptest"]' in report
    # the suggestion is JSON a user pastes into --data tabula_vars: it gives back the exact names
    files = next(line for line in report if line.startswith("    persist_files: "))
    assert json.loads(files.removeprefix("    persist_files: ")) == [
        '/etc/${builtins.abort "x"}', "/etc/gaptest.conf", "/etc/new\nline"], report
    assert ('    environment.persistence."/persist".files = [ "/etc/\\${builtins.abort \\"x\\"}" "/etc/gaptest.conf" '
            '"/etc/new\\nline" ];') in report, report
    livevm.run("rm -r /mnt/var/lib/gaptest /mnt/etc/gaptest.conf /mnt/etc/ssh/gaptest_key /mnt/var/log/gaptest.log "
               "/mnt/home/gaptest /mnt/etc/new?line '/mnt/etc/${builtins.abort \"x\"}'")

    assert_verification_fails_on_drift(livevm)


def assert_verification_fails_on_drift(livevm):
    """The verification command passes on the installed target, says where it looked, and fails
    once the target differs: one line per mismatch, under the layer that found it."""
    data = {"tabula_vars": profile_vars(livevm), "tabula_install": False}
    output = assert_target_verified(livevm, data)
    assert "profile zephyrus-btrfs at /mnt (the live system after the install)" in output
    key = "/mnt/persist/etc/ssh/ssh_host_ed25519_key"
    livevm.run(f"mount -o remount,strictatime /mnt/home && chmod 0644 {key}")
    try:
        result, output = run_verification(livevm, data)
    finally:
        livevm.run(f"mount -o remount,noatime /mnt/home && chmod 0600 {key}")
    assert result.returncode != 0, output[-4000:]
    home = re.search(r"^/mnt/home: options (\S+) lack noatime$", output, re.M)
    assert home and "noatime" not in home.group(1).split(","), output[-4000:]
    assert f"{key}: file 644 root, the profile wants file 600 root" in output.splitlines(), output[-4000:]
    failed = sorted(re.findall(r"^FAILED tests/verify/test_target\.py::test_(\w+)\[", output, re.M))
    assert failed == ["mounts", "persist"], output[-4000:]
    assert "does NOT match the profile" in output


def test_interrupted_run_converges(clean_disks, livevm, target, passphrase_env, run_pyinfra):
    """Only the EFI partition exists (a prefix of the wanted table): the run completes it."""
    disk = nvme_by_id(livevm)
    livevm.run(f"sgdisk -n 1:0:+1G -t 1:ef00 -c 1:EFI {disk} && udevadm settle")
    efi_guid = partitions(livevm)[0]["PART_ENTRY_UUID"]
    first, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-v")
    assert first.returncode == 0, output[-8000:]
    assert_installed_layout(livevm, target)
    assert identities(livevm)["partitions"][0]["PART_ENTRY_UUID"] == efi_guid
    second, output = run_over_ssh(run_pyinfra, deploy_args(livevm), "-vv")
    assert second.returncode == 0, output[-8000:]
    assert_no_changes(output)
    # the run says what it left mounted outside /mnt and how to close the disks (#22): its commands
    # do, where the guide's own `umount -R /mnt; cryptsetup close cryptroot` stops at "still in use"
    said = [line.split("to close the disks after this run: ", 1)[1] for line in output.splitlines()
            if "stays mounted at /run/tabula/btrfs/nixos" in line]
    assert said and set(said) == {"umount -R /mnt; umount /run/tabula/btrfs/nixos; cryptsetup close cryptroot"}, \
        output[-4000:]
    guide_end = livevm.run("umount -R /mnt && cryptsetup close cryptroot", check=False)
    assert guide_end.returncode != 0 and "still in use" in guide_end.stderr, guide_end
    livevm.run(said[0].replace("umount -R /mnt; ", ""))
    assert livevm.run("cryptsetup status cryptroot", check=False).returncode != 0
    assert "/run/tabula" not in livevm.run("cat /proc/mounts").stdout
