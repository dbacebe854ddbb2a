"""./dev.sh test's plan (tools/testrun.py): every e2e file runs, and the tests of every profile
on exactly one lane (a profile the plan forgets would silently not run)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import profile_cases
from tools import testrun

PROJECT = Path(__file__).resolve().parents[2]


def test_every_e2e_file_is_planned():
    files = {str(path.relative_to(PROJECT)) for path in (PROJECT / "tests" / "e2e").glob("test_*.py")}
    assert files == testrun.planned_files()


def collected(args: list[str]) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=PROJECT, capture_output=True, text=True)
    return {line for line in out.stdout.splitlines() if "::" in line}


def test_each_e2e_test_runs_once_on_one_lane():
    planned = [test for units in testrun.LANES.values() for unit in units for test in collected(unit)]
    every = collected(["tests/e2e"])
    assert sorted(planned) == sorted(every), (sorted(set(every) - set(planned)),
                                              sorted(t for t in set(planned) if planned.count(t) > 1))


def test_the_lanes_name_every_profile():
    named = {name.strip() for group in (testrun.ZFS, testrun.BTRFS) for name in group.split(" or ")}
    assert named == set(profile_cases.profile_names())


def test_the_unit_and_nix_tests_yield_the_cpu_to_the_lanes(monkeypatch):
    """The controller's pytest runs at the lowest priority, the lanes' at the normal one: the
    lanes' VMs decide the wall time (two nix evals at the same priority slowed both lanes)."""
    started = []
    monkeypatch.setattr(testrun.Lanes, "run", lambda self, where, args, env, niceness=0: started.append((where, niceness)))
    lanes = testrun.Lanes([], 2)
    lanes.controller()
    lanes.lane(1)
    assert started[0] == ("controller", 19)
    assert {niceness for where, niceness in started[1:]} == {0}
    # and the priority is really lowered in the child
    said = subprocess.run([*testrun.lowered(testrun.CONTROLLER_NICENESS), sys.executable, "-c",
                           "import os; print(os.nice(0))"], capture_output=True, text=True, check=True)
    assert int(said.stdout) >= 19
