"""Fixtures for the end-to-end tests: one live VM (tools/livevm.py) per test session, and the
states tests start from (tests/e2e/states.py: blank disks, a profile installed), each made once
per VM boot and put back from a whole-VM snapshot.

TABULA_VM_INSTANCE picks the VM; TABULA_KEEP_VM=1 leaves a VM this session booted running (with
its states, for the next session).
No QEMU means failure, not skip: these tests are the point of the test bed.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import states
from tests.e2e.timing import summary, timed
from tools.livevm import GUEST_SRC, GUEST_VENV, PROJECT_DIR, LiveVM

PYINFRA = Path(sys.executable).parent / "pyinfra"


def pytest_collection_modifyitems(items):
    e2e_dir = Path(__file__).parent
    for item in items:
        if e2e_dir in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


def pytest_sessionstart(session):
    # the test bed's own steps, timed (tests/e2e/timing.py); the summary ends the session's report
    for method, kind in (("run", "guest command"), ("load_state", "state put back"), ("save_state", "state saved")):
        original = getattr(LiveVM, method)

        def wrapper(self, *args, _original=original, _kind=kind, **kwargs):
            with timed(_kind):
                return _original(self, *args, **kwargs)
        setattr(LiveVM, method, wrapper)


def pytest_terminal_summary(terminalreporter):
    rows = summary()
    if rows:
        terminalreporter.section("where the e2e time went")
        for row in rows:
            terminalreporter.write_line(row)


@pytest.fixture(scope="session")
def livevm():
    vm = LiveVM()
    vm.ensure_up()
    # the real nixos-generate-config, the nixos-install stand-in (deploy.py calls them), blank disks
    states.blank(vm)
    yield vm
    if vm.started_here and os.environ.get("TABULA_KEEP_VM") != "1":
        vm.down()


@pytest.fixture
def clean_disks(livevm):
    """The VM as freshly booted with five blank target disks (the ``blank`` state put back):
    nothing a test before left, on the disks or in the live system, reaches this one."""
    states.blank(livevm)
    return livevm


@pytest.fixture
def installed(livevm):
    """installed(profile) -> states.Installed: the VM put back to "profile installed by Tabula"."""
    return lambda profile: states.installed(livevm, profile)


@pytest.fixture(scope="session")
def target(livevm):
    """testinfra host for the guest (OpenSSH over the test bed's shared connection: it outlives
    a state put back)."""
    return livevm.testinfra_host()


@pytest.fixture(scope="session")
def run_pyinfra(livevm):
    """run_pyinfra(args, local=False, env=None) -> CompletedProcess (stdout+stderr captured, no check).

    local=False: pyinfra on the controller, deploying over SSH to the host `install-target`, with
    the controller's environment changed by ``env`` (None: a variable unset).
    local=True: pyinfra inside the guest as `@local`, from the pushed copy of the project.
    """
    pushed = []

    def run(args, local=False, timeout=1800, env=None):
        if not local:
            argv = [str(PYINFRA), "-y", *livevm.pyinfra_args(), *args]
            with timed("pyinfra run"):
                return subprocess.run(argv, cwd=PROJECT_DIR, capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL, timeout=timeout,
                                      env=states.with_env(env or {}))
        if not pushed:
            livevm.push_project()
            pushed.append(True)
        command = f"cd {GUEST_SRC} && {GUEST_VENV}/bin/pyinfra -y @local {shlex.join(args)}"
        return livevm.run(command, check=False, timeout=timeout)

    return run
