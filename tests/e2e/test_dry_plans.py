"""Dry plans (``pyinfra --dry``) for every profile, in the live VM: on blank disks and with a
confirmed wipe of a disk holding foreign data. Each plan must show the steps that would run, by
their short names, and what each would do, in the steps' own output (the wipe as a step of its
own, saying what it destroys), run no operation's command, and leave
every disk byte-identical (checksums of the first 4 MiB and the last MiB). The plan of an
installed and converged target is checked at the end of each fault chain (tests/e2e/test_faults.py),
where every profile is installed and converged anyway: every step there shows no change.

zephyrus-btrfs on blank disks: tests/e2e/test_btrfs_profile.py::test_dry_plan_executes_nothing.
"""
from __future__ import annotations

import json

import pytest

from operations import gpt, mounts, zfs
from operations.profile import load_profile
from tests.e2e.faults import dry_plan
from tests import profile_cases
from tests.e2e.test_faults import SECRETS, SERIALS, profile_vars


@pytest.fixture
def secrets_env(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
        monkeypatch.delenv(f"{key}_FILE", raising=False)


def args(profile: str, variables: dict, confirm: list[str] | None = None) -> list[str]:
    extra = ["--data", f"tabula_confirm_wipe={json.dumps(confirm)}"] if confirm else []
    return ["-vv", "--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}",
            *extra, "deploy.py"]


def expected_steps(profile) -> list[str]:
    """Steps every plan from blank (or wiped) disks shows as changes, from the profile itself."""
    steps = [f"GPT disks.{key}" for key in profile.disks]
    steps += ["Mounts under /mnt", "nixos-generate-config", "Persist host identity", f"nixos-install {profile.nixos.hostname}"]
    for pool in profile.pools.values():
        steps += [f"ZFS pool {pool.name}", f"ZFS export {pool.name}"]
        steps += [f"ZFS dataset {pool.name}/{ds.name}" for ds in pool.datasets]
    for _part, luks in profile.luks_devices():
        steps.append(f"LUKS open {luks.mapper}")
    return steps


def expected_details(profile) -> list[str]:
    """What those steps tell they would do (their own output, printed while the plan is made)."""
    told = [f"a new GPT on {disk.device}: partitions {gpt.describe(disk)}" for disk in profile.disks.values()]
    told += [f"mount {mounts.describe(m)}" for m in profile.all_mounts()]
    told += [f"create pool {pool.name}: {zfs.describe_topology(pool)}" for pool in profile.pools.values()]
    return told


def assert_shows(rows: dict[str, bool], steps: list[str], output: str = "", details: list[str] = ()) -> None:
    # (the NixOS files are rendered once the target's UUIDs exist: planned, with no change yet)
    assert any(name.startswith("NixOS configuration in /mnt/etc/nixos") for name in rows), list(rows)
    for step in steps:
        found = [name for name in rows if name.startswith(step)]
        assert found, f"the plan lacks {step!r}: {list(rows)}"
        assert any(rows[name] for name in found), f"the plan shows {step!r} without change"
    lines = [line.strip() for line in output.splitlines()]
    for detail in details:
        assert any(line.startswith(f"[install-target] {detail}") for line in lines), f"the plan does not tell {detail!r}"


@pytest.mark.parametrize("profile_name", profile_cases.profile_names())
def test_dry_plans_on_blank_disks_and_with_a_confirmed_wipe(profile_name, clean_disks, livevm, secrets_env):
    variables = profile_vars(livevm, profile_name)
    profile = load_profile(profile_name, variables)
    steps = expected_steps(profile)

    if profile_name != "zephyrus-btrfs":          # (its blank plan: test_btrfs_profile.py)
        output, rows = dry_plan(livevm, args(profile_name, variables), SERIALS)
        assert_shows(rows, steps, output, expected_details(profile))
        assert not any(name.startswith("Wipe ") for name in rows)
    assert livevm.run("zpool list -H").stdout.strip() == ""

    # foreign data on one of the profile's disks, confirmed by its serial
    serial = profile_cases.foreign_disk(profile_name)   # tests/profile_cases.yaml
    disk = livevm.disk_by_serial(serial)
    livevm.run(f"mkfs.ext4 -q -F -L family-photos {disk} && udevadm settle")
    output, rows = dry_plan(livevm, args(profile_name, variables, confirm=[serial]), SERIALS)
    wipes = [name for name in rows if name.startswith("Wipe ")]
    key = next(key for key, d in profile.disks.items() if d.device == livevm.stable_path(serial))
    assert wipes == [f"Wipe disks.{key}"] and rows[wipes[0]], rows
    # what it destroys: the step's own output in the plan
    said = [line for line in output.splitlines() if f"] wipe {livevm.stable_path(serial)} (confirmed), which holds: " in line]
    assert len(said) == 1 and "ext4 filesystem labelled 'family-photos'" in said[0], said
    # the wipe comes first, then the plan from blank disks
    assert list(rows).index(wipes[0]) < min(i for i, name in enumerate(rows) if name.startswith("GPT "))
    assert_shows(rows, steps, output, expected_details(profile))
    assert livevm.run(f"blkid -p -o value -s LABEL {disk}").stdout.strip() == "family-photos"
