#!/usr/bin/env python3
"""./dev.sh test: every test, on two lanes at once, each lane with a live VM of its own.

    ./dev.sh test [pytest options]          # everything: unit and Nix tests, then the e2e units
    ./dev.sh test tests/unit [options]      # with paths: plain pytest on them, one process

A VM under emulation keeps about one of the machine's two cores busy, so two lanes nearly halve
the wall time of the end-to-end suites. Each lane runs its units of e2e work (``LANES``: a file,
or the tests of files that concern some profiles) one after the other, each in a pytest of its
own, on the lane's VM (``TABULA_VM_INSTANCE=<instance>-<lane>``, kept up between units and
powered off at the end). A VM keeps the states its tests start from (tests/e2e/states.py: blank
disks, a profile installed), made the first time a unit needs one: so the work that starts from
the same profile's state shares a lane. The unit and Nix tests run on the controller beside the
lanes. A unit's output is printed whole when it ends. TABULA_TEST_LANES=1 runs every unit on one
lane.

(pytest-xdist cannot do this: importing pyinfra's CLI, as the verification and the results-table
tests do, monkey-patches threads with gevent, and its workers then wait forever.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tools import nixkit  # noqa: E402
# The e2e units of each lane. The ZFS profiles' work on one lane, the btrfs profiles' (whose
# installed states live on the SSD, beside the NVMe of the install proofs) on the other: what
# starts from the same state shares a VM. Every e2e file must be named (tests/unit/test_testrun.py).
ZFS = "zfs-raidz1 or light-tmpfs-f2fs"
BTRFS = "zephyrus-btrfs or tmpfs-root"
LANES: dict[int, list[list[str]]] = {
    1: [["tests/e2e/test_faults.py", "-k", ZFS],
        ["tests/e2e/test_zfs_profiles.py"],
        ["tests/e2e/test_secrets.py", "tests/e2e/test_dry_plans.py", "tests/e2e/test_adopt.py", "-k", ZFS],
        ["tests/e2e/test_bad_input.py"],
        # (the test bed's own tests need no profile's state; here to even the lanes, 2026-12-07)
        ["tests/e2e/test_testbed.py"]],
    2: [["tests/e2e/test_faults.py", "-k", f"not ({ZFS})"],
        ["tests/e2e/test_btrfs_profile.py"],
        ["tests/e2e/test_secrets.py", "tests/e2e/test_dry_plans.py", "tests/e2e/test_adopt.py", "-k", BTRFS],
        # (the guide's machine is made on the NVMe from blank disks, as a user's)
        ["tests/e2e/test_adopt.py", "-k", "refused or guide"],
        ["tests/e2e/test_rollback.py", "tests/e2e/test_safety.py", "tests/e2e/test_nixos_install.py"],
        ["tests/e2e/test_local_install.py"],
        # (a btrfs profile's; here to even the lanes: 4054 / 4241 s of the CI of 2026-12-04)
        ["tests/e2e/test_nix_precheck.py"]],
}
UNIT_AND_NIX = ["tests/unit", "tests/nix"]
CONTROLLER_NICENESS = 19


def lowered(niceness: int) -> list[str]:
    """The command a child starts under: ``nice`` lowering its CPU priority (nothing for 0). (Not a
    preexec_fn: the lanes start their children from threads, where that is unsafe.)"""
    return ["nice", "-n", str(niceness)] if niceness else []


def planned_files() -> set[str]:
    return {arg for units in LANES.values() for unit in units for arg in unit if arg.startswith("tests/")}


class Lanes:
    def __init__(self, options: list[str], lanes: int):
        self.options = options
        self.lanes = lanes
        self.base = os.environ.get("TABULA_VM_INSTANCE", "default")
        # fewer lanes than planned: the units taken in turn, lane by lane
        plan = [unit for number in sorted(LANES) for unit in LANES[number]]
        self.queues = ({number: list(units) for number, units in LANES.items()} if lanes == len(LANES) else
                       {lane: plan[lane - 1::lanes] for lane in range(1, lanes + 1)})
        self.lock = threading.Lock()
        self.results: list[tuple[str, int, float, str]] = []    # (what, exit status, seconds, where)
        self.children: set[subprocess.Popen] = set()

    def instance(self, lane: int) -> str:
        return f"{self.base}-{lane}"

    def run(self, where: str, args: list[str], env: dict, niceness: int = 0) -> None:
        started = time.monotonic()
        with tempfile.TemporaryFile("w+") as log:
            child = subprocess.Popen([*lowered(niceness), sys.executable, "-m", "pytest", *self.options, *args],
                                     cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            with self.lock:
                self.children.add(child)
            status = child.wait()
            with self.lock:
                self.children.discard(child)
            seconds = time.monotonic() - started
            log.seek(0)
            with self.lock:
                print(f"\n===== {where}: {' '.join(args)}: exit {status}, {seconds:.0f} s =====", flush=True)
                sys.stdout.write(log.read())
                sys.stdout.flush()
                self.results.append((" ".join(args), status, seconds, where))

    def lane(self, lane: int) -> None:
        env = dict(os.environ, TABULA_VM_INSTANCE=self.instance(lane), TABULA_KEEP_VM="1")
        for unit in self.queues[lane]:
            self.run(f"lane {lane}", unit, env)

    def controller(self) -> None:
        # The lanes' VMs (and the pyinfra runs driving them) decide the wall time; the unit and Nix
        # tests take a fraction of it. At the lowest priority they use what the lanes leave idle
        # instead of slowing both lanes down (two nix evals beside two VMs on two cores).
        self.run("controller", UNIT_AND_NIX, dict(os.environ), niceness=CONTROLLER_NICENESS)

    def stop(self) -> None:
        """Interrupted: every pytest this run started ends with it."""
        with self.lock:
            for child in self.children:
                child.terminate()

    def power_off(self) -> None:
        if os.environ.get("TABULA_KEEP_VM") == "1":
            return
        for lane in range(1, self.lanes + 1):
            subprocess.run([sys.executable, str(PROJECT / "tools" / "livevm.py"), "down"], cwd=PROJECT,
                           env=dict(os.environ, TABULA_VM_INSTANCE=self.instance(lane)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    if any(not arg.startswith("-") for arg in argv):
        # paths (or an option's value) given: the user's own selection, as plain pytest runs it
        # (without the kit, tests/conftest.py skips what needs it, saying why)
        os.execv(sys.executable, [sys.executable, "-m", "pytest", *argv])
    missing = nixkit.missing_kit()
    if missing:
        print(f"./dev.sh test: {missing}", file=sys.stderr)
        return 2
    lanes = Lanes(argv, max(1, int(os.environ.get("TABULA_TEST_LANES", str(len(LANES))))))
    started = time.monotonic()
    threads = [threading.Thread(target=lanes.lane, args=(n,)) for n in range(1, lanes.lanes + 1)]
    threads.append(threading.Thread(target=lanes.controller))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:
        lanes.stop()
        raise
    finally:
        lanes.power_off()
    failed = [what for what, status, _, _ in lanes.results if status != 0]
    print(f"\n===== {len(lanes.results)} pytest runs on {lanes.lanes} lanes in {time.monotonic() - started:.0f} s =====")
    for what, status, seconds, where in lanes.results:
        print(f"  {where:<10}  {seconds:6.0f} s  {'ok    ' if status == 0 else f'exit {status}'}  {what}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
