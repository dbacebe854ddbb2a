"""The deploy run as ``pyinfra @local`` on the live system itself (the pushed project, inside the
guest), installing the tmpfs-root profile end to end: the layout the impermanence README sets up
first, a size-bounded tmpfs "/" and LUKS2 + btrfs subvolumes for what is kept, with no blank
snapshot and no rollback. The secrets come from 0600 files in the guest, outside the repository.

Checked on the real devices of the guest: partitions by label and type, the LUKS2 header, the
subvolumes (and no snapshot), the mounts in /proc/mounts with the tmpfs's size= bound, the
persisted state, and the installed configuration copied back and evaluated against the offline
kit's nixpkgs. A second run changes nothing (no operation runs a command), re-creates nothing and
installs nothing again; what was written to /home and /persist stays.

zephyrus-btrfs over SSH: tests/e2e/test_btrfs_profile.py.
"""
from __future__ import annotations

import json
import re
import shlex

from operations.gpt import type_guid
from operations.nixos import INSTALL_STAMP
from operations.profile import load_profile
from tests import profile_cases
from tests.e2e.helpers import (assert_no_changes, assert_target_verified, executed_commands, gap_report, grand_total,
                                lost_paths, run_verification)
from tests.nix.evaluation import evaluate_installed
from tools.livevm import GUEST_SRC, GUEST_VENV

PROFILE = "tmpfs-root"
TEMP_SIZE = "1536M"      # not the profile's default: the bound must come from the var
MiB = 1024**2
# Test-only secrets; they must never show up in output or argv.
PASSPHRASE = "tabula local tmpfs passphrase 5e1b"
ROOT_HASH = "$6$Tr1ZcW0d2v3ZkA$" + "r" * 86
USER_HASH = "$6$Tr2bL9pT4sQ1nB$" + "u" * 86
SECRETS_DIR = "/root/tabula-secrets"
STANDIN_LOG = "/var/log/tabula-standins/nixos-install.log"


def profile_vars(livevm) -> dict:
    return {**profile_cases.vm_vars(PROFILE, livevm.stable_path), "temp_size": TEMP_SIZE}


def run_local(livevm, variables: dict, deploy: str = "deploy.py"):
    """pyinfra @local in the guest, every secret from a 0600 file in a 0700 folder."""
    files = {"LUKS_PASSPHRASE": PASSPHRASE, "ROOT_PASSWORD_HASH": ROOT_HASH, "USER_PASSWORD_HASH": USER_HASH}
    env = []
    for name, value in files.items():
        path = f"{SECRETS_DIR}/{name.lower()}"
        livevm.run(f"umask 077 && mkdir -p {SECRETS_DIR} && cat > {path}", input=value)
        env.append(f"TABULA_{name}_FILE={path}")
    args = ["-vv", "--data", f"tabula_profile={PROFILE}", "--data", f"tabula_vars={json.dumps(variables)}",
            deploy]
    command = f"cd {GUEST_SRC} && {' '.join(env)} {GUEST_VENV}/bin/pyinfra -y @local {shlex.join(args)}"
    result = livevm.run(command, check=False, timeout=1800)
    output = result.stdout + result.stderr
    for secret in files.values():
        assert secret not in output, "a secret leaked into pyinfra's output"
        assert all(secret not in cmd for cmd in executed_commands(output)), "a secret in argv"
    return result, output


def guest(livevm, command: str) -> str:
    return livevm.run(command).stdout


def identities(livevm, profile) -> dict:
    """What would change if anything were re-created or replaced."""
    (_, disk), = profile.disks.items()
    crypted, = [part for part, _ in profile.luks_devices()]
    return {
        "partitions": guest(livevm, f"sgdisk -p {disk.device} | sed -n '/^Number/,$p'"),
        "guids": guest(livevm, "for p in " + " ".join(p.device for p in disk.partitions) +
                       "; do blkid -p -o value -s PART_ENTRY_UUID $p; done"),
        "luks": guest(livevm, f"cryptsetup luksUUID {crypted.device}"),
        "btrfs": guest(livevm, "blkid -p -o value -s UUID /dev/mapper/crypted"),
        "subvolumes": guest(livevm, "btrfs subvolume list -u /mnt/persist | awk '{print $2, $(NF-2), $NF}'"),
        "keys": guest(livevm, "sha256sum /mnt/persist/etc/ssh/ssh_host_* /mnt/persist/etc/machine-id"),
        "secrets": guest(livevm, "stat -c '%n %i %Y' /mnt/persist/secrets/*"),
        "config": guest(livevm, "cd /mnt/etc/nixos && sha256sum *"),
    }


