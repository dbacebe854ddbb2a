"""The disko export (disko.nix) against disko's own NixOS module from the offline kit.

For every profile, two systems are evaluated with the kit (``../shared/nix``):

- Tabula's: the files the deploy writes, hardware-configuration.nix with real-looking UUIDs (as
  BlockDeviceIds gives them on the target);
- disko's: the same configuration, its hardware-configuration.nix without storage, plus disko's
  module (``disko-2024-11/module.nix``, what ``disko.nixosModules.disko`` imports) and the
  exported disko.nix; down to ``config.system.build.toplevel.drvPath`` and the drvPath of disko's
  format-and-mount script, whose create and mount shell code must also pass ``bash -n``.

Then ``config.fileSystems``, ``config.swapDevices`` and ``config.boot.initrd.luks.devices``, read
back whole (every option of every entry, as the module system merged them), must be equal mount
point by mount point and option by option. Normalised, and only this:

- devices are compared by what they identify: Tabula names a partition by-uuid (by-partuuid for
  random-key swap), disko by-partlabel; both become the partition's label. What NixOS derives
  from a swap device's path (``deviceName``, ``realDevice``) follows the same mapping;
- disko appends ``subvol=`` to a subvolume's options, Tabula puts it first: its place is ignored
  (mount(8) reads options in order; ``subvol=`` conflicts with none of the others).

Real differences are named in ``EXCEPTIONS``, each asserted where it applies.
"""
from __future__ import annotations

import json
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from operations import disko
from operations.nixeval import write_tree
from operations.nixfiles import HARDWARE_SKELETON, id_devices, render_files
from operations.profile import available_profiles, load_profile
from tests.nix.evaluation import kit_evaluate
from tests import profile_cases
from tools import nixkit

# One evaluation per profile: the base is Tabula's configuration with hardware-configuration.nix
# storage-free and disko's module imported (no devices: it adds nothing); extended once with
# Tabula's real hardware-configuration.nix and once with disko.nix, it gives both systems.
APPLY = """sys: let
  lib = sys.pkgs.lib;
  extend = files: sys.extendModules { modules = map (f: /. + f) files; };
  tabula = extend [ TABULA ];
  disko = extend [ DISKO ];
  # every option of an entry that has a value (an unset one without default throws when read);
  # each level is forced on its own: a submodule's _module (its pkgs) is never forced
  defined = v: let t = builtins.tryEval v; in t.success && !(builtins.isFunction t.value);
  clean = x: if builtins.isAttrs x then lib.mapAttrs (_: clean) (lib.filterAttrs (n: v: n != "_module" && defined v) x)
    else if builtins.isList x then map clean x else x;
  storage = c: {
    fileSystems = clean c.fileSystems;
    swapDevices = clean c.swapDevices;
    luks = clean c.boot.initrd.luks.devices;
  };
in {
  tabula = storage tabula.config;
  disko = storage disko.config // {
    drvPath = disko.config.system.build.toplevel.drvPath;
    formatMount = disko.config.system.build.formatMount.drvPath;
    create = disko.config.disko.devices._create;
    mount = disko.config.disko.devices._mount;
  };
}"""

# What disko cannot express, as the test finds it (README, "Export to disko").
EXCEPTIONS = {
    "swapfile-size": "disko makes the swapfile at format time (btrfs filesystem mkswapfile --size) and leaves "
                     "swapDevices.size unset; Tabula's entry carries size (MiB), so NixOS would make a missing "
                     "file at boot",
}


def fake_ids(profile) -> dict:
    """BlockDeviceIds as the target would answer for the profile's partitions."""
    return {device: {"UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, "uuid" + device)),
                     "PARTUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, "partuuid" + device))}
            for device in id_devices(profile)}


class Case:
    def __init__(self, name: str, scratch: Path):
        self.profile = load_profile(name, profile_cases.render_vars(name))
        self.module = self.profile.nixos.hardware_module
        self.ids = fake_ids(self.profile)
        files = render_files(self.profile, None, self.ids, hardware_module=self.module)
        self.disko_nix = disko.render(self.profile)
        self.folder = scratch / name
        write_tree(self.folder, {**files, "hardware-configuration.nix": HARDWARE_SKELETON})
        extensions = scratch / f"{name}-modules"
        write_tree(extensions, {"hardware-configuration.nix": files["hardware-configuration.nix"],
                                "disko.nix": self.disko_nix})
        self.apply = APPLY.replace("TABULA", json.dumps(str(extensions / "hardware-configuration.nix"))) \
                          .replace("DISKO", json.dumps(str(extensions / "disko.nix")))
        self.value = None
        self.error: AssertionError | None = None

    def evaluate(self):
        disko_module = nixkit.setup_for(self.module).inputs["disko"] + "/module.nix"
        try:
            self.value = kit_evaluate(self.folder, self.profile.nixos.hostname, self.module, self.apply,
                                      extra_modules=(disko_module,))
        except AssertionError as error:
            self.error = error

    def values(self) -> tuple[dict, dict]:
        if self.error:
            raise self.error
        return self.value["tabula"], self.value["disko"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, Case]:
    """Every profile evaluated once, two at a time (one nix eval keeps one core busy)."""
    scratch = tmp_path_factory.mktemp("disko")
    cases = {name: Case(name, scratch) for name in available_profiles()}
    # Nix 2.8's Boehm collector segfaults in this evaluation (three systems in one process;
    # light-tmpfs-f2fs crashed at every try): the collector is off for these evaluations.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GC_DONT_GC", "1")
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda case: case.evaluate(), cases.values()))
    return cases


@pytest.fixture(params=available_profiles())
def case(request, evaluated) -> Case:
    return evaluated[request.param]


# --- normalising ----------------------------------------------------------------------------------


