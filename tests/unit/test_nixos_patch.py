"""hardware-configuration.nix patching on realistic nixos-generate-config outputs."""
import json
import subprocess
from pathlib import Path

import pytest

from operations.nixos import render_storage
from operations.nixpatch import MARKER, NixPatchError, attrpath, module_bindings, parse, patch_hardware_configuration
from operations.profile import load_profile

FIXTURES = Path(__file__).parent / "fixtures" / "nixos"
LUKS_UUID = "0e7d2c55-8a19-4f3b-b6d2-7c1e9a4f5b60"
EFI_UUID = "A1B2-C3D4"


def zephyrus():
    return load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/nvme-Samsung_SSD_990_PRO_4TB_S7X"})


def zephyrus_ids():
    return {
        "/dev/disk/by-partlabel/EFI": {"UUID": EFI_UUID, "PARTUUID": "11111111-2222-3333-4444-555555555555", "TYPE": "vfat"},
        "/dev/disk/by-partlabel/cryptroot": {"UUID": LUKS_UUID, "PARTUUID": "66666666-7777-8888-9999-000000000000", "TYPE": "crypto_LUKS"},
    }


def nix_eval_json(path: Path, expr_suffix: str):
    """Evaluate an attribute of a module file with nix-instantiate (no store, no nixpkgs needed)."""
    expr = f'(import {path} {{ config = {{ hardware.enableRedistributableFirmware = true; }}; lib = {{ mkDefault = x: x; }}; pkgs = {{}}; modulesPath = "/m"; }}){expr_suffix}'
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_zephyrus_patch_replaces_storage_and_keeps_hardware(tmp_path):
    generated = (FIXTURES / "zephyrus-btrfs-luks.nix").read_text()
    patched = patch_hardware_configuration(generated, render_storage(zephyrus(), zephyrus_ids()))

    # hardware detection kept byte for byte
    for line in ('boot.initrd.availableKernelModules = [ "xhci_pci" "thunderbolt" "nvme" "usb_storage" "sd_mod" ];',
                 'boot.kernelModules = [ "kvm-intel" ];',
                 "hardware.cpu.intel.updateMicrocode = lib.mkDefault config.hardware.enableRedistributableFirmware;",
                 '(modulesPath + "/installer/scan/not-detected.nix")'):
        assert line in patched
    # the generated storage is gone: the fs UUID of the btrfs device appears nowhere
    assert "5b1c9e0c-3b7a-4c2e-9d41-0f6f1a2b3c4d" not in patched
    assert patched.count(MARKER) == 1

    path = tmp_path / "hardware-configuration.nix"
    path.write_text(patched)
    subprocess.run(["nix-instantiate", "--parse", str(path)], check=True, capture_output=True)
    fs = nix_eval_json(path, ".fileSystems")
    assert fs["/"] == {"device": "/dev/mapper/cryptroot", "fsType": "btrfs",
                       "options": ["subvol=@root", "compress=zstd", "noatime", "discard=async"]}
    for mountpoint, subvol in (("/nix", "@nix"), ("/home", "@home"), ("/persist", "@persist"), ("/var/log", "@log")):
        assert fs[mountpoint]["options"][0] == f"subvol={subvol}"
        assert fs[mountpoint]["neededForBoot"] is True
    assert fs["/swap"] == {"device": "/dev/mapper/cryptroot", "fsType": "btrfs", "options": ["subvol=@swap", "noatime"]}
    assert fs["/boot"] == {"device": f"/dev/disk/by-uuid/{EFI_UUID}", "fsType": "vfat", "options": ["fmask=0022", "dmask=0022"]}
    assert "neededForBoot" not in fs["/"]
    luks = nix_eval_json(path, '.boot.initrd.luks.devices')
    assert luks == {"cryptroot": {"device": f"/dev/disk/by-uuid/{LUKS_UUID}", "allowDiscards": True, "bypassWorkqueues": True}}
    assert nix_eval_json(path, ".swapDevices") == [{"device": "/swap/swapfile", "size": 32768}]
    assert nix_eval_json(path, ".nixpkgs.hostPlatform") == "x86_64-linux"


