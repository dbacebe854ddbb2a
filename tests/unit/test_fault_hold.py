"""The fault suite's hold (tests/e2e/faults.py), run in a real shell: the first matching call of
the shadowed program waits and then exits without running it, so a kill aimed at an operation's
start always lands before the operation's command has done anything."""
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.faults import hold_wrapper


@pytest.fixture
def shadowed(tmp_path):
    """(run the wrapper, the real program's log, the hold folder) for a hold on ``hold``."""
    log = tmp_path / "real.log"
    real = tmp_path / "real"
    real.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    real.chmod(0o755)
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()

    def make(hold: str):
        wrapper = tmp_path / "wrapper"
        wrapper.write_text(hold_wrapper(hold, str(real), str(hold_dir)))
        wrapper.chmod(0o755)
        (hold_dir / "armed").touch()
        return lambda *args: subprocess.Popen([str(wrapper), *args])
    return make, log, hold_dir


def wait_for(path: Path, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_the_first_matching_call_waits_then_exits_without_running(shadowed):
    make, log, hold_dir = shadowed
    call = make("cryptsetup luksFormat")

    assert call("isLuks", "/dev/x").wait(10) == 0                 # another subcommand runs at once
    assert call("luksFormatted", "/dev/x").wait(10) == 0          # (a word that only starts alike)
    held = call("luksFormat", "--batch-mode", "/dev/x")
    assert wait_for(hold_dir / "held")
    time.sleep(0.3)
    assert held.poll() is None                                   # waiting for the test
    (hold_dir / "held").unlink()                                 # released (after the kill)
    assert held.wait(10) == 75
    assert call("luksFormat", "/dev/y").wait(10) == 0             # one-shot: the next one runs
    assert logged(log) == ["isLuks /dev/x", "luksFormatted /dev/x", "luksFormat /dev/y"]


def test_a_program_hold_holds_its_first_call_whatever_its_arguments(shadowed):
    make, log, hold_dir = shadowed
    call = make("truncate")
    held = call("-s", "0", "/mnt/swap/swapfile")
    assert wait_for(hold_dir / "held")
    (hold_dir / "held").unlink()
    assert held.wait(10) == 75
    assert logged(log) == []


def test_without_the_armed_mark_every_call_runs(shadowed):
    make, log, hold_dir = shadowed
    call = make("zpool create")
    (hold_dir / "armed").unlink()
    assert call("create", "rpool", "raidz1", "a", "b", "c").wait(10) == 0
    assert logged(log) == ["create rpool raidz1 a b c"]