def identity(path, case: Case):
    """A device path -> what it identifies: ("partition", label) for a partition by UUID,
    PARTUUID or partlabel; anything else (/dev/mapper/x, a dataset, a bind source) as it is."""
    if not isinstance(path, str):
        return path
    for device, ids in case.ids.items():
        label = device.removeprefix("/dev/disk/by-partlabel/")
        if path in (device, f"/dev/disk/by-uuid/{ids['UUID']}", f"/dev/disk/by-partuuid/{ids['PARTUUID']}"):
            return ("partition", label)
    return path


def normal_file_system(entry: dict, case: Case) -> dict:
    entry = dict(entry, device=identity(entry["device"], case))
    options = list(entry.get("options") or [])
    subvol = [o for o in options if o.startswith("subvol=")]
    entry["options"] = subvol + [o for o in options if not o.startswith("subvol=")]
    return entry


def swap_device_name(device: str) -> str:
    """NixOS's swapDevices.*.deviceName: the path, "-" as x2d, "/" as "-"."""
    return device.removeprefix("/").replace("-", "x2d").replace("/", "-")


def normal_swap(entry: dict, case: Case) -> dict:
    device = entry["device"]
    # NixOS derives these two from the device path: checked, then compared as "derived"
    assert entry["deviceName"] == swap_device_name(device), entry
    mapper = f"/dev/mapper/{entry['deviceName']}"
    assert entry["realDevice"] == (mapper if entry["randomEncryption"]["enable"] else device), entry
    return dict(entry, device=identity(device, case), deviceName="<derived>", realDevice="<derived>")


def normal_luks(entry: dict, case: Case) -> dict:
    return dict(entry, device=identity(entry["device"], case))


# --- the tests ------------------------------------------------------------------------------------


def test_every_profile_is_exported_and_evaluated(evaluated):
    assert set(evaluated) == set(available_profiles()) and evaluated


def test_disko_configuration_evaluates_to_a_system(case):
    _, disko_side = case.values()
    for key in ("drvPath", "formatMount"):
        assert disko_side[key].startswith("/nix/store/") and disko_side[key].endswith(".drv"), key
    assert f"-nixos-system-{case.profile.nixos.hostname}-" in disko_side["drvPath"]


def test_disko_scripts_are_valid_shell(case):
    """disko's create and mount code (with the export's hooks) parses as bash."""
    _, disko_side = case.values()
    for key in ("create", "mount"):
        done = subprocess.run(["bash", "-n"], input=disko_side[key], text=True, capture_output=True)
        assert done.returncode == 0, f"{key}: {done.stderr}"


def test_file_systems_are_equal(case):
    tabula, disko_side = case.values()
    want = {mp: normal_file_system(fs, case) for mp, fs in tabula["fileSystems"].items()}
    got = {mp: normal_file_system(fs, case) for mp, fs in disko_side["fileSystems"].items()}
    assert sorted(got) == sorted(want)
    for mountpoint in want:
        for option in sorted(set(want[mountpoint]) | set(got[mountpoint])):
            assert got[mountpoint].get(option) == want[mountpoint].get(option), f"fileSystems.{mountpoint}.{option}"


def test_initrd_luks_devices_are_equal(case):
    tabula, disko_side = case.values()
    want = {name: normal_luks(d, case) for name, d in tabula["luks"].items()}
    got = {name: normal_luks(d, case) for name, d in disko_side["luks"].items()}
    assert sorted(got) == sorted(want) == sorted(l.mapper for _, l in case.profile.luks_devices())
    for name in want:
        for option in sorted(set(want[name]) | set(got[name])):
            assert got[name].get(option) == want[name].get(option), f"boot.initrd.luks.devices.{name}.{option}"


def test_swap_devices_are_equal_but_the_swapfile_size(case):
    tabula, disko_side = case.values()
    want = [normal_swap(s, case) for s in tabula["swapDevices"]]
    got = [normal_swap(s, case) for s in disko_side["swapDevices"]]
    key = lambda s: str(s["device"])  # noqa: E731 (disko lists the btrfs swapfiles first)
    want, got = sorted(want, key=key), sorted(got, key=key)
    assert [s["device"] for s in got] == [s["device"] for s in want]
    swapfiles = {f"{s.mountpoint}/swapfile": s.swapfile for _, fs in case.profile.filesystems()
                 for s in fs.subvolumes if s.swapfile}
    for w, g in zip(want, got):
        if w["device"] in swapfiles:
            # EXCEPTIONS["swapfile-size"]
            assert w["size"] == swapfiles[w["device"]].size_bytes // 2**20 and g["size"] is None, w["device"]
            w, g = dict(w, size=None), dict(g, size=None)
        for option in sorted(set(w) | set(g)):
            assert g.get(option) == w.get(option), f"swapDevices {w['device']}: {option}"


def test_blank_snapshots_and_log_vdevs_are_in_the_create_script(case):
    """What disko has no node option for is done by the export's hooks, in disko's own script."""
    _, disko_side = case.values()
    create = disko_side["create"]
    for _, fs in case.profile.filesystems():
        for sub in fs.subvolumes:
            if sub.blank_snapshot:
                assert f'btrfs subvolume snapshot -r "$top"/{sub.path} "$top"/{sub.blank_snapshot}' in create
    for pool in case.profile.pools.values():
        for ds in pool.datasets:
            assert (f"zfs snapshot {pool.name}/{ds.name}@empty" in create) == ds.empty_snapshot, ds.name
        for label in pool.log:
            assert f"zpool add {pool.name} log /dev/disk/by-partlabel/{label}" in create
        for vdev in pool.vdevs:
            if vdev.mode != "stripe":
                assert f'entries+=("{vdev.mode}=' in create
