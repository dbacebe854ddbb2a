"""Fixtures for the end-to-end tests: one live VM (tools/livevm.py) per test session.

TABULA_VM_INSTANCE picks the VM; TABULA_KEEP_VM=1 leaves a VM this session booted running.
No QEMU means failure, not skip: these tests are the point of the test bed.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tools.livevm import GUEST_SRC, GUEST_VENV, PROJECT_DIR, LiveVM

PYINFRA = Path(sys.executable).parent / "pyinfra"


def pytest_collection_modifyitems(items):
    e2e_dir = Path(__file__).parent
    for item in items:
        if e2e_dir in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def livevm():
    vm = LiveVM()
    vm.ensure_up()
    vm.install_standins()   # the real nixos-generate-config, the nixos-install stand-in: deploy.py calls them
    yield vm
    if vm.started_here and os.environ.get("TABULA_KEEP_VM") != "1":
        vm.down()


@pytest.fixture
def clean_disks(livevm):
    """The five target disks, blank: whatever the previous test left is wiped in place."""
    livevm.reset_disks()
    return livevm


@pytest.fixture(scope="session")
def target(livevm):
    """testinfra host for the guest."""
    return livevm.testinfra_host()


@pytest.fixture(scope="session")
def run_pyinfra(livevm):
    """run_pyinfra(args, local=False) -> CompletedProcess (stdout+stderr captured, no check).

    local=False: pyinfra on the controller, deploying over SSH to the host `install-target`.
    local=True: pyinfra inside the guest as `@local`, from the pushed copy of the project.
    """
    pushed = []

    def run(args, local=False, timeout=1800):
        if not local:
            argv = [str(PYINFRA), "-y", *livevm.pyinfra_args(), *args]
            return subprocess.run(argv, cwd=PROJECT_DIR, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        if not pushed:
            livevm.push_project()
            pushed.append(True)
        command = f"cd {GUEST_SRC} && {GUEST_VENV}/bin/pyinfra -y @local {shlex.join(args)}"
        return livevm.run(command, check=False, timeout=timeout)

    return run
