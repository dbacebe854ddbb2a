"""Every configuration Tabula writes evaluates in Nix's module system, against real nixpkgs.

For every profile, and for zephyrus-btrfs with each nixos-hardware module it may use, the files
of the review renderer (tools/render.py) are evaluated with the offline kit of ``../shared/nix``
down to ``config.system.build.toplevel.drvPath``, what nixos-install evaluates before it builds.
An evaluation error or warning fails (but the kit's one known trace). The assertions read the
merged, evaluated options back (``--json --apply``), not the text Tabula wrote.

Not proven here: that the system builds or boots (nothing can be built offline), nor anything
nixpkgs-unstable changed since 24.05 (the kit's compat modules map only the option names).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from operations.nixfiles import render_files
from operations.nixlit import stable_device, systemd_escape
from operations.profile import available_profiles, load_profile
from operations import persist, zfs
from tests.nix.evaluation import kit_evaluate
from tests import profile_cases

# (profile, nixos-hardware module), from tests/profile_cases.yaml: zephyrus-btrfs with the guide's
# 2024 G16, the 2025 G16 (what DMI GU605CW selects) and none; the other profiles with their own choice.
DEFAULT = profile_cases.PROFILE_DEFAULT
CASES = profile_cases.nix_cases()


def case_id(case) -> str:
    return f"{case[0]}-{case[1] or 'no-hardware-module'}".replace(f"-{DEFAULT}", "")


class Case:
    def __init__(self, profile_name: str, module):
        variables = profile_cases.render_vars(profile_name)
        if module != DEFAULT:
            variables["hardware_module"] = module
        self.profile = load_profile(profile_name, variables)
        self.module = self.profile.nixos.hardware_module
        self.files = render_files(self.profile, None, None, hardware_module=self.module, placeholder=True)
        self._value = None
        self._error = None

    def evaluate(self):
        try:
            self._value = kit_evaluate(self.files, self.profile.nixos.hostname, self.module)
        except AssertionError as error:
            self._error = error

    @property
    def value(self) -> dict:
        if self._error:
            raise self._error
        return self._value


@pytest.fixture(scope="session")
def evaluated() -> dict:
    """Every case evaluated once, two at a time (one nix eval keeps one core busy)."""
    cases = {case_id(c): Case(*c) for c in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda case: case.evaluate(), cases.values()))
    return cases


@pytest.fixture(params=CASES, ids=case_id)
def case(request, evaluated) -> Case:
    return evaluated[case_id(request.param)]


def test_every_profile_is_a_case():
    assert {name for name, _ in CASES} == set(available_profiles())


def test_configuration_evaluates_to_a_system(case):
    drv = case.value["drvPath"]
    assert drv.startswith("/nix/store/") and drv.endswith(".drv")
    assert f"-nixos-system-{case.profile.nixos.hostname}-" in drv
    assert case.value["hostName"] == case.profile.nixos.hostname


def test_file_systems_are_the_profile_mounts(case):
    fs = case.value["fileSystems"]
    for mount in case.profile.all_mounts():
        got = fs[mount.mountpoint]
        assert got["device"] == stable_device(mount.device, None, "UUID", placeholder=True), mount.mountpoint
        assert got["fsType"] == mount.fstype, mount.mountpoint
        assert set(mount.options) <= set(got["options"]), mount.mountpoint
        assert got["neededForBoot"] == mount.needed_for_boot, mount.mountpoint


def test_persistent_mounts_are_needed_for_boot(case):
    """Impermanence binds from the persistent root in stage 1: it must be mounted by then, and so
    must whatever holds the store and the logs ("/" is mounted in stage 1 anyway)."""
    fs = case.value["fileSystems"]
    persist = case.profile.persistence.root
    for mountpoint in (persist, "/nix", "/var/log"):
        assert fs[mountpoint]["neededForBoot"] is True, mountpoint


def test_impermanence_entries_are_the_profile(case):
    persistence = case.value["persistence"]
    root = case.profile.persistence.root
    assert list(persistence) == [root]
    assert persistence[root]["directories"] == case.profile.persistence.directories
    assert persistence[root]["files"] == case.profile.persistence.files
    # every entry becomes a bind mount from the persistent root
    for directory in case.profile.persistence.directories:
        assert case.value["fileSystems"][directory]["device"] == f"{root}{directory}"


def test_password_files_are_the_seeded_ones(case):
    """users.mutableUsers is false and the root is wiped: NixOS reads the hashes from exactly the
    files the persist stage seeds, or nobody can log in."""
    assert case.value["mutableUsers"] is False
    paths = persist.paths(case.profile)
    assert case.value["passwordFiles"] == paths.password_files
    assert all(path.startswith(paths.secrets_dir + "/") for path in case.value["passwordFiles"].values())


def test_ssh_host_keys_live_on_the_persistent_root(case):
    root = case.profile.persistence.root
    assert case.value["sshKeys"] == [f"{root}/etc/ssh/ssh_host_ed25519_key", f"{root}/etc/ssh/ssh_host_rsa_key"]


def test_initrd_luks_devices_are_the_profile_containers(case):
    luks = case.value["luks"]
    expected = {l.mapper: (part, l) for part, l in case.profile.luks_devices()}
    assert set(luks) == set(expected)
    for mapper, (part, container) in expected.items():
        assert luks[mapper]["device"] == stable_device(part.device, None, "UUID", placeholder=True)
        assert luks[mapper]["allowDiscards"] == container.allow_discards
        assert luks[mapper]["bypassWorkqueues"] == container.bypass_workqueues


def test_swap_devices(case):
    swaps = case.value["swapDevices"]
    expected = []
    for _, fs in case.profile.filesystems():
        for sub in fs.subvolumes:
            if sub.swapfile:
                expected.append({"device": f"{sub.mountpoint}/swapfile", "randomEncryption": False,
                                 "size": sub.swapfile.size_bytes // (1024 * 1024)})
    for device, swap in case.profile.swaps():
        expected.append({"device": stable_device(device, None, "PARTUUID", placeholder=True),
                         "randomEncryption": swap.random_encryption, "size": None})
    assert swaps == expected


def test_btrfs_rollback_runs_between_the_real_units(case):
    """The rollback service orders itself on unit names systemd really generates: the
    cryptsetup service of a LUKS device NixOS opens in the initrd, the device unit of what "/"
    is mounted from, and sysroot.mount, the initrd's unit for "/"."""
    blank = [sub for _, fs in case.profile.filesystems() for sub in fs.subvolumes if sub.blank_snapshot]
    services = case.value["initrdServices"]
    if not blank:
        assert not [name for name in services if name.startswith("rollback")]
        return
    assert case.value["initrdSystemd"] is True
    rollback = services["rollback"]
    root_device = case.value["fileSystems"]["/"]["device"]
    device_unit = f"{systemd_escape(root_device, path=True)}.device"
    mapper = root_device.removeprefix("/dev/mapper/")
    assert mapper in case.value["luks"], "the root's device is not a LUKS device the initrd opens"
    assert rollback["requires"] == [device_unit]
    assert set(rollback["after"]) == {device_unit, f"systemd-cryptsetup@{systemd_escape(mapper)}.service",
                                      "systemd-hibernate-resume.service"}
    assert rollback["before"] == ["sysroot.mount"]
    assert "initrd.target" in rollback["wantedBy"]


