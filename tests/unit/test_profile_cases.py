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


# What shows each kind of proof in a test's body: the gap report read from gaps.py's output, and
# a verification run that is asserted to fail.
PROOF_CALLS = {"gap_report": ("gap_report", "gaps", "assert_only_the_temp_writes_are_reported"),
               "drift": ("run_verification",)}


def called_names(function) -> set[str]:
    import ast
    return {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            for node in ast.walk(function) if isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))}


@pytest.mark.parametrize("name", profile_cases.profile_names())
def test_every_profile_has_a_gap_report_and_a_drift_check(name):
    """Every profile's gap report and drift check are named in its test data, and the named e2e
    test exists, runs the profile, and makes the calls that show them."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    proofs = profile_cases.proofs(name)
    assert set(proofs) == set(PROOF_CALLS), f"{name}: proofs lack {sorted(set(PROOF_CALLS) - set(proofs))}"
    for kind, node_id in proofs.items():
        path, function_name = node_id.split("::")
        source = (root / path).read_text()
        tree = ast.parse(source)
        functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        assert function_name in functions, f"{name}: {node_id} does not exist"
        function = functions[function_name]
        assert function_name.startswith("test_"), node_id
        assert name in source, f"{name}: {path} never names the profile"
        # what it calls, and what the helpers of its own file that it calls call
        calls = called_names(function)
        calls |= {inner for helper in calls & set(functions) for inner in called_names(functions[helper])}
        assert calls & set(PROOF_CALLS[kind]), f"{name}: {node_id} shows no {kind}"
