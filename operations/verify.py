"""
Verification of a target against its profile: every layer's ``problems`` (the rules its steps
apply), in stage order, read through a testinfra host. What ``pytest tests/verify
--hosts=ssh://install-target`` runs (see tests/verify/conftest.py and the README's "Day two: is
the machine what the profile says?").

    settings = settings_from_inventory("install-target", data={"tabula_vars": {...}})
    root = install_root(host, settings.tabula_root)       # /mnt after the install, / on the booted system
    failures = verify(host, settings, root)        # {"gpt": [], "luks": ["..."], ...}

The profile and its vars come from the same inventory data as the deploy's (inventory.py,
group_data/, ``--data``), loaded by pyinfra's own inventory code. The checks only read the
target (the one exception: a btrfs top level the install no longer keeps mounted is mounted
read-only for the read, then unmounted). testinfra is not imported here: the host is handed in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pyinfra.api import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory_from_files
from pyinfra_cli.util import parse_cli_arg

from operations.errors import TabulaError
from operations.layers import LAYERS as REGISTRY
from operations.mounts import Mounts
from operations.settings import Settings, load_settings
from operations.target import INSTALL_ROOT, CheckError, read_fact, system_root

PROJECT_DIR = Path(__file__).resolve().parent.parent

# Every layer by name, in stage order (tests/verify: one test each).
LAYERS = tuple((layer.name, layer) for layer in REGISTRY)
ROOTS = {
    INSTALL_ROOT: "the live system after the install",
    "/": "the installed system, booted",
}


def parse_data(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as pyinfra's ``--data`` reads them (JSON-ish values parsed)."""
    data = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TabulaError(f"--tabula-data {item!r}: give KEY=VALUE, as pyinfra's --data")
        data[key] = parse_cli_arg(value)
    return data


def settings_from_inventory(host_name: str, inventory: str = "inventory.py", data: dict[str, Any] | None = None,
                            cwd: Path = PROJECT_DIR) -> Settings:
    """The settings a deploy to ``host_name`` would load: the host's data from the inventory file
    (a host it does not list gets group_data/all.py, as ``pyinfra <host> deploy.py`` does), then
    ``data`` over it as ``--data`` would be; validated by ``load_settings``."""
    inventory_path = Path(inventory) if Path(inventory).is_absolute() else cwd / inventory
    with ctx_state.use(State()):
        loaded = make_inventory_from_files(str(inventory_path), dict(data or {}), cwd=str(cwd))
        target = loaded.get_host(host_name, None)
        if target is None:
            loaded = make_inventory_from_files(host_name, dict(data or {}), cwd=str(cwd))
            target = loaded.get_host(host_name)
    return load_settings(target.data)


def install_root(host, wanted: str = "auto") -> str:
    """Where the installed system is, by the rule gaps.py follows (``target.system_root``):
    ``/mnt`` while the live system has something mounted there (after the install), else ``/``."""
    return system_root(wanted, {} if wanted != "auto" else read_fact(host, Mounts))


class HostTarget:
    """The target as the layers' ``problems`` read it (``contract.Target``): a testinfra host,
    the facts read with the deploy's own commands."""

    def __init__(self, host, settings: Settings, root: str, layers: tuple = REGISTRY):
        self.host, self.settings, self.root, self.layers = host, settings, root, layers

    def read(self, fact, **kwargs):
        return read_fact(self.host, fact, **kwargs)

    def run(self, command: str):
        return self.host.run(command)


def describe(settings: Settings, root: str) -> str:
    return f"profile {settings.profile.name} at {root} ({ROOTS[root]})"


def check_layer(layer, host, settings: Settings, root: str) -> list[str]:
    """One layer's mismatches; a read that failed is one line too."""
    try:
        return layer.problems(HostTarget(host, settings, root))
    except CheckError as error:
        return [f"could not read the target: {error}"]


def verify(host, settings: Settings, root: str) -> dict[str, list[str]]:
    """Every layer's mismatches, by layer name, in stage order (all empty: the target matches)."""
    return {name: check_layer(layer, host, settings, root) for name, layer in LAYERS}


def command(hosts: str, data: dict[str, Any], ssh_config: str | None = None) -> list[str]:
    """The verification command (argv, run from the project folder) for a testinfra ``hosts``
    string and inventory ``data`` given as a deploy's ``--data`` (non-strings as JSON; e.g.
    ``tabula_root`` to say where the installed system is)."""
    argv = [sys.executable, "-m", "pytest", "tests/verify", f"--hosts={hosts}", "-p", "no:cacheprovider"]
    if ssh_config:
        argv.append(f"--ssh-config={ssh_config}")
    for key, value in data.items():
        argv += ["--tabula-data", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return argv