def test_zfs_rollback_import_host_id_and_credentials(case):
    profile = case.profile
    services = case.value["initrdServices"]
    if not profile.pools:
        assert "zfs" not in case.value["supportedFilesystems"]
        assert case.value["zfsRequestCredentials"] is None
        return
    assert "zfs" in case.value["supportedFilesystems"]
    assert case.value["hostId"] == profile.host_id == profile.hash
    encrypted = [f"{p.name}/{d.name}" for p in profile.pools.values() for d in p.datasets if d.encryption]
    assert case.value["zfsRequestCredentials"] == encrypted
    rollbacks = {name: s for name, s in services.items() if name.startswith("tabula-rollback")}
    if zfs.temp_datasets(profile):
        assert rollbacks, "temp datasets but no rollback service"
        for service in rollbacks.values():
            imports = [u for u in service["after"] if u.startswith("zfs-import-")]
            assert imports and set(imports) <= set(service["requires"])
            for unit in imports:
                # the import unit NixOS's ZFS module really generates for the pool
                assert unit.removesuffix(".service") in services, unit
                assert unit.removesuffix(".service").removeprefix("zfs-import-") in [p.name for p in profile.pools.values()]
            assert service["before"] == ["sysroot.mount"]


def test_unfree_packages_are_allowed_by_name_only(case):
    """Nothing unfree is allowed wholesale; the G16's NVIDIA driver evaluates because its
    packages are named (a missing name fails test_configuration_evaluates_to_a_system)."""
    assert case.value["allowUnfree"] is False
    if case.profile.name == "zephyrus-btrfs":
        assert "nixpkgs.config.allowUnfreePredicate" in case.files["configuration.nix"]
        assert set(case.profile.nixos.unfree_packages) >= {"nvidia-x11"}


