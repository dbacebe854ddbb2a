"""Without the offline Nix kit, `./dev.sh demo` and `./dev.sh test` stop at once with one message
that says what the kit is, where it was looked for and how to point at one (no traceback); the
tests that need it are skipped with that message, and the unit tests still run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import nixkit

PROJECT = Path(__file__).resolve().parents[2]


def run(argv: list[str], kit: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TABULA_NIX_KIT": str(kit)}
    return subprocess.run(argv, cwd=PROJECT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)


def assert_one_clear_message(result: subprocess.CompletedProcess, kit: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert output.count("The offline NixOS evaluation kit was not found") == 1, output
    assert f"at {kit} (TABULA_NIX_KIT)" in output
    assert "nixpkgs 24.05, impermanence, nixos-hardware and disko" in output
    assert "Point TABULA_NIX_KIT at a folder holding " in output and "nixpkgs-24.05.tar.xz" in output
    assert "./dev.sh test tests/unit" in output


@pytest.mark.parametrize("command", ["demo", "test"])
def test_dev_sh_stops_at_once_naming_the_kit(command, tmp_path):
    result = run(["./dev.sh", command], tmp_path / "no-kit")
    assert_one_clear_message(result, tmp_path / "no-kit")
    assert "it does not exist" in result.stderr


def test_an_incomplete_kit_names_what_it_lacks(tmp_path):
    (tmp_path / "nixpkgs-24.05.tar.xz").write_bytes(b"")
    result = run([sys.executable, "tools/testrun.py"], tmp_path)
    assert_one_clear_message(result, tmp_path)
    assert "it lacks disko-2024-11.tar.xz, impermanence-2024-11.tar.xz" in result.stderr
    assert "nixpkgs-24.05.tar.xz," not in result.stderr.split("it lacks", 1)[1].split(".\n", 1)[0]


def test_tests_needing_the_kit_are_skipped_saying_why_and_unit_tests_run(tmp_path):
    result = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                  "tests/nix/test_disko.py", "tests/unit/test_profile_cases.py"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and "KitError" not in output, output
    assert " passed" in output and " skipped" in output, output
    assert "SKIPPED" in output and "The offline NixOS evaluation kit was not found" in output, output


def test_the_kit_here_is_complete():
    assert nixkit.missing_kit() is None, nixkit.missing_kit()
