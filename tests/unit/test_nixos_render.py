"""Rendering the NixOS files from profiles: every file parses, values come from the data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from operations import nixos, zfs
from operations.errors import TabulaError
from operations.btrfs import rollback_script as btrfs_rollback_script
from operations.nixlit import systemd_escape
from operations.nixfiles import render_files
from operations.nixos import choose_hardware_module, model_module
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


def test_the_initrd_rolls_back_exactly_what_the_profile_empties_at_boot(rendered):
    """What each profile empties at boot, and how (tests/profile_cases.yaml, by hand): a btrfs
    subvolume restored from its blank snapshot, ZFS temp datasets rolled back to @empty, or a
    tmpfs root that needs no service at all."""
    profile, files, folder = rendered
    services = nix_eval(folder, f"(import ./impermanence.nix {MODULE_ARGS}).boot.initrd.systemd.services or {{}}")
    expected = profile_cases.rollback_services(profile.name)
    assert set(services) == expected
    for name, service in services.items():
        assert service["before"] == ["sysroot.mount"] and service["wantedBy"] == ["initrd.target"], name
        assert service["unitConfig"] == {"DefaultDependencies": "no"}, name
    if services:
        assert nix_eval(folder, f"(import ./impermanence.nix {MODULE_ARGS}).boot.initrd.systemd.enable") is True
    # What Nix hands to the initrd is exactly the script the e2e tests run.
    if "rollback" in services:
        service = services["rollback"]
        assert "systemd-cryptsetup@cryptroot.service" in service["after"]
        assert "dev-mapper-cryptroot.device" in service["after"]
        assert service["script"] == btrfs_rollback_script("/dev/mapper/cryptroot", "@root", "@root-blank")
    if "tabula-rollback-temp" in services:
        service = services["tabula-rollback-temp"]
        imports = sorted(f"zfs-import-{pool.name}.service" for pool in profile.pools.values())
        assert service["after"] == [*service["requires"], "systemd-hibernate-resume.service"]
        assert service["requires"] == imports
        assert service["script"] == zfs.rollback_script(profile)
        assert [line.split()[-1] for line in service["script"].splitlines()[1:]] == \
            [f"{name}@empty" for name in zfs.temp_datasets(profile)]


# A stand-in for btrfs (and mount/umount) over plain folders: a subvolume is a folder holding a
# .subvol-id file (its ID). "subvolume list" prints them by ID like btrfs does, "subvolume delete"
# refuses one that still holds a nested subvolume (as btrfs does), "subvolume snapshot" copies.
BTRFS_STANDIN = r"""#!/bin/bash
echo "btrfs $*" >> "$STANDIN_LOG"
case "$1 $2" in
  "subvolume list")
    cd "$3" && find . -mindepth 2 -name .subvol-id -printf '%h\n' | while read -r d; do
      echo "$(cat "$d/.subvol-id") ${d#./}"; done | sort -n | while read -r id path; do
      echo "ID $id gen 7 top level 5 path $path"; done ;;
  "subvolume delete")
    if [ -n "$(find "$3" -mindepth 2 -name .subvol-id -print -quit)" ]; then
      echo "ERROR: Could not destroy subvolume: Directory not empty" >&2; exit 1; fi
    rm -rf "$3" ;;
  "subvolume snapshot")
    shift 2; [ "$1" = -r ] && shift
    [ -e "$2" ] && { echo "ERROR: target path already exists: $2" >&2; exit 1; }
    cp -a "$1" "$2" && echo 999 > "$2/.subvol-id" ;;
  *) exit 2 ;;