def test_power_management_gives_way_to_the_hardware_module(case):
    """The 2025 G16's module enables TuneD, which turns power-profiles-daemon off; elsewhere the
    G16 extras keep power-profiles-daemon (a plain `true` conflicted with TuneD's `false`)."""
    if case.profile.nixos.extra_config != "zephyrus-extra.nix":
        return
    if case.module == "asus-zephyrus-gu605cw":
        assert case.value["tuned"] is True
        assert case.value["powerProfilesDaemon"] is False
    else:
        assert case.value["powerProfilesDaemon"] is True


def test_ssh_access_comes_from_data(case):
    n = case.profile.nixos
    expected = {user: keys for user, keys in ((n.user, n.authorized_keys), ("root", n.root_authorized_keys)) if keys}
    assert case.value["authorizedKeys"] == expected
    assert case.value["sshd"] == {"PermitRootLogin": "prohibit-password" if n.root_authorized_keys else "no",
                                  "PasswordAuthentication": n.ssh_password_login}
    if n.headless:
        assert expected or n.ssh_password_login, "a headless machine nobody can log in to"


def test_remote_unlock_has_its_own_host_key_and_the_users_keys(case):
    n = case.profile.nixos
    initrd = case.value["initrdSsh"]
    if not n.remote_unlock:
        assert initrd is None
        return
    initrd_key = persist.paths(case.profile).initrd_host_key
    assert initrd == {"port": n.remote_unlock_port, "hostKeys": [initrd_key],
                      "authorizedKeys": n.authorized_keys + n.root_authorized_keys, "network": True}
    assert initrd_key not in case.value["sshKeys"], "the system's host key in the initrd"
    assert initrd_key.startswith(case.profile.persistence.root + "/")


def test_home_is_persistent(case):
    """/home is a mount of its own on persistent storage: never a tmpfs, a temp dataset or the
    subvolume that is rolled back."""
    home = case.value["fileSystems"]["/home"]
    assert home["fsType"] in ("btrfs", "zfs"), home
    temp = set(zfs.temp_datasets(case.profile))
    assert home["device"] not in temp
    rolled_back = {f"subvol={s.path}" for _, fs in case.profile.filesystems() for s in fs.subvolumes if s.blank_snapshot}
    assert not rolled_back & set(home["options"])


def test_temp_on_tmpfs_is_bounded(case):
    """Every tmpfs holding temp data has a size= bound, and / and /tmp share one of them."""
    tmpfs = {mp: fs for mp, fs in case.value["fileSystems"].items() if fs["fsType"] == "tmpfs"}
    for mountpoint, fs in tmpfs.items():
        assert any(o.startswith("size=") for o in fs["options"]), mountpoint
    if "/" in tmpfs:
        assert "/tmp" not in tmpfs, "/tmp a tmpfs of its own beside a tmpfs root: two unbounded halves of the RAM"


RESUME = "systemd-hibernate-resume.service"     # an upstream unit of NixOS's systemd initrd (initrd.nix)


