"""The states the e2e tests start from, each made once per VM boot and kept as a whole-VM snapshot
(``LiveVM.save_state``: the guest's RAM, devices and disks), then put back in seconds.

- ``blank``: the live system as booted, the installer's tools in place (the real
  nixos-generate-config, the nixos-install stand-in), all five target disks blank. Every test
  that starts from blank disks starts from it, so nothing a test before it did (a mount, a tool
  moved aside, a process left running) reaches it.
- ``installed(profile)``: the profile installed by Tabula from blank disks with the user's
  defaults and the test data of ``tests/profile_cases.yaml`` (``vm:``; ``snapshot_disks`` where
  the profile's own disks include the NVMe, which a VM snapshot cannot hold while it is in use),
  ZFS pools kept imported so the target can be read. The install run is a real deploy with fresh
  random secrets, at -vvv --debug, while a sampler in the guest records every process's command
  line; the secrets, the output and the command lines are kept beside the snapshot (a 0600 file in
  the VM's state folder) for the tests that assert on them (tests/e2e/test_secrets.py).

A state is named after everything that decides it (the project's deploy code, profiles and
templates, the test bed's guest files, the data), so a changed tree never reuses a state made by
another one. Only tests start from states; the fault chains, the dry plans and the install proofs
start from blank disks, as a user does.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests import profile_cases
from tests.e2e.faults import CmdlineSampler
from tools.livevm import PROJECT_DIR, LiveVM, SavevmHung, project_files

# What decides a state, besides its data: the deploy (code, profiles, templates) and the test bed.
STATE_SOURCES = ("deploy.py", "operations/", "profiles/", "templates/", "group_data/", "tools/guest/",
                 "tools/livevm.py", "tools/nixkit.py")
PYINFRA = Path(sys.executable).parent / "pyinfra"


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in project_files():
        if name.startswith(STATE_SOURCES):
            digest.update(name.encode() + b"\0" + (PROJECT_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def state_name(kind: str, data: object = None) -> str:
    """``kind-<digest>``: the digest of the state's sources and data (QEMU keeps names short)."""
    digest = hashlib.sha256((_sources_digest() + json.dumps(data, sort_keys=True)).encode()).hexdigest()[:12]
    return f"{kind}-{digest}"


SECRET_NAMES = ("TABULA_LUKS_PASSPHRASE", "TABULA_ZFS_KEY", "TABULA_ROOT_PASSWORD_HASH",
                "TABULA_USER_PASSWORD_HASH")


def new_secrets() -> dict[str, str]:
    """Fresh random test secrets (a hit anywhere can only be a leak of these)."""
    return {"TABULA_LUKS_PASSPHRASE": "luks-" + secrets.token_hex(12),
            "TABULA_ZFS_KEY": "zfs-" + secrets.token_hex(12),
            "TABULA_ROOT_PASSWORD_HASH": "$6$" + secrets.token_hex(8) + "$" + secrets.token_hex(43),
            "TABULA_USER_PASSWORD_HASH": "$6$" + secrets.token_hex(8) + "$" + secrets.token_hex(43)}


def secrets_env(values: dict[str, str]) -> dict[str, str | None]:
    """Secrets as the controller's environment: the values, every ``*_FILE`` unset."""
    return {**values, **{f"{key}_FILE": None for key in SECRET_NAMES}}


def with_env(env: dict[str, str | None]) -> dict[str, str]:
    merged = {**os.environ, **env}
    return {key: value for key, value in merged.items() if value is not None}


def restore_or_make(vm: LiveVM, name: str, make) -> None:
    """Put the VM back to state ``name``; the first time, ``make()`` it and save it (a state of an
    earlier tree, with another digest, is dropped first)."""
    states = vm.states()
    if name in states:
        vm.load_state(name)
        return
    kind = name.rsplit("-", 1)[0]
    for stale in states:
        if stale.rsplit("-", 1)[0] == kind:
            vm.delete_state(stale)
    make()
    try:
        vm.save_state(name)
    except SavevmHung:
        make()                      # on the VM booted afresh (the save hung, rarely: livevm.SavevmHung)
        vm.save_state(name)


def blank(vm: LiveVM) -> None:
    """The VM as a user's freshly booted installer with blank target disks."""
    def make() -> None:
        vm.install_standins()
        vm.reset_disks()
    restore_or_make(vm, state_name("blank"), make)


@dataclass(frozen=True)
class Installed:
    """A profile installed by Tabula from blank disks (the VM is in that state now)."""

    profile: str
    variables: dict
    data: dict              # every --data of the install, tabula_vars included
    secrets: dict           # the install's secrets (fresh random values, made with the state)
    output: str             # the install run's output (-vvv --debug: every command echoed, and more)
    cmdlines: str           # every process command line the guest ran during the install (sampled)

    def args(self, *extra: str, deploy: str = "deploy.py", **data) -> list[str]:
        """pyinfra arguments for another run with the install's data (``data`` overrides)."""
        merged = {**self.data, **data}
        return [*extra, *(x for key, value in merged.items() for x in ("--data", f"{key}={json.dumps(value)}")),
                deploy]

    def env(self) -> dict[str, str | None]:
        """The install's secrets as the controller's environment (``*_FILE`` unset)."""
        return secrets_env(self.secrets)


def installed_vars(vm: LiveVM, profile: str) -> dict:
    """The profile's live-VM vars for an installed state (its snapshot disks)."""
    return profile_cases.vm_vars(profile, vm.stable_path, snapshot=True)


def installed(vm: LiveVM, profile: str) -> Installed:
    """Put the VM in the state "``profile`` installed" (made once: blank disks, then a deploy with
    the user's defaults but the pools kept imported, at -vvv --debug while a sampler in the guest
    records every command line, for tests/e2e/test_secrets.py)."""
    variables = installed_vars(vm, profile)
    data = {"tabula_profile": profile, "tabula_vars": variables, "tabula_export_pools": False}
    name = state_name(f"installed-{profile}", data)
    # kept beside the VM's disks, never in the repository; 0600 (it holds the state's secrets)
    record = vm.state_dir / f"{name}.record"

    def make() -> None:
        blank(vm)
        values = new_secrets()
        argv = [str(PYINFRA), "-y", *vm.pyinfra_args(),
                *Installed(profile, variables, data, values, "", "").args("-vvv", "--debug")]
        sampler = CmdlineSampler(vm)
        sampler.start()
        try:
            result = subprocess.run(argv, cwd=PROJECT_DIR, env=with_env(secrets_env(values)), capture_output=True,
                                    text=True, stdin=subprocess.DEVNULL, timeout=1800)
        finally:
            cmdlines = sampler.stop()
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise AssertionError(f"the install of {profile} for its state failed:\n{output[-8000:]}")
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"secrets": values, "output": output, "cmdlines": cmdlines}, f)

    restore_or_make(vm, name, make)
    kept = json.loads(record.read_text())
    return Installed(profile, variables, data, kept["secrets"], kept["output"], kept["cmdlines"])
