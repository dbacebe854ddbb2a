"""Dry plans (``pyinfra --dry``) for every profile, in the live VM: on blank disks, with a confirmed
wipe of a disk holding foreign data, and of the profile installed and converged. Each plan must
show the steps that would run, by their short names, and what each would do, in the steps' own
output (the wipe as a step of its own, saying what it destroys), run no operation's command, and
leave every disk byte-identical (tests/e2e/faults.disk_checksums).

What a plan from blank disks must show is written by hand in tests/profile_cases.yaml (``plan``),
not computed by the code under test. A converged plan is also checked at the end of each fault
chain (tests/e2e/test_faults.py), with the pools exported.
"""
from __future__ import annotations

import json

import pytest

from tests import profile_cases
from tests.e2e.faults import dry_plan
from tests.e2e.states import new_secrets, secrets_env
from tests.e2e.test_faults import SERIALS, profile_vars


def args(profile: str, variables: dict, confirm: list[str] | None = None) -> list[str]:
    extra = ["--data", f"tabula_confirm_wipe={json.dumps(confirm)}"] if confirm else []
    return ["-vv", "--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}",
            *extra, "deploy.py"]


def assert_shows(rows: dict[str, bool], plan: dict, output: str) -> None:
    # (the NixOS files are rendered once the target's UUIDs exist: planned, with no change yet)
    assert any(name.startswith("NixOS configuration in /mnt/etc/nixos") for name in rows), list(rows)
    for step in plan["steps"]:
        found = [name for name in rows if name.startswith(step)]
        assert found, f"the plan lacks {step!r}: {list(rows)}"
        assert any(rows[name] for name in found), f"the plan shows {step!r} without change"
    lines = [line.strip() for line in output.splitlines()]
    for told in plan["tells"]:
        assert f"[install-target] {told}" in lines, f"the plan does not tell {told!r}"
    for warned in plan.get("warns", []):      # (pyinfra may print its own prefix before the host's)
        assert any(warned in line for line in lines), f"the plan does not warn {warned!r}"


@pytest.mark.parametrize("profile_name", profile_cases.profile_names())
def test_dry_plans_on_blank_disks_and_with_a_confirmed_wipe(profile_name, clean_disks, livevm):
    variables = profile_vars(livevm, profile_name)
    plan = profile_cases.dry_plan(profile_name)
    values = new_secrets()
    env = secrets_env(values)
    output, rows = dry_plan(livevm, args(profile_name, variables), SERIALS, env=env)
    assert_shows(rows, plan, output)
    assert "Detected changes" in output
    assert not any(secret in output for secret in values.values()), "a secret is in the plan's output"
    assert livevm.run(f"lsblk -lno TYPE {' '.join(livevm.disk_by_serial(s) for s in SERIALS)}").stdout.split() == \
        ["disk"] * len(SERIALS)
    assert not any(name.startswith("Wipe ") for name in rows)
    assert livevm.run("zpool list -H").stdout.strip() == ""
    assert livevm.run("ls /dev/mapper").stdout.split() == ["control"]

    # foreign data on one of the profile's disks, confirmed by its serial
    serial = profile_cases.foreign_disk(profile_name)
    disk = livevm.disk_by_serial(serial)
    stable = livevm.stable_path(serial)
    livevm.run(f"mkfs.ext4 -q -F -L family-photos {disk} && udevadm settle")
    output, rows = dry_plan(livevm, args(profile_name, variables, confirm=[serial]), SERIALS, env=env)
    wipes = [name for name in rows if name.startswith("Wipe ")]
    key = next(key for key, value in profile_cases.vm_disks(profile_name).items() if value == serial)
    assert wipes == [f"Wipe disks.{key}"] and rows[wipes[0]], rows
    # what it destroys: the step's own output in the plan
    said = [line for line in output.splitlines() if f"] wipe {stable} (confirmed), which holds: " in line]
    assert len(said) == 1 and "ext4 filesystem labelled 'family-photos'" in said[0], said
    # the wipe comes first, then the plan from blank disks
    assert list(rows).index(wipes[0]) < min(i for i, name in enumerate(rows) if name.startswith("GPT "))
    assert_shows(rows, plan, output)
    assert livevm.run(f"blkid -p -o value -s LABEL {disk}").stdout.strip() == "family-photos"


@pytest.mark.parametrize("profile_name", profile_cases.profile_names())
def test_dry_plan_of_the_installed_profile_changes_nothing(profile_name, installed, livevm):
    state = installed(profile_name)
    output, rows = dry_plan(livevm, state.args("-vv"), SERIALS, env=state.env())
    assert len(rows) > 8 and not any(rows.values()), rows