def assert_hibernation(profile, value: dict, offset: int | None = None) -> None:
    """Evaluated: with nixos.hibernate, the resume device is the profile's swap (a btrfs swapfile's
    filesystem with its offset, or a swap partition by partlabel), ZFS does not forbid it; without,
    no resume device, and NixOS's ZFS module puts nohibernate on the command line. Either way what
    empties the root at boot runs after the initrd tried to resume."""
    params = value["kernelParams"]
    rollbacks = {name: s for name, s in value["initrdServices"].items() if name.startswith(("rollback", "tabula-rollback"))}
    for name, service in rollbacks.items():
        assert RESUME in service["after"], name
    if not profile.nixos.hibernate:
        assert value["resumeDevice"] == "" and not [p for p in params if p.startswith("resume")]
        assert ("nohibernate" in params) == bool(profile.pools)
        return
    device, subvolume, _swap = profile.resume_swap()
    assert value["resumeDevice"] == device
    assert [p for p in params if p.startswith("resume_offset=")] == ([f"resume_offset={offset or 0}"] if subvolume else [])
    assert "nohibernate" not in params
    if profile.pools:
        assert value["zfsAllowHibernation"] is True


def test_hibernation_as_the_profile_says(case):
    assert_hibernation(case.profile, case.value)


def assert_tpm2_unlock(profile, value: dict) -> None:
    """Evaluated: a container with tpm2_unlock is opened in stage 1 by systemd-cryptsetup with
    ``tpm2-device=auto`` (the TPM first, then the passphrase), the initrd holds the TPM drivers;
    one without has no TPM option."""
    wanted = {luks.mapper: luks.tpm2_unlock for _, luks in profile.luks_devices()}
    assert set(value["luks"]) == set(wanted)
    for mapper, tpm2 in wanted.items():
        assert value["luks"][mapper]["crypttabExtraOpts"] == (["tpm2-device=auto"] if tpm2 else []), mapper
    if any(wanted.values()):
        assert value["initrdSystemd"] and value["initrdTpm2"]
        assert {"tpm-tis", "tpm-crb"} <= set(value["initrdTpmModules"])


def test_tpm2_unlock_as_the_profile_says(case):
    assert_tpm2_unlock(case.profile, case.value)


@pytest.fixture(scope="module")
def hibernating() -> dict:
    """zephyrus-btrfs (with tpm2_unlock) rendered with a real swapfile's offset (captured in the VM), and zfs-raidz1
    with hibernation and a swap with a stored key: evaluated, two at a time."""
    from operations.btrfs import RESUME_OFFSET, parse_resume_offset
    from tests.unit.pyinfra_fake import FIXTURES
    offset = parse_resume_offset((FIXTURES / "btrfs_map_swapfile_resume_offset.txt").read_text().splitlines())
    zephyrus = load_profile("zephyrus-btrfs", {**profile_cases.render_vars("zephyrus-btrfs"), "tpm2_unlock": True})
    zfs_vars = {**profile_cases.render_vars("zfs-raidz1"), "hibernate": True, "swap_random_encryption": False}
    raidz1 = load_profile("zfs-raidz1", zfs_vars)
    cases = {"zephyrus-btrfs": (zephyrus, render_files(zephyrus, None, None, zephyrus.nixos.hardware_module, True,
                                                       facts={RESUME_OFFSET: offset}), offset),
             "zfs-raidz1": (raidz1, render_files(raidz1, None, None, raidz1.nixos.hardware_module, True), None)}

    def evaluate(item):
        name, (profile, files, offset) = item
        return name, (profile, kit_evaluate(files, profile.nixos.hostname, profile.nixos.hardware_module), offset)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(evaluate, cases.items()))


@pytest.mark.parametrize("name", ["zephyrus-btrfs", "zfs-raidz1"])
def test_hibernation_resumes_from_the_real_swap(hibernating, name):
    profile, value, offset = hibernating[name]
    assert profile.nixos.hibernate
    assert_hibernation(profile, value, offset)
    if name == "zephyrus-btrfs":
        assert value["resumeDevice"] == "/dev/mapper/cryptroot" and "resume_offset=35680" in value["kernelParams"]
        assert profile.luks_devices()[0][1].tpm2_unlock
        assert_tpm2_unlock(profile, value)
        assert value["luks"]["cryptroot"]["crypttabExtraOpts"] == ["tpm2-device=auto"]
    else:
        assert value["resumeDevice"] == f"/dev/disk/by-partlabel/swap-{profile.hash}"
