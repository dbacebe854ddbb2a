"""Bad input, end to end: ``pyinfra install-target deploy.py`` against the live VM with one thing
wrong per case. Every case must be refused before any state-changing command runs (pyinfra -vv
echoes every executed command), with a message naming the field or device and what to do, a
non-zero exit, and every target disk unchanged where data lives (tests/e2e/faults.disk_checksums:
the GPT areas, every partition's first and last MiB). Every case starts from the blank state.

The unit tests (tests/unit/test_profile.py) cover the model's validation in depth; this matrix
proves the refusals reach the user through the real entry point, against real disks.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from operations.profile import PROFILE_DIR
from tests.e2e import states
from tests.e2e.faults import disk_checksums, run_with_fault, strip_ansi
from tests.e2e.faults import changing_commands
from tests.e2e.helpers import executed_commands
from tests.unit.vm_vars import TEST_AUTHORIZED_KEY

SERIALS = ("TABULA-NVME0", "TABULA-RZ1", "TABULA-RZ2", "TABULA-RZ3", "TABULA-SSD")
PASSPHRASE = "tabula bad-input passphrase 3d9a"
ZFS_KEY = "tabula bad-input zfs key 77b1"


def by_id(livevm, serial: str) -> str:
    return livevm.stable_path(serial)


def by_path(livevm, serial: str) -> str:
    """Another stable path (by-path) to the same disk."""
    device = livevm.disk_by_serial(serial)
    out = livevm.run(f"for l in /dev/disk/by-path/*; do [ \"$(readlink -f $l)\" = {device} ] && echo $l; done; true").stdout
    return out.split()[0]


def btrfs_vars(livevm) -> dict:
    return {"disk": by_id(livevm, "TABULA-NVME0"), "swap_size": "256M",
            "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000}


def zfs_vars(livevm) -> dict:
    return {"hostname": "tabula-bad", "ssd": by_id(livevm, "TABULA-SSD"), "rz1": by_id(livevm, "TABULA-RZ1"),
            "rz2": by_id(livevm, "TABULA-RZ2"), "rz3": by_id(livevm, "TABULA-RZ3"),
            "authorized_keys": [TEST_AUTHORIZED_KEY]}


def edited_profile(tmp_path: Path, name: str, edit: Callable[[dict], None]) -> str:
    """A copy of a shipped profile with one edit, outside the repository."""
    data = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
    edit(data)
    path = tmp_path / f"{name}-edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def subvolumes(data: dict) -> list[dict]:
    return data["disks"]["main"]["partitions"][1]["content"]["content"]["subvolumes"]


def root_disk_by_path(livevm) -> str:
    # the live image is a file system on the whole disk (no partition) or on a partition of it
    disk = livevm.run("s=$(findmnt -no SOURCE /); p=$(lsblk -ndo PKNAME $s); "
                      "if [ -n \"$p\" ]; then echo /dev/$p; else readlink -f $s; fi").stdout.strip()
    out = livevm.run(f"for l in /dev/disk/by-path/* /dev/disk/by-id/*; do [ \"$(readlink -f $l)\" = {disk} ] "
                     "&& echo $l; done; true").stdout.split()
    assert out, f"the live system's disk {disk} has no stable path"
    return out[0]


@dataclass
class Case:
    id: str
    expect: str                                   # regex the refusal must match (field/device + advice)
    profile: str = "zephyrus-btrfs"
    variables: Callable | None = None            # (livevm) -> dict, default: the profile's test vars
    edit: Callable | None = None                  # (data) -> None: a profile edit
    data: dict = field(default_factory=dict)      # extra --data
    env: dict = field(default_factory=dict)       # controller environment (None: unset)
    prepare: Callable | None = None               # (livevm) -> None: state in the guest before the run (undone by
                                                  # putting the blank state back after the case)


def vars_with(**extra):
    def make(livevm):
        return {**btrfs_vars(livevm), **{k: (v(livevm) if callable(v) else v) for k, v in extra.items()}}
    return make


def zvars_with(**extra):
    def make(livevm):
        return {**zfs_vars(livevm), **{k: (v(livevm) if callable(v) else v) for k, v in extra.items()}}
    return make


def without(key):
    def make(livevm):
        values = btrfs_vars(livevm)
        values.pop(key)
        return values
    return make


def nvme_ext4_mounted(livevm):
    disk = livevm.disk_by_serial("TABULA-NVME0")
    livevm.run(f"sgdisk -n 1:0:+64M -c 1:scratch {disk} >/dev/null && udevadm settle && "
               f"mkfs.ext4 -q /dev/disk/by-partlabel/scratch && mkdir -p /srv/scratch && "
               "mount /dev/disk/by-partlabel/scratch /srv/scratch")


def nvme_whole_disk_ext4(livevm):
    livevm.run(f"mkfs.ext4 -q -F -L family-photos {livevm.disk_by_serial('TABULA-NVME0')}")


def nvme_luks_vault(livevm):
    """A LUKS2 container labelled 'vault' in a partition of the NVMe (somebody's encrypted data)."""
    livevm.run(f"sgdisk -n 1:0:+64M -c 1:vault {livevm.disk_by_serial('TABULA-NVME0')} >/dev/null && udevadm settle && "
               "cryptsetup luksFormat -q --type luks2 --label vault --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "
               "/dev/disk/by-partlabel/vault - && udevadm settle", input="vault passphrase")


def nvme_exported_pool_member(livevm):
    """A partition of the NVMe that is the only member of an exported pool 'tank'."""
    livevm.run(f"sgdisk -n 1:0:+128M -c 1:tank-member {livevm.disk_by_serial('TABULA-NVME0')} >/dev/null && "
               "udevadm settle && modprobe zfs && zpool create -o cachefile=none tank /dev/disk/by-partlabel/tank-member && "
               "zpool export tank && udevadm settle")


def ssd_has_cryptroot_label(livevm):
    livevm.run(f"sgdisk -n 1:0:+64M -c 1:cryptroot {livevm.disk_by_serial('TABULA-SSD')} >/dev/null && udevadm settle")


def nvme_partition(livevm):
    livevm.run(f"sgdisk -n 1:0:+64M -c 1:scratch {livevm.disk_by_serial('TABULA-NVME0')} >/dev/null && udevadm settle")


def nvme_part1_by_id(livevm):
    return by_id(livevm, "TABULA-NVME0") + "-part1"


def installer_tools_aside(livevm):
    """A live system that is not the NixOS installer: no nixos-install, no cryptsetup."""
    livevm.run("mv /usr/local/bin/nixos-install /usr/local/bin/nixos-install.aside && "
               "mv /usr/sbin/cryptsetup /usr/sbin/cryptsetup.aside")


def tpm_switched_off(livevm):
    """The TPM's driver unbound: the guest has no TPM device, as with a TPM off in the firmware."""
    livevm.run("d=$(readlink -f /sys/class/tpm/tpm0/device); echo ${d##*/} > $d/driver/unbind; udevadm settle; "
               "! ls /dev/tpmrm* 2>/dev/null")


def without_swapfile(data):
    for subvolume in subvolumes(data):
        subvolume.pop("swapfile", None)


def passphrase_file(mode: int, content: str = PASSPHRASE + "\n") -> str:
    path = Path(f"/tmp/tabula-bad-input-passphrase-{mode:o}")
    path.write_text(content)
    path.chmod(mode)
    return str(path)


CASES = [
    Case("unknown-profile", r"unknown profile 'zephyrus-btrfz'.*tabula_profile.*available", profile="zephyrus-btrfz"),
    Case("no-profile", r"tabula_profile: no profile selected", profile=""),
    Case("misspelled-key", r"disks\.main\.partitions\.0\.sise: unknown key \(misspelled\?\)",
         edit=lambda d: d["disks"]["main"]["partitions"][0].__setitem__("sise", "1GiB")),
    Case("unknown-var", r"tabula_vars: unknown variable\(s\) \['dsik'\]",
         variables=lambda vm: {**btrfs_vars(vm), "dsik": "/dev/disk/by-id/x"}),
    Case("missing-required-var", r"variable 'disk' has no value.*tabula_vars\['disk'\]", variables=without("disk")),
    Case("wrong-type", r"pbkdf_iterations.*(integer|int)", variables=vars_with(luks_pbkdf_iterations="lots")),
    Case("bad-size-string", r"swap.*bad size '32 gigs'.*512M", variables=vars_with(swap_size="32 gigs")),
    Case("raidz1-two-disks", r"raidz1 needs at least 3 members, got 2", profile="zfs-raidz1",
         edit=lambda d: d["pools"]["rpool"]["vdevs"][0]["members"].pop()),
    Case("headless-without-ssh-key", r"nixos: nobody could log in to this headless machine after the install: "
         r"no SSH key and SSH password login is off.*tabula_vars\['authorized_keys'\]", profile="zfs-raidz1",
         variables=lambda vm: {k: v for k, v in zfs_vars(vm).items() if k != "authorized_keys"}),
    Case("invalid-hostname", r"hostname.*invalid host name 'Bad_Host!'", profile="zfs-raidz1",
         variables=zvars_with(hostname="Bad_Host!")),
    Case("invalid-subvolume-name", r"subvolumes\.1\.path.*invalid subvolume name '@nix/store'",
         edit=lambda d: subvolumes(d)[1].__setitem__("path", "@nix/store")),
    Case("invalid-dataset-name", r"datasets\.\d+\.name.*invalid dataset name 'local/bad name'", profile="zfs-raidz1",
         edit=lambda d: d["pools"]["rpool"]["datasets"][4].__setitem__("name", "local/bad name")),
    Case("overlapping-mountpoints", r"mount points used twice \(overlapping mounts\).*'/home'",
         edit=lambda d: subvolumes(d)[4].__setitem__("mountpoint", "/home")),
    Case("unstable-disk-path", r"'/dev/nvme0n1' is not a stable disk path.*by-id", variables=vars_with(disk="/dev/nvme0n1")),
    Case("wrong-install-type", r"tabula_install: must be true or false", data={"tabula_install": '"yes"'}),
    Case("disk-absent", r"disks\.main\.device: /dev/disk/by-id/nvme-ABSENT does not exist.*present by id",
         variables=vars_with(disk="/dev/disk/by-id/nvme-ABSENT")),
    Case("disk-smaller-than-declared", r"disks\.main\.size: .* less than the declared 64G",
         variables=vars_with(disk_size="64G")),
    Case("serial-mismatch", r"disks\.main\.serial: .*serial 'TABULA-NVME0', the profile declares 'S7KGNU0X123456'",
         variables=vars_with(disk_serial="S7KGNU0X123456")),
    Case("disk-is-a-partition", r"disks\.main\.device: .*-part1 is /dev/\S+, which is not a whole disk",
         variables=vars_with(disk=nvme_part1_by_id), prepare=nvme_partition),
    Case("same-disk-twice", r"disks\.raidz2\.device and disks\.raidz1\.device are the same disk", profile="zfs-raidz1",
         variables=zvars_with(rz2=lambda vm: by_path(vm, "TABULA-RZ1"))),
    Case("partlabel-clash", r"partlabel 'cryptroot' of the profile is already used by /dev/\S+.*Rename",
         prepare=ssd_has_cryptroot_label),
    Case("target-disk-mounted", r"disks\.main\.device: refusing .* in use.*mounted at /srv/scratch",
         prepare=nvme_ext4_mounted),
    Case("target-holds-running-system", r"disks\.main\.device: refusing .*holds the running system",
         variables=vars_with(disk=root_disk_by_path)),
    # what was found is named as a person knows it: type, label, UUID, size; a LUKS header's UUID
    # and label; a pool member's pool, id and state
    Case("foreign-content-unconfirmed", r"disks\.main\.device: refusing .*a whole-disk ext4 filesystem labelled "
         r"'family-photos', UUID [0-9a-f-]{36}, 16\.0 GiB.*tabula_confirm_wipe", prepare=nvme_whole_disk_ext4),
    Case("foreign-luks-unconfirmed", r"disks\.main\.device: refusing .*What is on it:.*\(partlabel 'vault'\): "
         r"LUKS2 header UUID [0-9a-f-]{36}, label 'vault', 64\.0 MiB.*tabula_confirm_wipe", prepare=nvme_luks_vault),
    Case("foreign-pool-member-unconfirmed", r"disks\.main\.device: refusing .*\(partlabel 'tank-member'\): member "
         r"of ZFS pool 'tank' \(pool id \d+, ONLINE, exported: importable\), 128\.0 MiB.*tabula_confirm_wipe",
         prepare=nvme_exported_pool_member),
    Case("target-lacks-installer-tools", r"lacks what this profile's stages need, so nothing was touched:\s+"
         r"cryptsetup \(for LUKS container cryptroot\)\s+nixos-install \(for the install \(tabula_install\)\).*NixOS installer",
         data={"tabula_install": "true"}, prepare=installer_tools_aside),
    # hibernation and the TPM2 token (issue #25): the profile's own refusals, and the target's
    Case("hibernate-without-swap", r"nixos\.hibernate \(tabula_vars\['hibernate'\]\): the profile has no swap to "
         r"hibernate to \(a btrfs swapfile or a swap partition\); add one or set it to false", edit=without_swapfile),
    Case("hibernate-with-random-key-swap", r"nixos\.hibernate \(tabula_vars\['hibernate'\]\) with swap on \S+ encrypted "
         r"with a new random key at every boot \(tabula_vars\['swap_random_encryption'\]\).*set one of the two to false",
         profile="zfs-raidz1", variables=zvars_with(hibernate=True)),
    Case("tpm2-pcr-that-does-not-exist", r"tpm2_pcrs.*PCRs \[24\] do not exist: a TPM 2\.0 has PCRs 0 to 23",
         variables=vars_with(tpm2_unlock=True, tpm2_pcrs=[7, 24])),
    Case("tpm2-on-luks1", r"tpm2_unlock \(tabula_vars\['tpm2_unlock'\]\) needs a LUKS2 container, this one is luks1",
         variables=vars_with(tpm2_unlock=True),
         edit=lambda d: d["disks"]["main"]["partitions"][1]["content"].__setitem__("luks_type", "luks1")),
    Case("tpm2-without-a-tpm", r"cannot take this profile as it is, so nothing was touched:\s+tpm2_unlock "
         r"\(tabula_vars\['tpm2_unlock'\]\) for cryptroot: install-target has no TPM 2\.0 \(no /dev/tpmrm\* device",
         variables=vars_with(tpm2_unlock=True), prepare=tpm_switched_off),
    Case("passphrase-missing", r"no luks passphrase: set TABULA_LUKS_PASSPHRASE or TABULA_LUKS_PASSPHRASE_FILE",
         env={"TABULA_LUKS_PASSPHRASE": None}),
    Case("passphrase-file-unreadable", r"TABULA_LUKS_PASSPHRASE_FILE=/nonexistent/passphrase: cannot read the file",
         env={"TABULA_LUKS_PASSPHRASE": None, "TABULA_LUKS_PASSPHRASE_FILE": "/nonexistent/passphrase"}),
    Case("passphrase-file-world-readable", r"TABULA_LUKS_PASSPHRASE_FILE=\S+: the file is readable by others.*chmod 600",
         env={"TABULA_LUKS_PASSPHRASE": None, "TABULA_LUKS_PASSPHRASE_FILE": lambda: passphrase_file(0o644)}),
    Case("passphrase-with-line-break", r"LUKS passphrase from \$TABULA_LUKS_PASSPHRASE has a line break",
         env={"TABULA_LUKS_PASSPHRASE": "two\nlines"}),
    Case("zfs-key-missing", r"no zfs key: set TABULA_ZFS_KEY or TABULA_ZFS_KEY_FILE", profile="zfs-raidz1",
         env={"TABULA_ZFS_KEY": None}),
    Case("plaintext-password", r"TABULA_ROOT_PASSWORD_HASH: not a password hash.*mkpasswd",
         env={"TABULA_ROOT_PASSWORD_HASH": "hunter2-plaintext"}),
]


@pytest.fixture(scope="module")
def blank_sums(livevm):
    """The target disks' digests in the blank state, which every case starts from: a case that
    prepares something puts the blank state back after it, and every other case is refused with
    the disks unchanged (asserted), so its "before" is this."""
    states.blank(livevm)
    return disk_checksums(livevm, SERIALS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_before_any_change(case: Case, livevm, blank_sums, tmp_path):
    if case.prepare:
        case.prepare(livevm)
    try:
        profile = edited_profile(tmp_path, case.profile, case.edit) if case.edit else case.profile
        if case.variables:
            variables = case.variables(livevm)
        else:
            variables = btrfs_vars(livevm) if case.profile != "zfs-raidz1" else zfs_vars(livevm)
        args = ["-vv", "--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}"]
        for key, value in {"tabula_install": "false", "tabula_export_pools": "false", **case.data}.items():
            args += ["--data", f"{key}={value}"]
        env = {"TABULA_LUKS_PASSPHRASE": PASSPHRASE, "TABULA_ZFS_KEY": ZFS_KEY,
               "TABULA_LUKS_PASSPHRASE_FILE": None, "TABULA_ZFS_KEY_FILE": None,
               "TABULA_ROOT_PASSWORD_HASH": None, "TABULA_USER_PASSWORD_HASH": None,
               "TABULA_ROOT_PASSWORD_HASH_FILE": None, "TABULA_USER_PASSWORD_HASH_FILE": None}
        env.update({k: (v() if callable(v) else v) for k, v in case.env.items()})
        before = disk_checksums(livevm, SERIALS) if case.prepare else blank_sums
        result = run_with_fault(livevm, [*args, "deploy.py"], None, env=env, timeout=600)
        output = strip_ansi(result.output)
        after = disk_checksums(livevm, SERIALS)

        assert result.returncode != 0, f"{case.id}: accepted:\n{output[-4000:]}"
        assert re.search(case.expect, output, re.S), f"{case.id}: message does not match {case.expect!r}:\n{output[-4000:]}"
        changing = changing_commands(output)
        assert changing == [], f"{case.id}: state-changing commands ran: {changing}"
        assert "Beginning operation run" not in output, f"{case.id}: pyinfra started executing operations"
        assert after == before, f"{case.id}: a target disk changed"
        for secret in (PASSPHRASE, ZFS_KEY):
            assert secret not in output
        # a refusal caught at the pyinfra/SSH level must still have been a real run: it reached the target
        if case.prepare or "disks." in case.expect or "partlabel" in case.expect:
            assert executed_commands(output), f"{case.id}: no fact ran on the target"
    finally:
        if case.prepare:
            states.blank(livevm)      # (whatever it prepared, mounted or moved aside: all put back)


def test_adopt_describes_and_refuses_a_plain_ext4_root(clean_disks, livevm, run_pyinfra, tmp_path):
    """adopt.py on a machine whose root is a plain ext4 (nothing rolls it back at boot): the root
    is named with its device and why, and no profile is written, even partial (#22)."""
    from tests.e2e.test_adopt import adopt

    disk = livevm.disk_by_serial("TABULA-SSD")
    livevm.run(f"sgdisk -n 1:0:+256M -t 1:ef00 -c 1:ESP -n 2:0:0 -t 2:8300 -c 2:root {disk} && udevadm settle && "
               "mkfs.vfat -F 32 /dev/disk/by-partlabel/ESP >/dev/null && mkfs.ext4 -q -L nixos /dev/disk/by-partlabel/root && "
               "mount /dev/disk/by-partlabel/root /mnt && mkdir -p /mnt/boot && mount /dev/disk/by-partlabel/ESP /mnt/boot")
    root = livevm.run("readlink -f /dev/disk/by-partlabel/root").stdout.strip()
    try:
        destination = tmp_path / "adopted.yaml"
        result, output = adopt(livevm, run_pyinfra, destination, "--data", "tabula_adopt_partial=true")
    finally:
        livevm.run("umount -R /mnt")
    assert result.returncode != 0 and not destination.exists()
    said = re.findall(r"^\s*(/dev/\S+: .*)$", output, re.M)
    assert f"{root}: a plain ext4 root: nothing rolls it back at boot (an ephemeral root is a tmpfs, a btrfs " \
           "subvolume with a blank snapshot or a ZFS dataset with @empty)" in said, output[-3000:]