def assert_layout(livevm, target, profile, variables: dict | None = None) -> None:
    """The profile's layout on the real devices: this profile's own checks, and with ``variables``
    the verification command users run (``pytest tests/verify``, over SSH from the controller)."""
    if variables is not None:
        assert_target_verified(livevm, {"tabula_profile": PROFILE, "tabula_vars": variables})
    h = profile.hash
    parts = {}
    for part in (f"boot-{h}", f"crypted-{h}"):
        probe = guest(livevm, f"blkid -p -o export /dev/disk/by-partlabel/{part}")
        parts[part] = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
    assert parts[f"boot-{h}"]["PART_ENTRY_TYPE"] == type_guid("EF00").lower()
    assert parts[f"boot-{h}"]["TYPE"] == "vfat"
    assert int(parts[f"boot-{h}"]["PART_ENTRY_SIZE"]) * 512 == 1024 * MiB
    assert parts[f"crypted-{h}"]["PART_ENTRY_TYPE"] == type_guid("8300").lower()
    assert parts[f"crypted-{h}"]["TYPE"] == "crypto_LUKS" and parts[f"crypted-{h}"]["VERSION"] == "2"
    assert livevm.run(f"cryptsetup isLuks --type luks2 /dev/disk/by-partlabel/crypted-{h}", check=False).returncode == 0
    assert "discards" in guest(livevm, "cryptsetup status crypted")

    # the subvolumes, all top-level, and no snapshot of anything: nothing is rolled back
    listed = guest(livevm, "btrfs subvolume list -u -q /mnt/persist").splitlines()
    assert sorted(line.rsplit(" path ", 1)[1] for line in listed) == ["home", "log", "nix", "persist"]
    assert all(" parent_uuid - " in line for line in listed), listed
    assert guest(livevm, "btrfs subvolume list -r /mnt/persist") == ""

    # /proc/mounts: "/" is a tmpfs bounded by the var, the rest btrfs subvolumes of the LUKS mapping
    mounts = {}
    for line in guest(livevm, "cat /proc/mounts").splitlines():
        device, mountpoint, fstype, options = line.split()[:4]
        mounts[mountpoint] = (device, fstype, options.split(","))
    device, fstype, options = mounts["/mnt"]
    assert fstype == "tmpfs" and "mode=755" in options
    assert f"size={1536 * 1024}k" in options, options
    mapper = {"/dev/mapper/crypted", guest(livevm, "readlink -f /dev/mapper/crypted").strip()}
    for where, subvolume in (("nix", "nix"), ("persist", "persist"), ("var/log", "log"), ("home", "home")):
        device, fstype, options = mounts[f"/mnt/{where}"]
        assert fstype == "btrfs" and device in mapper and f"subvol=/{subvolume}" in options, (where, options)
        assert "noatime" in options and "compress=zstd:3" in options, (where, options)
    assert mounts["/mnt/boot"][1] == "vfat"


