"""
Verify a target against its profile with testinfra, in testinfra's own convention:

    .venv/bin/python -m pytest tests/verify --hosts=ssh://install-target
    .venv/bin/python -m pytest tests/verify --hosts=local://           # on the live system itself

The profile and its vars come from the same inventory data as the deploy (inventory.py,
group_data/): the data of the inventory host named like the testinfra host (``install-target``),
or ``--tabula-host NAME``; ``--tabula-data KEY=VALUE`` adds data exactly as pyinfra's ``--data``
does, so a deploy's ``--data`` arguments can be given again as they are:

    .venv/bin/python -m pytest tests/verify --hosts=ssh://install-target \\
        --tabula-data tabula_vars='{"disk": "/dev/disk/by-id/nvme-..."}'

Where the installed system is comes from the same data as for gaps.py, ``tabula_root``: ``/mnt``
(the live system after the install), ``/`` (the installed system, booted), or ``auto`` (the
default: ``/mnt`` when something is mounted there); ``--tabula-data tabula_root=/`` says it. The
run prints which. One test per layer (gpt, luks, filesystems, zfs, btrfs,
mounts, nixos, persist); a layer that fails prints one line per mismatch. testinfra's own options
apply (``--ssh-config``, ``--ssh-identity-file``, ``--sudo``, ``--connection``).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from testinfra.backend.ssh import SshBackend

from operations.errors import TabulaError
from operations.settings import Settings
from operations.verify import describe, install_root, parse_data, settings_from_inventory


def pytest_addoption(parser):
    group = parser.getgroup("tabula", "Tabula: the profile and data to verify the target against")
    group.addoption("--tabula-data", action="append", default=[], metavar="KEY=VALUE",
                    help="inventory data over inventory.py and group_data, as pyinfra's --data (repeatable)")
    group.addoption("--tabula-inventory", default="inventory.py", metavar="FILE",
                    help="the inventory file (default: inventory.py)")
    group.addoption("--tabula-host", default=None, metavar="NAME",
                    help="the inventory host whose data to use (default: the testinfra host's name)")


def pytest_collection_modifyitems(config, items):
    """Without --hosts testinfra would check the machine pytest runs on: these tests wait for a target."""
    if config.getoption("hosts") is None:
        here = Path(__file__).parent
        skip = pytest.mark.skip(reason="tests/verify checks a target: name it, e.g. --hosts=ssh://install-target "
                                       "(or --hosts=local:// on the target itself)")
        for item in items:
            if here in Path(item.fspath).parents:
                item.add_marker(skip)


@dataclass(frozen=True)
class Target:
    settings: Settings
    root: str
    description: str


VERIFIED: list[str] = []


@pytest.fixture(scope="session")
def ssh_control_dir():
    """A folder for the SSH master connections: testinfra's ssh backend asks for ControlMaster
    but gives no ControlPath, so without one every check would open a new connection."""
    folder = Path(tempfile.mkdtemp(prefix="tabula-ssh-"))
    yield folder
    for socket in folder.iterdir():
        subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "target"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def target(host, request, ssh_control_dir) -> Target:
    """The settings the deploy would load for this host, and where its installed system is."""
    config = request.config
    if isinstance(host.backend, SshBackend) and not host.backend.controlpath:
        host.backend.controlpath = f"{ssh_control_dir}/%%C"     # (testinfra %-formats the command)
    name = config.getoption("tabula_host") or host.backend.get_hostname()
    try:
        settings = settings_from_inventory(name, config.getoption("tabula_inventory"),
                                           parse_data(config.getoption("tabula_data")))
        root = install_root(host, settings.tabula_root)
    except TabulaError as error:
        pytest.fail(f"{name}: {error}", pytrace=False)
    description = f"{host.backend.get_pytest_id()}: {describe(settings, root)}"
    VERIFIED.append(description)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"verifying {description}")
    return Target(settings, root, description)


def layers_by_outcome(stats: dict) -> dict[str, dict[str, list[str]]]:
    """{testinfra host id: {"checked": [layer, ...], "not applicable": [...]}} from pytest's
    reports (``test_<layer>[<host id>]``), in the order they ran: which layers a verification
    really ran, so a layer skipped by mistake shows."""
    found: dict[str, dict[str, list[str]]] = {}
    for outcome, kind in (("passed", "checked"), ("failed", "checked"), ("skipped", "not applicable")):
        for report in stats.get(outcome, []):
            match = re.search(r"::test_(\w+)\[(.*)\]$", getattr(report, "nodeid", ""))
            if match and getattr(report, "when", "call") in ("call", "setup"):
                layers = found.setdefault(match[2], {"checked": [], "not applicable": []})[kind]
                if match[1] not in layers:
                    layers.append(match[1])
    return found


def pytest_terminal_summary(terminalreporter, exitstatus):
    by_host = layers_by_outcome(terminalreporter.stats)
    for description in VERIFIED:
        verdict = "matches the profile" if exitstatus == 0 else "does NOT match the profile (see the failures above)"
        terminalreporter.write_line(f"tabula: {description}: {verdict}")
        host_id = description.split(": ", 1)[0]
        for kind, layers in by_host.get(host_id, {}).items():
            terminalreporter.write_line(f"tabula: {host_id}: layers {kind}: {', '.join(layers) or 'none'}")
