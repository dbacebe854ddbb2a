"""The fault suite's hold (tests/e2e/faults.py), run in a real shell: the chosen matching call of
the shadowed program waits, before it runs (then exits without running it) or after it ran (then
exits with its real status), so a fault always lands exactly there: before the operation's command
has done anything, between two of its calls, or after the command did its work but before the run
learned it."""
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
    real.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *fail*) exit 3;; esac\n')
    real.chmod(0o755)
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()

    def make(hold: str, after: bool = False, call: int = 1, match: str | None = None):
        wrapper = tmp_path / "wrapper"
        wrapper.write_text(hold_wrapper(hold, str(real), str(hold_dir), after=after, call=call, match=match))
        wrapper.chmod(0o755)
        (hold_dir / "armed").touch()
        (hold_dir / "calls").unlink(missing_ok=True)      # as arm_hold: a new count for a new hold
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


def test_a_later_call_can_be_held_the_ones_before_run(shadowed):
    make, log, hold_dir = shadowed
    call = make("btrfs subvolume create", call=2)
    assert call("subvolume", "create", "/t/@root").wait(10) == 0
    assert call("subvolume", "list", "/t").wait(10) == 0             # not a matching call: not counted
    held = call("subvolume", "create", "/t/@nix")
    assert wait_for(hold_dir / "held")
    (hold_dir / "held").unlink()
    assert held.wait(10) == 75
    assert call("subvolume", "create", "/t/@home").wait(10) == 0
    assert logged(log) == ["subvolume create /t/@root", "subvolume list /t", "subvolume create /t/@home"]


def test_held_after_it_ran_the_call_has_done_its_work_and_keeps_its_status(shadowed):
    make, log, hold_dir = shadowed
    call = make("mkfs.btrfs", after=True)
    held = call("-L", "nixos", "/dev/mapper/x")
    assert wait_for(hold_dir / "held")
    assert logged(log) == ["-L nixos /dev/mapper/x"]               # it ran before it waits
    time.sleep(0.3)
    assert held.poll() is None
    (hold_dir / "held").unlink()
    assert held.wait(10) == 0
    failing = make("zpool create", after=True)
    held = failing("create", "fail")
    assert wait_for(hold_dir / "held")
    (hold_dir / "held").unlink()
    assert held.wait(10) == 3                                      # the real status, once released


def test_a_pattern_picks_the_calls_by_their_arguments(shadowed):
    make, log, hold_dir = shadowed
    call = make("mount", match="*' /mnt '")
    assert call("-t", "btrfs", "-o", "subvol=/", "/dev/mapper/x", "/run/tabula/btrfs/nixos").wait(10) == 0
    held = call("-t", "tmpfs", "-o", "mode=755", "none", "/mnt")
    assert wait_for(hold_dir / "held")
    (hold_dir / "held").unlink()
    assert held.wait(10) == 75
    assert logged(log) == ["-t btrfs -o subvol=/ /dev/mapper/x /run/tabula/btrfs/nixos"]