def test_local_install_of_tmpfs_root_converges(clean_disks, livevm, target, tmp_path):
    livevm.push_project()
    livevm.run(f"rm -f {STANDIN_LOG}")
    variables = profile_vars(livevm)
    profile = load_profile(PROFILE, variables)
    first, output = run_local(livevm, variables)
    assert first.returncode == 0, output[-8000:]
    assert grand_total(output)[1] != "-"
    assert_layout(livevm, target, profile, variables)

    # installed once, with the profile's host; the persistent root seeded
    host = profile.nixos.hostname
    assert guest(livevm, f"cat {STANDIN_LOG}") == f"nixos-install --root /mnt --flake /mnt/etc/nixos#{host} --no-root-passwd\n"
    assert re.fullmatch(r"[0-9a-f]{64}", target.file(INSTALL_STAMP).content_string.strip())
    secrets = target.file("/mnt/persist/secrets")
    assert secrets.is_directory and secrets.mode == 0o700
    for name, value in (("root-password", ROOT_HASH), (f"{profile.nixos.user}-password", USER_HASH)):
        f = target.file(f"/mnt/persist/secrets/{name}")
        assert f.mode == 0o600 and f.content_string == value + "\n"
    assert "(ED25519)" in guest(livevm, "ssh-keygen -l -f /mnt/persist/etc/ssh/ssh_host_ed25519_key.pub")
    assert re.fullmatch(r"[0-9a-f]{32}\n", target.file("/mnt/persist/etc/machine-id").content_string)
    assert guest(livevm, "cd /mnt/etc/nixos && sha256sum *") == guest(livevm, "cd /mnt/persist/etc/nixos && sha256sum *")
    # nothing of the install is on the tmpfs but /etc/nixos, which the persistent root has a copy of
    on_tmpfs = set(guest(livevm, "find /mnt -xdev -mindepth 1 -maxdepth 1 -printf '%f\\n'").split())
    assert on_tmpfs <= {"boot", "etc", "home", "nix", "persist", "var"}, on_tmpfs

    # the configuration the deploy wrote (real UUIDs, the real nixos-generate-config's output)
    # evaluates; read back from the evaluated options
    evaluated = evaluate_installed(lambda command: guest(livevm, command), tmp_path / "evaluated", profile)
    assert f"-nixos-system-{host}-" in evaluated["drvPath"]
    fs = evaluated["fileSystems"]
    assert fs["/"]["fsType"] == "tmpfs" and f"size={TEMP_SIZE}" in fs["/"]["options"]
    luks_uuid = guest(livevm, f"cryptsetup luksUUID /dev/disk/by-partlabel/crypted-{profile.hash}").strip()
    assert evaluated["luks"]["crypted"]["device"] == f"/dev/disk/by-uuid/{luks_uuid}"
    boot_uuid = guest(livevm, f"blkid -p -o value -s UUID /dev/disk/by-partlabel/boot-{profile.hash}").strip()
    assert fs["/boot"]["device"] == f"/dev/disk/by-uuid/{boot_uuid}"
    for mountpoint, subvolume in (("/nix", "nix"), ("/persist", "persist"), ("/var/log", "log"), ("/home", "home")):
        assert fs[mountpoint]["device"] == "/dev/mapper/crypted" and f"subvol={subvolume}" in fs[mountpoint]["options"]
    assert [m for m in ("/persist", "/nix", "/var/log", "/home") if fs[m]["neededForBoot"]] == ["/persist", "/nix", "/var/log"]
    assert not [name for name in evaluated["initrdServices"] if "rollback" in name]
    assert evaluated["persistence"] == {"/persist": {"directories": ["/etc/nixos", "/etc/ssh", "/var/lib/nixos"],
                                                     "files": ["/etc/machine-id"]}}

    # the second run: no change, no operation's command, nothing re-created, no second install
    before = identities(livevm, profile)
    livevm.run("echo kept-home > /mnt/home/marker && echo kept-persist > /mnt/persist/marker && sync")
    second, output = run_local(livevm, variables)
    assert second.returncode == 0, output[-8000:]
    assert_no_changes(output)
    assert identities(livevm, profile) == before
    assert guest(livevm, f"cat {STANDIN_LOG}").count("\n") == 1
    assert target.file("/mnt/home/marker").content_string == "kept-home\n"
    assert target.file("/mnt/persist/marker").content_string == "kept-persist\n"
    assert_layout(livevm, target, profile)

    # the gap report (gaps.py @local): of what was written since, only what lies on the tmpfs "/"
    # and no persistence keeps is lost, and the report says how to keep it
    livevm.run("mkdir -p /mnt/var/lib/gaptest /mnt/etc/ssh && echo db > /mnt/var/lib/gaptest/db && "
               "echo conf > /mnt/etc/gaptest.conf && echo key > /mnt/etc/ssh/gaptest_key && "
               "echo log > /mnt/var/log/gaptest.log && echo home > /mnt/home/gaptest")
    result, output = run_local(livevm, variables, deploy="gaps.py")
    assert result.returncode == 0 and grand_total(output)[1] == "-", output[-4000:]
    report = gap_report(output)
    assert report[0].startswith("gaps: what the ephemeral root of the system at /mnt holds"), report
    assert lost_paths(report) == ["/etc/gaptest.conf", "/var/lib/gaptest/"], report
    assert '    persist_directories: ["/var/lib/gaptest"]' in report and '    persist_files: ["/etc/gaptest.conf"]' in report
    livevm.run("rm -r /mnt/var/lib/gaptest /mnt/etc/gaptest.conf /mnt/etc/ssh/gaptest_key /mnt/var/log/gaptest.log "
               "/mnt/home/gaptest")

    # drift the checks name (the last use of this install): the tmpfs's bound, no filesystem where
    # /boot's was (unmounted)
    boot = f"/dev/disk/by-partlabel/boot-{profile.hash}"
    livevm.run(f"mount -o remount,size=1G /mnt && umount /mnt/boot && wipefs -q -a {boot}")
    result, report = run_verification(livevm, {"tabula_profile": PROFILE, "tabula_vars": variables})
    assert result.returncode != 0
    failed = sorted(re.findall(r"^FAILED tests/verify/test_target\.py::test_(\w+)\[", report, re.M))
    assert failed == ["filesystems", "mounts", "nixos"], report[-4000:]
    for line in (f"{boot}: filesystem none, the profile wants vfat",
                 f"/mnt/boot: not mounted (the profile mounts vfat {boot} there)",
                 "/mnt: options rw,relatime,size=1048576k,mode=755,inode64 lack size=1536M",
                 f"/mnt/etc/nixos: the profile's files cannot be rendered to compare: {boot}: no UUID yet (the "
                 "device does not exist or has no signature)"):
        assert line in report.splitlines() or f"E   {line}" in report, (line, report[-4000:])
