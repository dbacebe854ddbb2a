"""Rendering the NixOS files from profiles: every file parses, values come from the data."""
import json
import subprocess
from pathlib import Path

import pytest

from operations import btrfs, nixos
from operations.errors import TabulaError
from operations.btrfs import rollback_script as btrfs_rollback_script
from operations.nixlit import systemd_escape
from operations.nixos import choose_hardware_module, model_module, render_files
from operations.persist import check_password_hash
from operations.profile import load_profile
from operations.secrets import Secret
from operations import target
from tests import profile_cases

ROOT = Path(__file__).resolve().parents[2]

# Values other than the profiles' defaults, so the rendered files must take them from the data.
RENDER_OVERRIDES = {"timezone": "Europe/Berlin", "state_version": "25.05"}


def render_vars(name: str) -> dict:
    """The profile's test vars (tests/profile_cases.yaml) with RENDER_OVERRIDES."""
    return {**profile_cases.render_vars(name), **RENDER_OVERRIDES}


ZEPHYRUS = render_vars("zephyrus-btrfs")


def fake_ids(profile):
    return {d: {"UUID": f"uuid-{i:04d}", "PARTUUID": f"partuuid-{i:04d}"} for i, d in enumerate(nixos.id_devices(profile))}


def nix_eval(path: Path, expr: str, strict=True):
    args = ["nix-instantiate", "--eval", "--json", "-E", expr]
    if strict:
        args.insert(2, "--strict")
    out = subprocess.run(args, capture_output=True, text=True, cwd=path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


MODULE_ARGS = '{ config = { boot.zfs.package = "zfs"; }; lib = { mkDefault = x: x; }; pkgs = {}; modulesPath = "/m"; }'


@pytest.fixture(params=profile_cases.profile_names())
def rendered(request, tmp_path):
    profile = load_profile(request.param, render_vars(request.param))
    files = render_files(profile, None, fake_ids(profile), hardware_module=profile.nixos.hardware_module)
    for filename, text in files.items():
        (tmp_path / filename).write_text(text)
    return profile, files, tmp_path


def test_every_rendered_file_parses(rendered):
    profile, files, folder = rendered
    assert {"flake.nix", "configuration.nix", "impermanence.nix", "hardware-configuration.nix"} <= set(files)
    for filename in files:
        result = subprocess.run(["nix-instantiate", "--parse", str(folder / filename)], capture_output=True, text=True)
        assert result.returncode == 0, f"{filename}: {result.stderr}"


def test_flake_names_host_and_modules(rendered):
    profile, files, folder = rendered
    expr = ('let f = import ./flake.nix; out = f.outputs { self = {}; '
            'nixpkgs = { lib.nixosSystem = x: x; }; '
            'nixos-hardware = { nixosModules = builtins.listToAttrs (map (n: { name = n; value = "hw:" + n; }) '
            '[ ' + ' '.join(json.dumps(m) for m in nixos.KNOWN_MODELS.values()) + ' ]); }; '
            'impermanence = { nixosModules.impermanence = "impermanence"; }; }; '
            'in { inputs = builtins.attrNames f.inputs; nixpkgs = f.inputs.nixpkgs.url; '
            'hosts = builtins.attrNames out.nixosConfigurations; '
            'modules = map (m: if builtins.isPath m then baseNameOf m else m) '
            f'out.nixosConfigurations.{profile.nixos.hostname}.modules; }}')
    got = nix_eval(folder, expr)
    assert got["hosts"] == [profile.nixos.hostname]
    assert got["inputs"] == ["disko", "impermanence", "nixos-hardware", "nixpkgs"]
    assert got["nixpkgs"] == "github:NixOS/nixpkgs/nixos-unstable"
    expected = ["configuration.nix", "hardware-configuration.nix", "impermanence.nix"]
    if profile.nixos.hardware_module:
        expected.append(f"hw:{profile.nixos.hardware_module}")
    assert got["modules"] == expected + ["impermanence"]


def test_configuration_values_come_from_profile(rendered):
    profile, files, folder = rendered
    n = profile.nixos
    conf = nix_eval(folder, f"let c = import ./configuration.nix {MODULE_ARGS}; in "
                    "{ inherit (c.networking) hostName; tz = c.time.timeZone; sv = c.system.stateVersion; "
                    "keys = map (k: k.path) c.services.openssh.hostKeys; imports = map baseNameOf (c.imports or []); }")
    assert conf["hostName"] == n.hostname and conf["tz"] == n.timezone and conf["sv"] == n.state_version
    root = profile.persistence.root
    assert conf["keys"] == [f"{root}/etc/ssh/ssh_host_ed25519_key", f"{root}/etc/ssh/ssh_host_rsa_key"]
    for imported in conf["imports"]:
        assert imported in files
    imp = nix_eval(folder, f"let c = import ./impermanence.nix {MODULE_ARGS}; in "
                   f'{{ p = c.environment.persistence.{json.dumps(root)}; u = c.users.users; m = c.users.mutableUsers; }}')
    assert imp["p"]["directories"] == profile.persistence.directories
    assert imp["p"]["files"] == profile.persistence.files
    assert imp["u"][n.user]["hashedPasswordFile"] == f"{root}/secrets/{n.user}-password"
    assert imp["u"][n.user]["extraGroups"] == n.user_groups
    assert imp["u"]["root"]["hashedPasswordFile"] == f"{root}/secrets/root-password"
    assert imp["m"] is False


def test_rollback_service_only_with_blank_snapshot_and_script_is_the_same(rendered):
    profile, files, folder = rendered
    targets = btrfs.rollback_targets(profile)
    services = nix_eval(folder, f"(import ./impermanence.nix {MODULE_ARGS}).boot.initrd.systemd.services or {{}}")
    if not targets:
        assert "rollback" not in services
        return
    service = services["rollback"]
    assert service["before"] == ["sysroot.mount"]
    assert "systemd-cryptsetup@cryptroot.service" in service["after"]
    assert "dev-mapper-cryptroot.device" in service["after"]
    assert service["unitConfig"] == {"DefaultDependencies": "no"}
    assert service["wantedBy"] == ["initrd.target"]
    # What Nix hands to the initrd is exactly the script the e2e test runs.
    assert service["script"] == btrfs_rollback_script("/dev/mapper/cryptroot", "@root", "@root-blank")
    assert nix_eval(folder, f"(import ./impermanence.nix {MODULE_ARGS}).boot.initrd.systemd.enable") is True


def test_rollback_script_deletes_nested_first_and_guards_blank():
    script = btrfs_rollback_script("/dev/mapper/x", "@root", "@root-blank", mountdir="/m")
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
    nested = script.index("deleting nested subvolume")
    assert nested < script.index('btrfs subvolume delete "$mnt/@root"') < script.index("btrfs subvolume snapshot")
    assert 'if [ -d "$mnt/@root-blank" ]' in script


def test_real_uuids_replace_partlabels_and_missing_ids_are_refused():
    profile = load_profile("zephyrus-btrfs", ZEPHYRUS)
    hw = render_files(profile, None, fake_ids(profile))["hardware-configuration.nix"]
    assert "by-partlabel" not in hw and "/dev/disk/by-uuid/uuid-0000" in hw
    with pytest.raises(nixos.MissingDeviceIds, match="by-partlabel/(EFI|cryptroot): no UUID"):
        render_files(profile, None, {})
    review = render_files(profile, None, None, placeholder=True)["hardware-configuration.nix"]
    assert "/dev/disk/by-partlabel/EFI" in review


def test_hardware_module_from_dmi():
    assert model_module("ROG Zephyrus G16 GU605CW_GU605CW") == "asus-zephyrus-gu605cw"
    assert model_module("ROG Zephyrus G16 GU605MY_GU605MY") == "asus-zephyrus-gu605my"
    assert model_module("Standard PC (Q35 + ICH9, 2009)") is None
    profile = load_profile("zephyrus-btrfs", ZEPHYRUS)  # asks for gu605my (the guide's)
    module, note = choose_hardware_module(profile, "ROG Zephyrus G16 GU605CW_GU605CW")
    assert module == "asus-zephyrus-gu605my" and "asus-zephyrus-gu605cw" in note
    auto = load_profile("zephyrus-btrfs", {**ZEPHYRUS, "hardware_module": "auto"})
    assert choose_hardware_module(auto, "ROG Zephyrus G16 GU605CW_GU605CW")[0] == "asus-zephyrus-gu605cw"
    assert choose_hardware_module(auto, "Standard PC (Q35 + ICH9, 2009)")[0] is None
    assert choose_hardware_module(profile, "")[0] == "asus-zephyrus-gu605my"


def test_systemd_escape():
    assert systemd_escape("cryptroot") == "cryptroot"
    assert systemd_escape("local-1a2b") == "local\\x2d1a2b"
    assert systemd_escape("/dev/mapper/cryptroot", path=True) == "dev-mapper-cryptroot"
    assert systemd_escape("/dev/disk/by-uuid/ab-cd", path=True) == "dev-disk-by\\x2duuid-ab\\x2dcd"


def test_password_hashes_only():
    check_password_hash(Secret("$6$rounds=656000$abcdefgh$" + "x" * 86, "env"))
    check_password_hash(Secret("$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7", "env"))
    with pytest.raises(TabulaError) as info:
        check_password_hash(Secret("hunter2-plaintext", "$TABULA_ROOT_PASSWORD_HASH"))
    assert "hunter2" not in str(info.value) and "TABULA_ROOT_PASSWORD_HASH" in str(info.value)


def test_review_command_writes_files_and_touches_no_disk(tmp_path):
    out = tmp_path / "review"
    result = subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / "tools/render.py"), "zephyrus-btrfs",
                             "--host", "g16", "--dmi", "ROG Zephyrus G16 GU605CW_GU605CW", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "asus-zephyrus-gu605cw" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["configuration.nix", "disko.nix", "flake.nix",
                                                   "hardware-configuration.nix", "impermanence.nix",
                                                   "zephyrus-extra.nix"]
    assert "nixosConfigurations.g16 " in (out / "flake.nix").read_text()
    assert 'networking.hostName = "g16";' in (out / "configuration.nix").read_text()


@pytest.mark.parametrize("present, generates", [
    (None, True),                                                         # never generated
    ("{ config, lib, ... }:\n{\n  fileSystems.\"/\" =\n    { device = \"/dev/disk/by-uu", True),   # cut short
    ((ROOT / "tests/unit/fixtures/nixos/real-zephyrus-btrfs.nix").read_text(), False),    # the real tool's
])
def test_hardware_configuration_is_generated_unless_a_whole_one_is_there(monkeypatch, present, generates):
    from tests.unit.pyinfra_fake import run_op

    profile = load_profile("zephyrus-btrfs", ZEPHYRUS)
    commands, _, fake = run_op(monkeypatch, nixos, nixos.generate_config, {target.FileText: present},
                               profile=profile, root="/mnt")
    assert commands == (["nixos-generate-config --root /mnt"] if generates else [])
    if not generates:
        assert fake.noops == ["/mnt/etc/nixos/hardware-configuration.nix is already generated"]
