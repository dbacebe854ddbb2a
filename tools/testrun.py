#!/usr/bin/env python3
"""./dev.sh test: every test, on two lanes at once, each lane with a live VM of its own.

    ./dev.sh test [pytest options]          # everything: unit and Nix tests, then the e2e files
    ./dev.sh test tests/unit [options]      # with paths: plain pytest on them, one process

A VM under emulation keeps about one of the machine's two cores busy, so two lanes nearly halve
the wall time of the end-to-end suites. Lane 1 starts with the unit and Nix tests; then each
lane takes the next end-to-end file (longest first) and runs it in a pytest of its own, on its
VM (``TABULA_VM_INSTANCE=<instance>-<lane>``, kept up between files and powered off at the end).
A file's output is printed whole when it ends. TABULA_TEST_LANES sets the number of lanes.

(pytest-xdist cannot do this: importing pyinfra's CLI, as the verification and the results-table
tests do, monkey-patches threads with gevent, and its workers then wait forever.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tools import nixkit  # noqa: E402
# The end-to-end files, longest first (measured 2026-12-02), so the lanes end close together;
# a file not named here runs last.
E2E_ORDER = ["test_faults", "test_bad_input", "test_zfs_profiles", "test_btrfs_profile", "test_local_install",
             "test_secrets", "test_safety", "test_nixos_install", "test_dry_plans", "test_rollback",
             "test_nix_precheck", "test_testbed"]


def e2e_files() -> list[str]:
    found = {path.stem: path for path in sorted((PROJECT / "tests" / "e2e").glob("test_*.py"))}
    ordered = [found.pop(name) for name in E2E_ORDER if name in found] + list(found.values())
    return [str(path.relative_to(PROJECT)) for path in ordered]


class Lanes:
    def __init__(self, options: list[str], lanes: int):
        self.options = options
        self.lanes = lanes
        self.base = os.environ.get("TABULA_VM_INSTANCE", "default")
        self.queue = e2e_files()
        self.lock = threading.Lock()
        self.results: list[tuple[str, int, float, int]] = []    # (what, exit status, seconds, lane)

    def instance(self, lane: int) -> str:
        return f"{self.base}-{lane}"

    def run(self, lane: int, paths: list[str]) -> None:
        env = dict(os.environ, TABULA_VM_INSTANCE=self.instance(lane), TABULA_KEEP_VM="1")
        started = time.monotonic()
        with tempfile.TemporaryFile("w+") as log:
            status = subprocess.run([sys.executable, "-m", "pytest", *self.options, *paths], cwd=PROJECT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            seconds = time.monotonic() - started
            log.seek(0)
            with self.lock:
                print(f"\n===== lane {lane}: {' '.join(paths)}: exit {status}, {seconds:.0f} s =====", flush=True)
                sys.stdout.write(log.read())
                sys.stdout.flush()
                self.results.append((" ".join(paths), status, seconds, lane))

    def next_file(self) -> str | None:
        with self.lock:
            return self.queue.pop(0) if self.queue else None

    def lane(self, lane: int) -> None:
        if lane == 1:
            self.run(lane, ["tests/unit", "tests/nix"])
        while (path := self.next_file()) is not None:
            self.run(lane, [path])

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
    lanes = Lanes(argv, max(1, int(os.environ.get("TABULA_TEST_LANES", "2"))))
    started = time.monotonic()
    threads = [threading.Thread(target=lanes.lane, args=(n,)) for n in range(1, lanes.lanes + 1)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        lanes.power_off()
    failed = [what for what, status, _, _ in lanes.results if status != 0]
    print(f"\n===== {len(lanes.results)} pytest runs on {lanes.lanes} lanes in {time.monotonic() - started:.0f} s =====")
    for what, status, seconds, lane in lanes.results:
        print(f"  lane {lane}  {seconds:6.0f} s  {'ok    ' if status == 0 else f'exit {status}'}  {what}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