@pytest.mark.parametrize("fixture", ["zephyrus-btrfs-luks.nix", "qemu-tmpfs-f2fs-zfs-swap.nix"])
def test_patching_twice_is_byte_identical(fixture):
    storage = render_storage(zephyrus(), zephyrus_ids())
    once = patch_hardware_configuration((FIXTURES / fixture).read_text(), storage)
    twice = patch_hardware_configuration(once, storage)
    assert twice.encode() == once.encode()


def test_light_profile_patch_on_tmpfs_bind_zfs_output(tmp_path):
    profile = load_profile("light-tmpfs-f2fs", {"disk": "/dev/disk/by-id/virtio-TABULA-SSD", "hostname": "light"})
    h = profile.hash
    ids = {
        f"/dev/disk/by-partlabel/boot-{h}": {"UUID": "7E3A-19C2", "PARTUUID": "aaaaaaaa-0000-0000-0000-000000000001"},
        f"/dev/disk/by-partlabel/swap-{h}": {"PARTUUID": "aaaaaaaa-0000-0000-0000-000000000002"},
        f"/dev/disk/by-partlabel/local-{h}": {"UUID": "c9e4d1f0-2a6b-4c8d-b3e5-1f7a9c0d2e4b"},
    }
    generated = (FIXTURES / "qemu-tmpfs-f2fs-zfs-swap.nix").read_text()
    patched = patch_hardware_configuration(generated, render_storage(profile, ids))
    path = tmp_path / "hw.nix"
    path.write_text(patched)
    fs = nix_eval_json(path, ".fileSystems")
    root = next(m for m in profile.all_mounts() if m.mountpoint == "/")
    assert fs["/"] == {"device": "none", "fsType": "tmpfs", "options": list(root.options), "neededForBoot": True}
    assert "mode=755" in fs["/"]["options"]
    nix = next(m for m in profile.all_mounts() if m.mountpoint == "/nix")
    assert fs["/nix"] == {"device": "/.local/nix", "fsType": "none", "options": list(nix.options), "neededForBoot": True}
    assert fs["/nix"]["options"][0] == "bind"
    remote = next(m for m in profile.all_mounts() if m.mountpoint == "/remote")
    assert fs["/remote"]["device"] == remote.device and fs["/remote"]["fsType"] == "zfs"
    assert remote.device.startswith(f"rpool-{h}/")
    assert fs["/.local"]["device"] == f"/dev/mapper/local-{h}"
    # the generated swap partition by UUID is replaced by the random-encryption swap by PARTUUID
    assert nix_eval_json(path, ".swapDevices") == [
        {"device": "/dev/disk/by-partuuid/aaaaaaaa-0000-0000-0000-000000000002", "randomEncryption": {"enable": True}}]
    assert nix_eval_json(path, ".boot.initrd.kernelModules") == ["dm-snapshot"]
    assert set(nix_eval_json(path, ".boot.initrd.luks.devices")) == {f"local-{h}"}


def test_patch_without_any_generated_storage_appends_block():
    generated = '{ config, lib, ... }:\n\n{\n  boot.kernelModules = [ ];\n}\n'
    storage = render_storage(zephyrus(), zephyrus_ids())
    once = patch_hardware_configuration(generated, storage)
    assert once.startswith('{ config, lib, ... }:\n\n{\n  boot.kernelModules = [ ];\n\n  ' + MARKER)
    assert patch_hardware_configuration(once, storage) == once


def test_split_attrpaths_are_storage_too():
    generated = ('{ ... }:\n{\n  fileSystems."/".device = "/dev/sda1";\n  fileSystems."/".fsType = "ext4";\n'
                 '  boot.initrd.luks.devices.old.device = "/dev/sda2";\n  networking.hostName = "x";\n}\n')
    patched = patch_hardware_configuration(generated, render_storage(zephyrus(), zephyrus_ids()))
    assert "/dev/sda1" not in patched and "/dev/sda2" not in patched and "ext4" not in patched
    assert 'networking.hostName = "x";' in patched
    paths = [attrpath(b) for b in module_bindings(parse(patched)).named_children if b.type == "binding"]
    assert ("networking", "hostName") in paths


def test_invalid_nix_is_refused():
    with pytest.raises(NixPatchError, match="syntax error"):
        patch_hardware_configuration("{ config, ... }:\n{\n  fileSystems = {\n}\n", "  swapDevices = [ ];\n")
