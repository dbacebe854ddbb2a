"""The NixOS configuration is evaluated before any disk is touched (issue #12, item 6).

The live VM has no nix, so the run evaluates on the controller with the offline kit's inputs
(``tabula_nix_inputs``), as a user would point it at a local nixpkgs. A profile whose extra
module misspells an option is refused with Nix's error before any change (disks checksummed);
with the spelling fixed the same run goes through. The dry plan shows the step, and says when
and why it was skipped.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

import yaml

from operations.profile import PROFILE_DIR
from tests.e2e.faults import PYINFRA, changing_commands, disk_checksums, run_with_fault, strip_ansi
from tests.e2e.helpers import executed_commands
from tools import nixkit
from tools.livevm import PROJECT_DIR

SERIALS = ("TABULA-NVME0", "TABULA-RZ1", "TABULA-RZ2", "TABULA-RZ3", "TABULA-SSD")
ENV = {"TABULA_LUKS_PASSPHRASE": "tabula precheck passphrase 5c1e", "TABULA_LUKS_PASSPHRASE_FILE": None,
       "TABULA_ROOT_PASSWORD_HASH": None, "TABULA_USER_PASSWORD_HASH": None,
       "TABULA_ROOT_PASSWORD_HASH_FILE": None, "TABULA_USER_PASSWORD_HASH_FILE": None}


def profile_with_extra(tmp_path, option: str) -> str:
    """zephyrus-btrfs whose extra module (the shipped G16 extras) also sets
    services.openssh.<option>; the profile and the module live outside the repo."""
    shipped = (PROFILE_DIR.parent / "templates" / "zephyrus-extra.nix").read_text().rstrip()
    assert shipped.endswith("}")
    extra = tmp_path / "precheck-extra.nix"
    extra.write_text(shipped[:-1] + f"  services.openssh.{option} = true;  # the line under test\n}}\n")
    data = yaml.safe_load((PROFILE_DIR / "zephyrus-btrfs.yaml").read_text())
    data["nixos"]["extra_config"] = str(extra)
    path = tmp_path / "zephyrus-precheck.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def args(livevm, profile: str, *extra: str, inputs: bool = True) -> list[str]:
    variables = {"disk": livevm.stable_path("TABULA-NVME0"), "hostname": "tabula-precheck", "swap_size": "256M",
                 "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000}
    argv = ["-vv", "--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}",
            "--data", "tabula_install=false", "--data", "tabula_export_pools=false", *extra]
    if inputs:
        kit = nixkit.setup_for("asus-zephyrus-gu605my").inputs
        argv += ["--data", f"tabula_nix_inputs={json.dumps(kit)}"]
    return [*argv, "deploy.py"]


def dry_plan(livevm, argv: list[str]) -> str:
    """pyinfra --dry without -y: it detects the changes and prints the plan, then stops."""
    command = [str(PYINFRA), *livevm.pyinfra_args(), *argv[:-1], "--dry", argv[-1]]
    environment = {k: v for k, v in {**os.environ, **ENV}.items() if v is not None}
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env=environment, timeout=900)
    output = strip_ansi(result.stdout + result.stderr)
    assert result.returncode == 0, output[-6000:]
    assert "Detected changes" in output
    assert changing_commands(output) == []
    return output


def test_misspelled_option_is_refused_before_any_change_then_the_fix_installs(clean_disks, livevm, tmp_path):
    broken = profile_with_extra(tmp_path, "enabel")
    before = disk_checksums(livevm, SERIALS)
    refused = run_with_fault(livevm, args(livevm, broken), None, env=ENV, timeout=900)
    output = strip_ansi(refused.output)
    assert refused.returncode != 0, output[-4000:]
    assert "the NixOS configuration does not evaluate" in output, output[-4000:]
    # Nix's own error names the misspelled option
    assert re.search(r"error: The option `services\.openssh\.enabel' does not exist", output), output[-4000:]
    assert "Beginning operation run" not in output
    assert changing_commands(output) == []
    assert executed_commands(output), "the run never reached the target (the guard reads its disks first)"
    assert disk_checksums(livevm, SERIALS) == before, "a target disk changed"

    fixed = profile_with_extra(tmp_path, "enable")
    plan_output = dry_plan(livevm, args(livevm, fixed))
    assert re.search(r"NixOS configuration evaluates \(on the controller, flake inputs from tabula_nix_inputs: "
                     r"disko, impermanence, nixos-hardware, nixpkgs\): /nix/store/\S+-nixos-system-tabula-precheck-\S+\.drv",
                     plan_output), plan_output[-4000:]
    assert disk_checksums(livevm, SERIALS) == before, "--dry changed a disk"

    done = run_with_fault(livevm, args(livevm, fixed), None, env=ENV, timeout=1200)
    assert done.returncode == 0, strip_ansi(done.output)[-6000:]
    assert livevm.run("grep -c 'services.openssh.enable = true' /mnt/etc/nixos/precheck-extra.nix").stdout.strip() == "1"


def test_plan_says_when_the_evaluation_is_skipped_and_why(clean_disks, livevm):
    output = dry_plan(livevm, args(livevm, "zephyrus-btrfs", inputs=False))
    assert "NixOS configuration not evaluated before the install: skipped: the target has no nix" in output
    output = dry_plan(livevm, args(livevm, "zephyrus-btrfs", "--data", "tabula_nix_check=false"))
    assert "NixOS configuration not evaluated before the install: skipped: tabula_nix_check is false" in output
