"""The disko export, fast: disko.nix parses, and its nodes carry what Tabula's own operations use
(luksFormat arguments, dataset properties, partition order); tests/nix/test_disko.py evaluates it
with disko's module."""
import json
import shlex
import subprocess

import pytest

from operations import disko, luks, zfs
from operations.diskolit import DiskoError, disko_size
from operations.profile import Dataset, Pool, Vdev, available_profiles, load_profile
from operations.secrets import Secret
from tests import profile_cases

# disko.nix is a module function: these stand in for the module arguments it uses.
ARGS = '{ config = { disko.rootMountPoint = "/mnt"; }; lib = { escapeShellArg = x: "\'" + x + "\'"; }; }'


def exported(profile, tmp_path) -> dict:
    path = tmp_path / "disko.nix"
    path.write_text(disko.render(profile))
    done = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E", f"import {path} {ARGS}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(params=available_profiles())
def case(request, tmp_path):
    profile = load_profile(request.param, profile_cases.render_vars(request.param))
    return profile, exported(profile, tmp_path)


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_partitions_in_profile_order_with_label_type_and_size(case):
    profile, module = case
    for key, disk in profile.disks.items():
        node = module["disko"]["devices"]["disk"][key]
        assert node["device"] == disk.device
        parts = node["content"]["partitions"]
        ordered = sorted(parts.values(), key=lambda p: p["priority"])
        assert [p["label"] for p in ordered] == [p.label for p in disk.partitions]
        for want, got in zip(disk.partitions, ordered):
            assert got["type"] == want.type
            assert got["size"] == ("100%" if want.size == "rest" else disko_size(want.size_bytes))


def test_luks_format_arguments_are_tabulas(case):
    profile, module = case
    nodes = {n["name"]: n for n in walk(module) if isinstance(n, dict) and n.get("type") == "luks"}
    assert sorted(nodes) == sorted(l.mapper for _, l in profile.luks_devices())
    for part, container in profile.luks_devices():
        command = luks.format_command(part.device, container, Secret("x", "test")).get_raw_value()
        assert shlex.join(nodes[container.mapper]["extraFormatArgs"]) in command
        assert nodes[container.mapper]["settings"] == {
            k: True for k, on in (("allowDiscards", container.allow_discards),
                                  ("bypassWorkqueues", container.bypass_workqueues)) if on}


def test_datasets_carry_tabulas_properties_and_empty_snapshot_hooks(case):
    profile, module = case
    for pool in profile.pools.values():
        node = module["disko"]["devices"]["zpool"][pool.name]
        assert node["rootFsOptions"] == pool.root_properties
        assert node["options"] == {**pool.options, "cachefile": "none"}
        assert [v["mode"] for v in node["mode"]["topology"]["vdev"]] == \
            [("" if v.mode == "stripe" else v.mode) for v in pool.vdevs]
        for ds in pool.datasets:
            got = node["datasets"][ds.name]
            want = {**zfs.dataset_properties(ds), **(ds.encryption.model_dump() if ds.encryption else {})}
            assert got["options"] == want
            assert got.get("mountpoint") == ds.mountpoint
            assert ("zfs snapshot" in got.get("postCreateHook", "")) == ds.empty_snapshot


def test_needed_for_boot_and_binds_only_beside_disko_devices(case):
    profile, module = case
    assert not [n for n in walk(module["disko"]) if isinstance(n, dict) and "neededForBoot" in n]
    beside = module.get("fileSystems", {})
    assert sorted(mp for mp, fs in beside.items() if fs.get("neededForBoot")) == \
        sorted(m.mountpoint for m in profile.all_mounts() if m.needed_for_boot)
    binds = {m.mountpoint: m for m in profile.all_mounts() if "bind" in m.options}
    assert {mp: fs["device"] for mp, fs in beside.items() if "device" in fs} == {mp: m.device for mp, m in binds.items()}
    hooks = "".join(n.get("postMountHook", "") for n in walk(module["disko"]) if isinstance(n, dict))
    for mountpoint, mount in binds.items():
        assert f'mount --bind "$root"{mount.device} "$root"{mountpoint}' in hooks


def test_a_mounted_dataset_without_mountpoint_cannot_be_exported():
    pool = Pool(name="p", vdevs=[Vdev(members=["a"])], datasets=[Dataset(name="data")])
    with pytest.raises(DiskoError, match="p/data has no mountpoint"):
        zfs.dataset_node(pool, pool.datasets[0])


def test_sizes():
    assert [disko_size(n) for n in (2**30, 32 * 2**30, 512 * 2**20, 3 * 2**10)] == ["1G", "32G", "512M", "3K"]
    with pytest.raises(DiskoError):
        disko_size(1000)
