"""A fleet: two hosts with different profiles in one pyinfra run stay isolated. pyinfra's own
State, Inventory and operation planning (as ``pyinfra alpha,beta deploy.py --dry`` plans), each
host's facts answered from a table of its own; each host gets a Run of its own, and its plan
(every step's told line and change) is exactly the plan it gets alone.

Why here and not in the live VM: every profile installs under /mnt, so two hosts aimed at one VM
would share a target; and a VM adds minutes where this proves the same isolation (no run state
in any module; tests/unit/test_contract.py checks that) in a second."""
from __future__ import annotations

import logging

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_host, ctx_state

from operations import disks, gpt, mounts, stages
from operations.layers import LAYERS
from operations.nixos import DmiProductName
from operations.settings import load_settings
from operations.target import WholeDiskSignature
from tests import profile_cases
from tests.unit.pyinfra_fake import FakeHost

HASH = "$6$saltsalt$" + "x" * 86
SECRETS = {"TABULA_LUKS_PASSPHRASE": "correct horse", "TABULA_ZFS_KEY": "battery staple",
           "TABULA_ROOT_PASSWORD_HASH": HASH, "TABULA_USER_PASSWORD_HASH": HASH}
PROFILES = {"alpha": "zephyrus-btrfs", "beta": "zfs-raidz1"}


def blank_target(profile_name: str, mounted: dict) -> dict:
    """Facts of a target whose profile disks are blank; ``mounted``: its /proc/mounts."""
    profile = load_settings(host_data(profile_name)).profile
    devices, table = [], {}
    for index, disk in enumerate(profile.disks.values()):
        kernel = f"/dev/vd{chr(ord('a') + index)}"
        devices.append({"name": kernel, "type": "disk", "size": 1 << 42, "serial": disk.serial, "partlabel": None,
                        "fstype": None, "label": None, "parent": None, "mountpoints": []})
        table[(disks.StablePath, frozenset({("path", disk.device)}))] = {"device": kernel, "by_id": []}
    needed = disks.required_tools(profile, True, LAYERS)
    table.update({disks.ToolsPresent: {"commands": sorted(needed), "modules": ["zfs"]}, disks.BlockDevices: devices,
                  disks.ActiveSwaps: [], disks.ImportedPoolVdevs: {}, gpt.PartitionTable: None,
                  WholeDiskSignature: {}, mounts.Mounts: mounted, DmiProductName: ""})
    return table


def host_data(profile_name: str) -> dict:
    return {"tabula_profile": profile_name, "tabula_vars": profile_cases.render_vars(profile_name),
            "tabula_install": True, "tabula_nix_check": False}


def beta_root_mounted() -> dict:
    """beta's /mnt already holds its root dataset (a run cut short): its plan says so, alpha's must not."""
    pool = load_settings(host_data("zfs-raidz1")).profile.pools["rpool"].name
    return {"/mnt": {"device": f"{pool}/temp/root", "fstype": "zfs", "options": ["rw", "nosuid", "nodev", "noatime"]}}


FACTS = {"alpha": lambda: blank_target("zephyrus-btrfs", {}),
         "beta": lambda: blank_target("zfs-raidz1", beta_root_mounted())}


def plan(names: list[str], caplog) -> tuple[dict[str, list[str]], dict]:
    """Plan the deploy for these hosts in one pyinfra State: ({host: its told lines, noops and
    planned changes}, {host: its Run})."""
    state = State(Inventory(([(name, host_data(PROFILES[name])) for name in names], {})), Config())
    runs, lines = {}, {name: [] for name in names}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        for host in state.inventory:
            fake = FakeHost(FACTS[host.name]())
            host.get_fact = fake.get_fact                       # this host's target, and no other's
            host.noop = lambda text, name=host.name: lines[name].append(f"noop: {text}")
            with ctx_state.use(state), ctx_host.use(host):
                runs[host.name] = stages.deploy(load_settings(host.data))
    for record in caplog.records:
        for name in names:
            if record.getMessage().startswith(f"[{name}] "):
                lines[name].append(record.getMessage().split("] ", 1)[1].lstrip())
    for host in state.inventory:
        for op_hash in state.get_op_order():
            data = state.ops[host].get(op_hash)
            if data is not None:
                # (pyinfra shares an operation's meta between the hosts that call it at the same line:
                # each host's own name is in its own arguments)
                lines[host.name].append(f"{data.global_arguments['name']}: "
                                        f"{'change' if data.operation_meta.will_change else 'no change'}")
    return lines, runs


@pytest.fixture(autouse=True)
def secrets(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
        monkeypatch.delenv(f"{key}_FILE", raising=False)
    monkeypatch.setattr(disks, "_is_local_connector", lambda host: True)


def test_two_hosts_in_one_run_plan_what_each_plans_alone(caplog):
    together, runs = plan(["alpha", "beta"], caplog)
    alone = {name: plan([name], caplog)[0][name] for name in PROFILES}
    assert together == alone
    # what each plan shows is its own target's: alpha mounts its root at /mnt, beta finds its own there
    assert any(line.startswith("mount / at /mnt (btrfs /dev/mapper/cryptroot") for line in together["alpha"])
    assert "/mnt is already mounted as the profile says" in together["beta"]
    assert not [line for line in together["alpha"] if "already mounted" in line]
    assert any("create pool rpool-" in line for line in together["beta"])
    assert not any("cryptroot" in line for line in together["beta"])


def test_each_host_has_a_run_of_its_own(caplog):
    _, runs = plan(["alpha", "beta"], caplog)
    alpha, beta = runs["alpha"], runs["beta"]
    assert alpha is not beta and alpha.host.name == "alpha" and beta.host.name == "beta"
    assert alpha.profile.name == "zephyrus-btrfs" and beta.profile.name == "zfs-raidz1"
    # what each run made is its own: alpha's LUKS mapping and subvolumes, beta's pool
    made = {name: {thing.what for thing in run.phase().made} for name, run in runs.items()}
    assert "/dev/mapper/cryptroot" in made["alpha"] and not [m for m in made["alpha"] if m.startswith("rpool-")]
    assert any(m.startswith("rpool-") for m in made["beta"]) and "/dev/mapper/cryptroot" not in made["beta"]
    # the secrets each run read are those its layers use
    assert set(alpha.secrets) == {"LUKS_PASSPHRASE", "ROOT_PASSWORD_HASH", "USER_PASSWORD_HASH"}
    assert set(beta.secrets) == {"ZFS_KEY", "ROOT_PASSWORD_HASH", "USER_PASSWORD_HASH"}
