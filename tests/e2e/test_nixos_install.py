"""The zephyrus-btrfs profile end to end in the live VM, up to nixos-install.

nixos-generate-config is the REAL one (nixpkgs 24.05's script from the offline Nix kit, installed in
the guest's /usr/local/bin by the livevm fixture): it detects the VM's hardware and the mounts under
/mnt, and Tabula patches its storage. nixos-install is a TEST STAND-IN (tools/guest/standins/): the
Debian live VM has no Nix to build with. It records its argv to /var/log/tabula-standins/
nixos-install.log and checks what the real tool needs. Everything else (UUIDs, files, modes, keys)
is real.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from operations.nixos import INSTALL_STAMP
from operations.profile import load_profile
from tests.nix.evaluation import evaluate_installed
from tests.e2e.helpers import (SHOW_HARDWARE_CONFIG, assert_generated_by_real_tool_and_patched, assert_no_changes,
                               grand_total, operation_commands, run_with_secrets)

HOST = "tabula-g16"
USER = "sean"
PASSPHRASE = "tabula nixos e2e passphrase 3a9d"
# Test-only crypt hashes (mkpasswd -m sha-512 of throw-away passwords).
ROOT_HASH = "$6$Qm1ZcW0d2v3ZkA$" + "r" * 86
USER_HASH = "$6$Xk2bL9pT4sQ1nB$" + "u" * 86
STANDIN_LOG = "/var/log/tabula-standins"
GENERATE = "nixos-generate-config --root /mnt"


def nvme_by_id(livevm) -> str:
    return livevm.stable_path("TABULA-NVME0")


def profile_vars(livevm, **extra_vars) -> dict:
    return {"disk": nvme_by_id(livevm), "hostname": HOST, "swap_size": "256M",
            "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000, **extra_vars}


def deploy_args(livevm, install=True, **extra_vars) -> list[str]:
    data = profile_vars(livevm, **extra_vars)
    return ["deploy.py", "--data", "tabula_profile=zephyrus-btrfs", "--data", f"tabula_vars={json.dumps(data)}",
            "--data", f"tabula_install={json.dumps(install)}"]


@pytest.fixture
def secrets_env(monkeypatch):
    monkeypatch.setenv("TABULA_LUKS_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("TABULA_ROOT_PASSWORD_HASH", ROOT_HASH)
    monkeypatch.setenv("TABULA_USER_PASSWORD_HASH", USER_HASH)
    for name in ("LUKS_PASSPHRASE", "ROOT_PASSWORD_HASH", "USER_PASSWORD_HASH"):
        monkeypatch.delenv(f"TABULA_{name}_FILE", raising=False)


SECRETS = {"TABULA_LUKS_PASSPHRASE": PASSPHRASE, "TABULA_ROOT_PASSWORD_HASH": ROOT_HASH,
           "TABULA_USER_PASSWORD_HASH": USER_HASH}


def run(run_pyinfra, args, *flags, secrets=SECRETS):
    """pyinfra with these secrets: (result, output), no secret in the output or in argv."""
    return run_with_secrets(run_pyinfra, args, secrets, *flags)


def guest(livevm, command: str) -> str:
    return livevm.run(command).stdout


def seeded_state(livevm) -> dict:
    """What a re-run must not replace."""
    return {
        "keys": guest(livevm, "sha256sum /mnt/persist/etc/ssh/ssh_host_*"),
        "machine_id": guest(livevm, "cat /mnt/persist/etc/machine-id"),
        "secrets": guest(livevm, "stat -c '%n %i %Y' /mnt/persist/secrets/*"),
        "config": guest(livevm, "cd /mnt/etc/nixos && sha256sum *"),
    }


def test_full_deploy_installs_once_and_converges(clean_disks, livevm, target, secrets_env, run_pyinfra, tmp_path):
    livevm.run(f"rm -rf {STANDIN_LOG}")
    first, output = run(run_pyinfra, deploy_args(livevm), "-vv")
    assert first.returncode == 0, output[-8000:]
    assert grand_total(output)[1] != "-"
    # nixos-install's output was streamed to the user (the stand-in prints these lines)
    assert "stand-in: building the flake..." in output and "installation finished!" in output

    # --- nixos-generate-config ran once; the nixos-install stand-in got the right arguments, once
    assert sum(command.count(GENERATE) for command in operation_commands(output)) == 1
    assert guest(livevm, f"cat {STANDIN_LOG}/nixos-install.log") == \
        f"nixos-install --root /mnt --flake /mnt/etc/nixos#{HOST} --no-root-passwd\n"
    assert target.file("/mnt/nix/var/nix/profiles/system").is_symlink

    # --- /mnt/etc/nixos holds the target's real UUIDs
    luks_uuid = guest(livevm, "cryptsetup luksUUID /dev/disk/by-partlabel/cryptroot").strip()
    efi_uuid = guest(livevm, "blkid -o value -s UUID /dev/disk/by-partlabel/EFI").strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", luks_uuid) and re.fullmatch(r"[0-9A-F]{4}-[0-9A-F]{4}", efi_uuid)
    hardware = target.file("/mnt/etc/nixos/hardware-configuration.nix").content_string
    assert f'boot.initrd.luks.devices."cryptroot" = {{\n    device = "/dev/disk/by-uuid/{luks_uuid}";\n' \
           "    allowDiscards = true;\n    bypassWorkqueues = true;\n  };" in hardware
    assert f'fileSystems."/boot" = {{\n    device = "/dev/disk/by-uuid/{efi_uuid}";\n    fsType = "vfat";\n' \
           '    options = [ "fmask=0022" "dmask=0022" ];\n  };' in hardware
    assert '    options = [ "subvol=@persist" "compress=zstd" "noatime" "discard=async" ];\n    neededForBoot = true;' in hardware
    assert 'swapDevices = [\n    { device = "/swap/swapfile"; size = 256; }\n  ];' in hardware
    # the real tool's file: its header and hardware detection kept, its storage replaced by Tabula's
    profile = load_profile("zephyrus-btrfs", profile_vars(livevm))
    assert_generated_by_real_tool_and_patched(hardware, profile, efi_uuid, guest(livevm, SHOW_HARDWARE_CONFIG))
    for interface in set(guest(livevm, "ls /sys/class/net").split()) - {"lo"}:
        assert f"  # networking.interfaces.{interface}.useDHCP = lib.mkDefault true;\n" in hardware
    # the real tool named the btrfs by its filesystem UUID; Tabula by the LUKS mapping
    btrfs_uuid = guest(livevm, "blkid -o value -s UUID /dev/mapper/cryptroot").strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", btrfs_uuid) and btrfs_uuid not in hardware
    # the real tool's configuration.nix (it writes one) was replaced by the profile's
    assert "Did you read the comment?" not in target.file("/mnt/etc/nixos/configuration.nix").content_string
    flake = target.file("/mnt/etc/nixos/flake.nix").content_string
    assert f"nixosConfigurations.{HOST} = nixpkgs.lib.nixosSystem" in flake
    assert "nixos-hardware.nixosModules.asus-zephyrus-gu605my" in flake  # the VM's DMI names no known model
    assert f'networking.hostName = "{HOST}";' in target.file("/mnt/etc/nixos/configuration.nix").content_string
    # every file parses (nix-instantiate on the controller: the guest has no Nix)
    names = guest(livevm, "ls /mnt/etc/nixos").split()
    assert set(names) == {"configuration.nix", "flake.nix", "flake.lock", "hardware-configuration.nix",
                          "impermanence.nix", "zephyrus-extra.nix"}   # flake.lock: nixos-install's
    for name in set(names) - {"flake.lock"}:
        path = tmp_path / name
        path.write_text(target.file(f"/mnt/etc/nixos/{name}").content_string)
        parsed = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{name}: {parsed.stderr}"
    # ... and the whole configuration evaluates against real nixpkgs, as nixos-install will
    # evaluate it, with the target's real UUIDs in the evaluated options
    evaluated = evaluate_installed(lambda command: guest(livevm, command), tmp_path / "evaluated", profile)
    assert f"-nixos-system-{HOST}-" in evaluated["drvPath"]
    assert evaluated["luks"]["cryptroot"]["device"] == f"/dev/disk/by-uuid/{luks_uuid}"
    assert evaluated["fileSystems"]["/boot"]["device"] == f"/dev/disk/by-uuid/{efi_uuid}"
    assert evaluated["fileSystems"]["/persist"]["neededForBoot"] is True
    assert set(evaluated["initrdServices"]["rollback"]["after"]) == {"systemd-cryptsetup@cryptroot.service",
                                                                   "dev-mapper-cryptroot.device",
                                                                   "systemd-hibernate-resume.service"}
    # hibernation (the profile's default): the evaluated kernel resumes from the real swapfile
    offset = guest(livevm, "btrfs inspect-internal map-swapfile -r /mnt/swap/swapfile")
    assert evaluated["resumeDevice"] == "/dev/mapper/cryptroot"
    assert sorted(p for p in evaluated["kernelParams"] if p.startswith("resume")) == [
        "resume=/dev/mapper/cryptroot", f"resume_offset={int(offset)}"], evaluated["kernelParams"]

    # --- /persist seeded: secrets, host keys, machine-id, config copy
    secrets = target.file("/mnt/persist/secrets")
    assert secrets.is_directory and secrets.mode == 0o700 and secrets.user == "root"
    for name, value in (("root-password", ROOT_HASH), (f"{USER}-password", USER_HASH)):
        f = target.file(f"/mnt/persist/secrets/{name}")
        assert f.mode == 0o600 and f.user == "root"
        assert f.content_string == value + "\n"
    ed = guest(livevm, "ssh-keygen -l -f /mnt/persist/etc/ssh/ssh_host_ed25519_key.pub")
    rsa = guest(livevm, "ssh-keygen -l -f /mnt/persist/etc/ssh/ssh_host_rsa_key.pub")
    assert ed.startswith("256 ") and "(ED25519)" in ed and f"root@{HOST}" in ed
    assert rsa.startswith("4096 ") and "(RSA)" in rsa
    for key in ("ed25519", "rsa"):
        assert target.file(f"/mnt/persist/etc/ssh/ssh_host_{key}_key").mode == 0o600
    assert re.fullmatch(r"[0-9a-f]{32}\n", target.file("/mnt/persist/etc/machine-id").content_string)
    assert guest(livevm, "cd /mnt/etc/nixos && sha256sum *") == guest(livevm, "cd /mnt/persist/etc/nixos && sha256sum *")
    stamp = target.file(INSTALL_STAMP).content_string.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", stamp)

    # --- no secret in the guest's logs or the pushed tree
    leaked = livevm.run(f"grep -rlF -e '{ROOT_HASH}' -e '{USER_HASH}' /var/log /tmp /root /mnt/etc 2>/dev/null || true").stdout
    assert leaked == ""

    # --- a second run changes nothing and does not install again
    before = seeded_state(livevm)
    second, output = run(run_pyinfra, deploy_args(livevm), "-vv")
    assert second.returncode == 0, output[-8000:]
    assert_no_changes(output)
    assert "is already installed from the current /mnt/etc/nixos" in output or "already installed" in output
    assert guest(livevm, f"cat {STANDIN_LOG}/nixos-install.log").count("\n") == 1
    assert not any(GENERATE in command for command in operation_commands(output))  # not generated again
    assert seeded_state(livevm) == before

    # --- a local edit is put back (the profile is the source): nothing to install again
    livevm.run("echo '# local edit' >> /mnt/etc/nixos/configuration.nix")
    third, output = run(run_pyinfra, deploy_args(livevm), "-vv")
    assert third.returncode == 0, output[-8000:]
    assert guest(livevm, f"cat {STANDIN_LOG}/nixos-install.log").count("\n") == 1
    assert seeded_state(livevm) == before

    # --- a changed profile value is installed again; keys, hashes and machine-id stay
    fourth, output = run(run_pyinfra, deploy_args(livevm, timezone="Europe/Berlin"), "-vv")
    assert fourth.returncode == 0, output[-8000:]
    assert 'time.timeZone = "Europe/Berlin";' in target.file("/mnt/etc/nixos/configuration.nix").content_string
    assert guest(livevm, f"cat {STANDIN_LOG}/nixos-install.log").count("\n") == 2
    after = seeded_state(livevm)
    for key in ("keys", "machine_id", "secrets"):
        assert after[key] == before[key], key
    assert guest(livevm, "cd /mnt/etc/nixos && sha256sum *") == guest(livevm, "cd /mnt/persist/etc/nixos && sha256sum *")


FAIL_KNOB = "/run/tabula-standins/nixos-install.fail"


def test_a_failed_install_leaves_no_stamp_and_is_retried(installed, livevm, run_pyinfra):
    """nixos-install fails half-way through copying the closure (the stand-in's fail knob: as a
    failed build or a full disk): the run fails, the stamp still names the configuration installed
    before, and the next run installs again and stamps the new one; a run after that changes nothing."""
    state = installed("zephyrus-btrfs")
    digest = ('cd /mnt/etc/nixos && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum '
              '| sha256sum | cut -d" " -f1')
    stamp_before = guest(livevm, f"cat {INSTALL_STAMP}").strip()
    assert stamp_before == guest(livevm, digest).strip()
    installs = int(guest(livevm, f"wc -l < {STANDIN_LOG}/nixos-install.log").strip())
    changed = {**state.variables, "timezone": "Europe/Lisbon"}

    livevm.run(f"mkdir -p $(dirname {FAIL_KNOB}) && touch {FAIL_KNOB}")
    failed, output = run(run_pyinfra, state.args("-vv", tabula_vars=changed), secrets=state.secrets)
    assert failed.returncode != 0, output[-6000:]
    assert "failed with exit code 1" in output
    assert int(guest(livevm, f"wc -l < {STANDIN_LOG}/nixos-install.log").strip()) == installs + 1
    assert guest(livevm, f"cat {INSTALL_STAMP}").strip() == stamp_before          # no stamp of the new config
    assert guest(livevm, digest).strip() != stamp_before                           # (which is in /mnt/etc/nixos)
    assert guest(livevm, "ls /mnt/nix/store | grep -c standin-part").strip() != "0"   # a half-copied closure

    retried, output = run(run_pyinfra, state.args("-vv", tabula_vars=changed), secrets=state.secrets)
    assert retried.returncode == 0, output[-6000:]
    assert int(guest(livevm, f"wc -l < {STANDIN_LOG}/nixos-install.log").strip()) == installs + 2
    assert guest(livevm, f"cat {INSTALL_STAMP}").strip() == guest(livevm, digest).strip()
    assert 'time.timeZone = "Europe/Lisbon";' in guest(livevm, "cat /mnt/etc/nixos/configuration.nix")

    again, output = run(run_pyinfra, state.args("-vv", tabula_vars=changed), secrets=state.secrets)
    assert again.returncode == 0, output[-6000:]
    assert_no_changes(output)
