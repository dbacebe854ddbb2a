"""The evaluation a deploy asks of a target that has nix, run by a real shell with the real nix
on this machine: the files travel in the command, the scratch folder goes away, and Nix's verdict
comes back whole (a value, or the error and the traces)."""
from __future__ import annotations

import subprocess

from operations.nixeval import TOPLEVEL, TargetEvaluation, files_archive, parse_stderr

# A flake without inputs whose "system" is a plain value: the plumbing, not nixpkgs, under test.
FLAKE = """{
  outputs = { self }: {
    nixosConfigurations.%s.config.system.build.toplevel.drvPath = %s;
  };
}
"""


def run_fact(files: dict[str, str], hostname: str):
    fact = TargetEvaluation()
    command = fact.command(archive=files_archive(files), hostname=hostname).get_raw_value()
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/root", "NIX_CONFIG": "build-users-group ="})
    assert done.returncode == 0, done.stderr          # a fact command never fails: the verdict is in its output
    return fact.process(done.stdout.splitlines())


def scratch_folders() -> set[str]:
    return set(subprocess.run(["sh", "-c", "ls -d /tmp/tabula-eval.* 2>/dev/null; true"],
                              capture_output=True, text=True).stdout.split())


def test_a_configuration_that_evaluates_gives_its_value_and_leaves_nothing_behind():
    before = scratch_folders()
    got = run_fact({"flake.nix": FLAKE % ("g16", builtins_trace('"/nix/store/x-nixos-system-g16.drv"'))}, "g16")
    assert got["status"] == 0
    assert got["value"] == "/nix/store/x-nixos-system-g16.drv"
    error, traces = parse_stderr(got["stderr"])
    assert error == "" and traces == ("trace: warning: a module said so",)
    assert scratch_folders() == before


def test_a_configuration_nix_refuses_comes_back_with_nixs_error():
    got = run_fact({"flake.nix": FLAKE % ("nas", 'throw "The option `services.openssh.enabel\' does not exist."')}, "nas")
    assert got["status"] != 0 and got["value"] == ""
    error, _ = parse_stderr(got["stderr"])
    assert error.startswith("error:") and "services.openssh.enabel" in error


def builtins_trace(value: str) -> str:
    return f'builtins.trace "warning: a module said so" {value}'


def test_the_command_names_the_toplevel_nixos_install_evaluates():
    command = TargetEvaluation().command(archive="", hostname="g16").get_raw_value()
    assert f"#nixosConfigurations.$2.{TOPLEVEL}" in command and "--no-write-lock-file" in command
