"""The `tabula` command of the Nix package (nix/tabula.sh), run for real from folders outside
the project: its placeholders filled as nix/package.nix fills them (the package's Python and
share folder; here the venv's Python and this checkout). pyinfra loads the deploy, reads the
data, and the deploy stops at the first thing the data lacks, before any command runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tabula(tmp_path) -> Path:
    script = (PROJECT / "nix" / "tabula.sh").read_text()
    script = script.replace("@share@", str(PROJECT)).replace("@python@", sys.executable)
    path = tmp_path / "bin" / "tabula"
    path.parent.mkdir()
    path.write_text(script)
    path.chmod(0o755)
    return path


def run(tabula: Path, cwd: Path, *args: str) -> str:
    done = subprocess.run([str(tabula), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return done.stdout + done.stderr


def test_runs_the_deploy_from_any_folder_with_the_packaged_data(tabula, tmp_path):
    """No group_data where it runs: Tabula's own (the default profile, zephyrus-btrfs) is read."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(tabula, elsewhere, "@local", "--dry")
    assert f"Loading: {PROJECT}/deploy.py" in out
    assert "variable 'disk' has no value" in out


def test_data_given_on_the_command_line_or_beside_it_wins(tabula, tmp_path):
    out = run(tabula, tmp_path, "@local", "gaps", "--data", "tabula_profile=no-such-profile")
    assert f"Loading: {PROJECT}/gaps.py" in out
    assert "unknown profile 'no-such-profile'" in out
    # a group_data/ in the folder it runs from is the user's: read instead of the packaged one
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "all.py").write_text('tabula_profile = "zfs-raidz1"\n')
    out = run(tabula, tmp_path, "@local", "rescue", "--dry")
    assert f"Loading: {PROJECT}/rescue.py" in out
    assert "variable 'hostname' has no value" in out       # zfs-raidz1's first required var


def test_verify_runs_the_verification_suite(tabula, tmp_path):
    out = run(tabula, tmp_path, "verify", "-q")
    assert "8 skipped" in out      # without --hosts the checks wait for a target
