"""tests/profile_cases.yaml, the per-profile test data: one entry per profile, each usable as is."""
from __future__ import annotations

import pytest

from operations.profile import available_profiles, load_profile
from tests import profile_cases
from tools.livevm import TARGET_DISKS

VM_SERIALS = {serial for serial, _size, _device in TARGET_DISKS}


def test_every_profile_has_test_data():
    assert profile_cases.profile_names() == available_profiles(), \
        f"profiles and the entries of {profile_cases.CASES_FILE.name} differ"


@pytest.mark.parametrize("name", profile_cases.profile_names())
def test_test_data_loads_the_profile(name):
    assert load_profile(name, profile_cases.render_vars(name)).name == name
    for module in profile_cases.hardware_modules(name):
        assert module is None or isinstance(module, str)


@pytest.mark.parametrize("name", profile_cases.profile_names())
def test_vm_data_names_the_vm_disks(name):
    serials = profile_cases.vm_serials(name)
    assert set(serials) <= VM_SERIALS and len(set(serials)) == len(serials), serials
    assert profile_cases.foreign_disk(name) in serials
    variables = profile_cases.vm_vars(name, lambda serial: f"/dev/disk/by-id/virtio-{serial}")
    profile = load_profile(name, variables)
    assert {disk.device for disk in profile.disks.values()} == {f"/dev/disk/by-id/virtio-{s}" for s in serials}


@pytest.mark.parametrize("name", profile_cases.profile_names())
def test_every_profile_has_a_hand_written_dry_plan(name):
    plan = profile_cases.dry_plan(name)
    assert plan["steps"] and plan["tells"], f"{name}: its dry plan (vm.plan) lacks steps or tells"
    assert all(isinstance(line, str) and line for line in plan["steps"] + plan["tells"])


@pytest.mark.parametrize("name", profile_cases.profile_names())
def test_the_registry_checks_the_layers_written_for_the_profile(name):
    """A wrong ``applies`` would skip a layer's checks and still say "matches": the layers the
    registry applies to the profile are the ones its test data names, in the same order."""
    from operations.verify import LAYERS
    profile = load_profile(name, profile_cases.render_vars(name))
    assert [layer_name for layer_name, layer in LAYERS if layer.applies(profile)] == profile_cases.verified_layers(name)