esac
"""


def subvolume(top: Path, path: str, number: int, files: tuple[str, ...] = ()) -> Path:
    folder = top / path
    folder.mkdir(parents=True)
    (folder / ".subvol-id").write_text(f"{number}\n")
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("data\n")
    return folder


def run_rollback(tmp_path: Path, top: Path) -> subprocess.CompletedProcess:
    """The initrd's rollback script, run by a real bash over the folders."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "btrfs").write_text(BTRFS_STANDIN)
    for name in ("mount", "umount"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "$STANDIN_LOG"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    script = btrfs_rollback_script("/dev/mapper/cryptroot", "@root", "@root-blank", mountdir=str(top))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STANDIN_LOG": str(tmp_path / "calls")}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)


def test_rollback_script_deletes_nested_subvolumes_first_then_restores_the_blank_root(tmp_path):
    top = tmp_path / "top"
    subvolume(top, "@root", 256, ("etc/leftover", "var/lib/state"))
    subvolume(top, "@root-blank", 257)
    subvolume(top, "@home", 258, ("ada/notes",))
    subvolume(top, "@rootfs", 259, ("kept",))                        # a name that only starts like @root
    subvolume(top, "@root/var/lib/machines", 260, ("image",))        # systemd makes this one
    subvolume(top, "@root/var/lib/machines/inner", 261)              # nested in the nested one
    result = run_rollback(tmp_path, top)
    assert result.returncode == 0, result.stderr
    # the root is the blank snapshot again: nothing of the old one is left
    assert sorted(p.name for p in (top / "@root").iterdir()) == [".subvol-id"]
    assert (top / "@root-blank").is_dir() and (top / "@home/ada/notes").read_text() == "data\n"
    assert (top / "@rootfs/kept").exists()
    deleted = [line.split()[-1] for line in (tmp_path / "calls").read_text().splitlines() if "subvolume delete" in line]
    assert deleted == [f"{top}/@root/var/lib/machines/inner", f"{top}/@root/var/lib/machines", f"{top}/@root"]
    assert "restoring @root from @root-blank" in result.stdout


def test_rollback_script_without_the_blank_snapshot_leaves_the_root_as_it_is(tmp_path):
    top = tmp_path / "top"
    subvolume(top, "@root", 256, ("etc/kept",))
    result = run_rollback(tmp_path, top)
    assert (top / "@root/etc/kept").read_text() == "data\n"
    assert "subvolume delete" not in (tmp_path / "calls").read_text()
    assert "@root-blank is missing: @root is left as it is" in result.stderr


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
    result = subprocess.run([sys.executable, str(ROOT / "tools/render.py"), "zephyrus-btrfs",
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
    from operations.settings import Settings
    from tests.unit.pyinfra_fake import fake_run

    profile = load_profile("zephyrus-btrfs", ZEPHYRUS)
    run = fake_run({target.FileText: present}, Settings.of(profile))
    commands = [str(c) for c in nixos.generate_config._inner(run, root="/mnt")]
    fake = run.host
    assert [c.startswith("FunctionCommand(_generate_and_read,") for c in commands] == ([True] if generates else [])
    if not generates:
        assert fake.noops == ["/mnt/etc/nixos/hardware-configuration.nix is already generated"]


def test_what_the_generator_leaves_is_read_in_its_own_command(tmp_path):
    """nixos-generate-config and the reads of the next step in one command (a stand-in generator
    in a real shell): the configuration step then reads nothing more."""
    from operations.settings import Settings
    from tests.unit.pyinfra_fake import fake_run

    profile = load_profile("zephyrus-btrfs", ZEPHYRUS)
    root = tmp_path / "root"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nixos-generate-config").write_text(
        '#!/bin/sh\necho "writing $2/etc/nixos/hardware-configuration.nix"\nmkdir -p "$2/etc/nixos"\n'
        'printf "{ ... }:\\n{ }\\n" > "$2/etc/nixos/hardware-configuration.nix"\n')
    (bin_dir / "nixos-generate-config").chmod(0o755)
    run = fake_run({}, Settings.of(profile))
    reads = nixos.configuration_reads(run, f"{root}/etc/nixos", files_in_place=False)
    [command] = list(nixos.generate_config._inner(run, root=str(root)))
    ran = []

    class Output:
        def __init__(self, done):
            self.stdout_lines, self.stderr_lines = done.stdout.splitlines(), done.stderr.splitlines()

    class Host:                 # what pyinfra's host does with the command: run it in a shell
        def run_shell_command(self, command, print_output=False, print_input=False):
            done = subprocess.run(["sh", "-c", command.get_raw_value()], capture_output=True, text=True,
                                  env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
            ran.append(done)
            return done.returncode == 0, Output(done)

    state = type("State", (), {"print_output": False, "print_input": False})()
    assert command.execute(state, Host(), {}) is True
    assert "writing" in ran[0].stderr and "writing" not in ran[0].stdout     # the generator's words stay out
    before = len(run.host.reads)
    assert run.read_many(reads)[0] == "{ ... }:\n{ }\n"
    assert run.host.reads[before:] == []                                   # kept: no round trip
