"""End to end, in the live VM: the zfs-raidz1 and light-tmpfs-f2fs profiles from blank disks.

Each profile, from its installed state (tests/e2e/states.py: a deploy over SSH from blank disks,
pools kept imported so the result can be read back; every test starts from it afresh): verify it
with the verification command users run (``pytest tests/verify``: partlabels, pool topology,
dataset properties, @empty, encryption, mounts, the seeded persist files, the generated files),
check F2FS compression and the real nixos-generate-config's file; deploy with the defaults (the pool exported
cleanly), then again with the defaults: no changes, and the exported pool untouched on disk (same
active uberblock and txg, same ``zpool history``, read with ``zdb -e`` without importing it) and
still importable without -f; a run that keeps the pool imports it again with the data written
before the export; prove the rollback the initrd runs. zfs-raidz1's installed state is also
rescued (rescue.py) after writing into its temp datasets.
Refusals (a foreign disk carrying the host hash, a disk smaller than declared) change nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from operations import zfs
from operations.persist import paths as persist_paths
from operations.profile import host_hash, load_profile
from tests.nix.evaluation import evaluate_installed
from tests.e2e.faults import dry_plan
from tests.e2e.helpers import (SHOW_HARDWARE_CONFIG, assert_generated_by_real_tool_and_patched, assert_no_changes,
                               assert_target_verified, executed_commands, gap_report, grand_total, lost_paths,
                               operation_commands, run_verification)
from tests.unit.vm_vars import TEST_AUTHORIZED_KEY

LUKS_PASSPHRASE = "tabula-e2e-luks-passphrase"
ZFS_KEY = "tabula-e2e-zfs-passphrase"
# Test-only crypt hashes of throw-away passwords (persist seeding needs them).
ROOT_HASH = "$6$Zf1ZcW0d2v3ZkA$" + "r" * 86
USER_HASH = "$6$Zf2bL9pT4sQ1nB$" + "u" * 86
SERIALS = ("TABULA-NVME0", "TABULA-RZ1", "TABULA-RZ2", "TABULA-RZ3", "TABULA-SSD")
ZFS_HOST = "tabula-zfs"
LIGHT_HOST = "tabula-light"
# nixos-install is the test bed's stand-in (tools/guest/standins); nixos-generate-config is the real one.
INSTALL = True


@pytest.fixture(autouse=True)
def secrets(monkeypatch):
    """The controller's secrets, as a user sets them (pyinfra inherits the environment)."""
    use_secrets(monkeypatch, {f"TABULA_{name}": value for name, value in (
        ("LUKS_PASSPHRASE", LUKS_PASSPHRASE), ("ZFS_KEY", ZFS_KEY), ("ROOT_PASSWORD_HASH", ROOT_HASH),
        ("USER_PASSWORD_HASH", USER_HASH))})


def use_secrets(monkeypatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
        monkeypatch.delenv(f"{name}_FILE", raising=False)


def current_secrets() -> list[str]:
    return [os.environ[f"TABULA_{name}"] for name in ("LUKS_PASSPHRASE", "ZFS_KEY", "ROOT_PASSWORD_HASH",
                                                       "USER_PASSWORD_HASH")]


def by_id(target, serial: str) -> str:
    links = target.check_output(f"ls /dev/disk/by-id/ | grep -E '[-_]{serial}$' | grep -v -- -part").split()
    assert len(links) == 1, f"{serial}: {links}"
    return f"/dev/disk/by-id/{links[0]}"


def zfs_vars(target, **extra) -> dict:
    return {"hostname": ZFS_HOST, "ssd": by_id(target, "TABULA-SSD"), "rz1": by_id(target, "TABULA-RZ1"),
            "rz2": by_id(target, "TABULA-RZ2"), "rz3": by_id(target, "TABULA-RZ3"),
            "authorized_keys": [TEST_AUTHORIZED_KEY], **extra}


def deploy(run_pyinfra, profile: str, variables: dict, export: bool | None = False):
    """export=None: tabula_export_pools not given, i.e. the default (pools exported at the end)."""
    args = ["--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}",
            "--data", f"tabula_install={json.dumps(INSTALL)}", "deploy.py", "-vv"]
    if export is not None:
        args[-2:-2] = ["--data", f"tabula_export_pools={json.dumps(export)}"]
    return run_without_leaks(run_pyinfra, args)


def run_without_leaks(run_pyinfra, args: list[str]):
    """pyinfra with these arguments; no secret in its output or in any command it ran."""
    result = run_pyinfra(args)
    output = result.stdout + result.stderr
    for secret in current_secrets():
        assert secret not in output, "a secret leaked into pyinfra's output"
        assert all(secret not in cmd for cmd in executed_commands(output)), "a secret in argv"
    return result, output


def disks_snapshot(target) -> str:
    return target.check_output("lsblk -lnpo NAME,TYPE,FSTYPE,PARTLABEL " + " ".join(
        by_id(target, s) for s in SERIALS))


def mount_options(target, path: str) -> list[str]:
    return target.check_output(f"findmnt -no OPTIONS --mountpoint {path}").split(",")


def rollback_like_the_initrd(target, profile) -> None:
    """Unmount the pool's datasets, run the initrd's rollback script, mount them again."""
    mounts = [m for m in profile.all_mounts()]
    for m in reversed(mounts):
        target.run(f"umount /mnt{m.mountpoint if m.mountpoint != '/' else ''}")
    script = zfs.rollback_script(profile)
    target.check_output(f"sh -c {shlex.quote(script)}")
    for m in mounts:
        where = "/mnt" + (m.mountpoint if m.mountpoint != "/" else "")
        if m.fstype == "none":
            source = "/mnt" + m.device
            target.check_output(f"mkdir -p {where} && mount --bind {source} {where}")
        else:
            opts = ",".join(m.options) or "defaults"
            target.check_output(f"mkdir -p {where} && mount -t {m.fstype} -o {shlex.quote(opts)} "
                                f"{shlex.quote(m.device)} {where}")


def verification_data(profile_name: str, variables: dict) -> dict:
    """The deploy's inventory data, for the verification command."""
    return {"tabula_profile": profile_name, "tabula_vars": variables, "tabula_install": INSTALL}


def check_config(target, profile, evaluation_dir) -> None:
    assert all(profile.hash in part.label for _, _, part in profile.partitions())
    if INSTALL:
        generated = target.check_output("cat /mnt/etc/nixos/configuration.nix")
        assert f'networking.hostId = "{profile.host_id}";' in generated
        assert profile.host_id == host_hash(profile.nixos.hostname)
        # the real nixos-generate-config's file, its storage (ZFS datasets, tmpfs, binds) Tabula's
        boot = next(m for m in profile.all_mounts() if m.mountpoint == "/boot")
        boot_uuid = target.check_output(f"blkid -o value -s UUID {boot.device}")
        hardware = target.file("/mnt/etc/nixos/hardware-configuration.nix").content_string
        shown = target.check_output(SHOW_HARDWARE_CONFIG)
        assert_generated_by_real_tool_and_patched(hardware, profile, boot_uuid, shown)
        # the whole configuration the deploy wrote evaluates against real nixpkgs (nixos-install's
        # first step), its ZFS datasets and /boot's real UUID in the evaluated options
        evaluated = evaluate_installed(target.check_output, evaluation_dir, profile)
        assert f"-nixos-system-{profile.nixos.hostname}-" in evaluated["drvPath"]
        assert evaluated["fileSystems"]["/boot"]["device"] == f"/dev/disk/by-uuid/{boot_uuid}"
        assert evaluated["hostId"] == profile.host_id
        for m in profile.all_mounts():
            assert evaluated["fileSystems"][m.mountpoint]["device"] in (m.device, f"/dev/disk/by-uuid/{boot_uuid}")


def gaps(run_pyinfra, profile: str, variables: dict) -> list[str]:
    """gaps.py over SSH, with the same data as the install: its report's lines."""
    result = run_pyinfra(["--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}",
                          "gaps.py"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert grand_total(output)[1] == "-", "the gap report changed something"
    return gap_report(output)


def assert_only_the_temp_writes_are_reported(target, run_pyinfra, profile_name: str, variables: dict, persist: str):
    """Written to the temp root, to a persisted path and to a mount: only the first are lost, and
    the report says how to keep them."""
    target.check_output("mkdir -p /mnt/var/lib/gaptest && echo db > /mnt/var/lib/gaptest/db && "
                        "echo conf > /mnt/etc/gaptest.conf && mkdir -p /mnt/etc/ssh && echo key > /mnt/etc/ssh/gaptest_key && "
                        "echo log > /mnt/var/log/gaptest.log && echo local > /mnt/local/gaptest")
    report = gaps(run_pyinfra, profile_name, variables)
    assert report[0].startswith("gaps: what the ephemeral root of the system at /mnt holds"), report
    assert lost_paths(report) == ["/etc/gaptest.conf", "/tabula-mark", "/var/lib/gaptest/"], report
    assert '    persist_directories: ["/var/lib/gaptest"]' in report
    assert '    persist_files: ["/etc/gaptest.conf", "/tabula-mark"]' in report
    assert f'    environment.persistence."{persist}".directories = [ "/var/lib/gaptest" ];' in report
    target.check_output("rm -r /mnt/var/lib/gaptest /mnt/etc/gaptest.conf /mnt/etc/ssh/gaptest_key "
                        "/mnt/var/log/gaptest.log /mnt/local/gaptest")


def write_marks(target, where: list[str], text: str) -> None:
    for path in where:
        target.check_output(f"echo {shlex.quote(text)} > {path}/tabula-mark")


def assert_marks(target, where: list[str], text: str) -> None:
    for path in where:
        assert target.file(f"{path}/tabula-mark").content_string.strip() == text, path


def assert_exported_cleanly(target, pool_name: str, whole_mnt: bool = True) -> None:
    """whole_mnt: nothing at all is left mounted under /mnt (else: nothing of the pool)."""
    assert target.run(f"zpool list {pool_name}").rc != 0
    if whole_mnt:
        assert target.check_output("findmnt -rno TARGET | grep -c '^/mnt' || true") in ("0", "")
    assert target.check_output(f"findmnt -rno SOURCE | grep -c '^{pool_name}' || true") in ("0", "")
    importable = target.check_output("zpool import -d /dev/disk/by-partlabel")
    assert f"pool: {pool_name}" in importable and "state: ONLINE" in importable, importable
    # imported again without -f: nothing marks it as in use by another system
    target.check_output(f"zpool import -N -d /dev/disk/by-partlabel {pool_name} && zpool export {pool_name}")


def on_disk_state(target, pool_name: str) -> tuple[str, str]:
    """An exported pool as its disks hold it, read without importing it (zdb -e): the active
    uberblock (txg, timestamp, guid sum) and the pool's history."""
    uberblock = target.check_output(f"zdb -e -p /dev/disk/by-partlabel -u {pool_name}")
    history = target.check_output(f"zdb -e -p /dev/disk/by-partlabel -h {pool_name}")
    assert "txg = " in uberblock and "zpool export" in history, (uberblock, history)
    return uberblock, history


def assert_converged_with_export_untouched(target, run_pyinfra, profile_name: str, variables: dict,
                                           pool_name: str) -> None:
    """With the defaults (export on): a run exports the pool; the next one changes nothing, on
    pyinfra's word and on the disks' (same uberblock and txg, same history), and the installed
    system can still import the pool as it finds it (no -f)."""
    whole_mnt = profile_name == "zfs-raidz1"      # (light: the tmpfs root and its binds stay)
    result, output = deploy(run_pyinfra, profile_name, variables, export=None)
    assert result.returncode == 0, output
    assert_exported_cleanly(target, pool_name, whole_mnt)
    before = on_disk_state(target, pool_name)
    result, output = deploy(run_pyinfra, profile_name, variables, export=None)
    assert result.returncode == 0, output
    assert_no_changes(output)
    assert "imported read-only to compare" in output
    assert on_disk_state(target, pool_name) == before
    assert_exported_cleanly(target, pool_name, whole_mnt)


def check_f2fs_compresses(target) -> None:
    """Compressible data written through a bind mount of the F2FS is compressed: its inode on the
    F2FS carries the compression flag (lsattr 'c'), which compress_mode=fs needs to compress a
    file at all and which nothing set but compress_extension=* (Debian's f2fs-tools have no
    f2fs_io to count compressed blocks)."""
    sample = "/mnt/local/tabula-compress-test"
    target.check_output(f"yes tabula-compressible-line | head -c 4M > {sample} && sync")
    flags = target.check_output("lsattr /mnt/.local/system/tabula-compress-test").split()[0]
    assert "c" in flags, flags
    target.check_output(f"rm {sample}")


def home_of(profile) -> str:
    return f"/mnt/home/{profile.nixos.user}"


def check_access_and_pins(target, profile) -> None:
    """What makes the installed machine usable (issue #13): the initrd's own SSH host key seeded
    where its configuration reads it, private, and not the system's; the persisted configuration
    holding the flake.lock it was installed from."""
    persist = f"/mnt{profile.persistence.root}"
    if profile.nixos.remote_unlock:
        key = f"/mnt{persist_paths(profile).initrd_host_key}"
        assert target.check_output(f"stat -c %a {os.path.dirname(key)}") == "700"
        assert target.check_output(f"stat -c '%a %U' {key}") == "600 root"
        initrd_fp = target.check_output(f"ssh-keygen -lf {key}.pub").split()[1]
        system_fps = {target.check_output(f"ssh-keygen -lf {k}").split()[1]
                      for k in target.check_output(f"ls {persist}/etc/ssh/*.pub").split()}
        assert initrd_fp not in system_fps, "the initrd carries the system's host key"
    if INSTALL:
        lock = target.check_output(f"sha256sum < {persist}/etc/nixos/flake.lock")
        assert lock == target.check_output("sha256sum < /mnt/etc/nixos/flake.lock")
        nodes = json.loads(target.check_output(f"cat {persist}/etc/nixos/flake.lock"))["nodes"]
        assert {"nixpkgs", "impermanence", "nixos-hardware", "disko"} <= set(nodes)


@pytest.fixture
def raidz1_installed(installed, monkeypatch):
    """zfs-raidz1 installed from blank disks, the pool kept imported (its installed state,
    tests/e2e/states.py), the state's secrets in the environment: (vars, profile, output)."""
    state = installed("zfs-raidz1")
    use_secrets(monkeypatch, state.secrets)
    return state.variables, load_profile("zfs-raidz1", state.variables), state.output


@pytest.fixture
def light_installed(installed, monkeypatch):
    """light-tmpfs-f2fs installed from blank disks, as raidz1_installed."""
    state = installed("light-tmpfs-f2fs")
    use_secrets(monkeypatch, state.secrets)
    return state.variables, load_profile("light-tmpfs-f2fs", state.variables), state.output


def test_zfs_raidz1_from_blank_disks(raidz1_installed, livevm, target, run_pyinfra, tmp_path):
    variables, profile, _output = raidz1_installed
    assert_target_verified(livevm, verification_data("zfs-raidz1", variables))
    check_config(target, profile, tmp_path)
    check_access_and_pins(target, profile)

    kept = ["/mnt/local", "/mnt/remote", "/mnt/nix", "/mnt/var/log"]
    write_marks(target, kept, "kept")
    pool_name = profile.pools["rpool"].name
    assert_converged_with_export_untouched(target, run_pyinfra, "zfs-raidz1", variables, pool_name)

    # a run that keeps the pool imported brings back the data written before the export
    result, output = deploy(run_pyinfra, "zfs-raidz1", variables)
    assert result.returncode == 0, output
    assert_marks(target, kept, "kept")

    # the rollback the initrd runs: temp is empty again, local and remote keep their files, and
    # so does the user's home
    home = home_of(profile)
    target.check_output(f"mkdir -p {home}")
    write_marks(target, ["/mnt", "/mnt/tmp"], "gone")
    write_marks(target, [home], "kept")
    assert_only_the_temp_writes_are_reported(target, run_pyinfra, "zfs-raidz1", variables, profile.persistence.root)
    rollback_like_the_initrd(target, profile)
    for temp in ("/mnt", "/mnt/tmp"):
        assert not target.file(f"{temp}/tabula-mark").exists, temp
    assert_marks(target, kept + [home], "kept")
    # after the rollback nothing is lost: what the install and the marks left is gone
    assert lost_paths(gaps(run_pyinfra, "zfs-raidz1", variables)) == []

    # drift the zfs and filesystems layers' checks see (the last use of this state): a dataset
    # property, a missing @empty, no filesystem where /boot's was
    boot = f"/dev/disk/by-partlabel/boot-{profile.hash}"
    target.check_output(f"zfs set sync=standard {pool_name}/temp && zfs rename {pool_name}/temp/tmp@empty "
                        f"{pool_name}/temp/tmp@away && umount /mnt/boot && wipefs -q -a {boot}")
    result, report = run_verification(livevm, verification_data("zfs-raidz1", variables))
    assert result.returncode != 0
    for line in (f"{pool_name}/temp: sync=standard, the profile wants disabled",
                 f"{pool_name}/temp/tmp: no @empty snapshot",
                 f"{boot}: filesystem none, the profile wants vfat"):
        assert line in report.splitlines() or f"E   {line}" in report, (line, report[-4000:])
    assert re.search(r"^tabula: ssh://install-target: .*: does NOT match the profile", report, re.M), report[-3000:]


# --- rescue (rescue.py) on the same install ------------------------------------------------------

KEPT = ["/mnt/local", "/mnt/remote", "/mnt/nix", "/mnt/var/log", "/mnt/home"]


def rescue(run_pyinfra, variables: dict, *flags: str):
    """rescue.py with the install's inventory data and secrets (the defaults: the pool exported at the end)."""
    args = [*flags, "--data", "tabula_profile=zfs-raidz1", "--data", f"tabula_vars={json.dumps(variables)}", "rescue.py"]
    return run_without_leaks(run_pyinfra, args)


def kept_state(livevm, places: list[str]) -> str:
    """Every file, folder and link below the persistent mounts: path, type, mode, owner, size, sha256."""
    return livevm.run(" && ".join(f"cd {p} && echo '== {p}' && find . -printf '%p %y %m %U %s\\n' | LC_ALL=C sort && "
                                  "find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum" for p in places)).stdout


def open_read_only(livevm, profile) -> None:
    """The exported pool imported read-only (nothing written), its key loaded from stdin, the
    profile's mounts mounted read-only under /mnt, as the install's view does."""
    (pool,) = profile.pools.values()
    roots = tuple(f"{pool.name}/{ds.name}" for ds in pool.datasets if ds.encryption)
    livevm.run(f"zpool import -N -o readonly=on -o cachefile=none -d /dev/disk/by-partlabel {pool.name}")
    livevm.run(["sh", "-c", zfs._load_keys_script(roots)], input=os.environ["TABULA_ZFS_KEY"] + "\n")
    for mount in profile.all_mounts():
        command = zfs.read_only_mount_command(mount)
        if command:
            livevm.run(f"mkdir -p /mnt{mount.mountpoint.rstrip('/')} 2>/dev/null; {command}")


def close_pool(livevm, pool_name: str) -> None:
    livevm.run(f"umount -R /mnt 2>/dev/null; zpool export {pool_name}")


def test_zfs_raidz1_rescue(raidz1_installed, livevm, target, run_pyinfra):
    """Written into the temp datasets, the pool exported (a live system booted afresh): rescued
    back to @empty, the persistent datasets byte-identical, the install converged."""
    variables, profile, _output = raidz1_installed
    pool_name = profile.pools["rpool"].name
    temps = [f"{pool_name}/temp/root", f"{pool_name}/temp/tmp"]
    assert target.run(f"zpool list {pool_name}").rc == 0          # as the install left it: imported
    livevm.run(f"mkdir -p {home_of(profile)}")
    kept = kept_state(livevm, KEPT)
    # etc/NIXOS: nixos-install's mark (the stand-in writes it as the real one does)
    assert livevm.run("test -e /mnt/etc/NIXOS", check=False).returncode == 0
    marks = {"etc/NIXOS"}
    livevm.run("set -e; echo junk > /mnt/tabula-junk; mkdir -p /mnt/var/lib/junk /mnt/etc/nixos; "
               "echo junk > /mnt/var/lib/junk/file; echo junk > /mnt/tmp/tabula-junk; "
               "echo broken > /mnt/etc/nixos/configuration.nix; sync")
    close_pool(livevm, pool_name)
    exported = on_disk_state(target, pool_name)

    # --dry: the plan; the pool read through a read-only import and left exported, untouched
    output, rows = dry_plan(livevm, ["-vv", "--data", "tabula_profile=zfs-raidz1",
                                     "--data", f"tabula_vars={json.dumps(variables)}", "rescue.py"], SERIALS)
    for step in ("ZFS rollback to @empty: temp/root, temp/tmp", "Persist configuration restore",
                 f"ZFS export {pool_name}"):
        assert rows.get(step), (step, rows)
    found = {line.split("] ", 1)[1].split(": ")[0]: set(line.split(": ")[1].split(", ")) for line in output.splitlines()
             if line.endswith(": rolling it back to @empty")}
    # (etc/NIXOS: nixos-install's mark, gone after every boot too; etc/nixos, edited, is put back)
    assert found == {temps[0]: {"tabula-junk", "var/lib/", "var/lib/junk/", "var/lib/junk/file"} | marks,
                     temps[1]: {"tabula-junk"}}, output[-6000:]
    assert on_disk_state(target, pool_name) == exported

    result, output = rescue(run_pyinfra, variables, "-vv")
    assert result.returncode == 0, output[-8000:]
    assert_exported_cleanly(target, pool_name)

    again, output = rescue(run_pyinfra, variables, "-vv")
    assert again.returncode == 0, output[-8000:]
    assert_no_changes(output)
    assert (f"{temps[0]} holds nothing but the install's mount points and etc/nixos since @empty; "
            f"{temps[1]} has nothing written since @empty") in output
    install, output = deploy(run_pyinfra, "zfs-raidz1", variables, export=None)
    assert install.returncode == 0, output[-8000:]
    assert_no_changes(output)

    open_read_only(livevm, profile)
    try:
        assert target.check_output(f"zfs get -H -p -o value written@empty {temps[1]}") == "0"
        listing = set(target.check_output("find /mnt -xdev -mindepth 1 -printf '%P\\n'").splitlines())
        config = {name for name in listing if name.startswith("etc/nixos/")}
        assert listing - config == {"boot", "etc", "etc/nixos", "home", "local", "nix", "remote", "tmp", "var",
                                    "var/log"}, sorted(listing)
        assert target.check_output("cd /mnt/etc/nixos && sha256sum * && stat -c '%n %a %U' *") == \
            target.check_output("cd /mnt/remote/etc/nixos && sha256sum * && stat -c '%n %a %U' *")
        assert target.check_output("ls -A /mnt/tmp") == ""
        assert kept_state(livevm, KEPT) == kept
    finally:
        close_pool(livevm, pool_name)

    # @empty missing: refused from the facts (the pool read-only), no command run, nothing written
    livevm.run(f"zpool import -N -d /dev/disk/by-partlabel {pool_name} && zfs rename {temps[1]}@empty {temps[1]}@away "
               f"&& zpool export {pool_name}")
    before = on_disk_state(target, pool_name)
    try:
        refused, output = rescue(run_pyinfra, variables, "-vv")
        assert refused.returncode != 0
        assert f"refusing to roll back {temps[1]}: its snapshot {temps[1]}@empty is missing" in output
        assert operation_commands(output) == []
        close_pool(livevm, pool_name)       # (the refused run leaves its read-only view open)
        assert on_disk_state(target, pool_name) == before
    finally:
        livevm.run(f"umount -R /mnt 2>/dev/null; zpool export {pool_name} 2>/dev/null; "
                   f"zpool import -N -d /dev/disk/by-partlabel {pool_name} && zfs rename {temps[1]}@away {temps[1]}@empty "
                   f"&& zpool export {pool_name}")


def test_light_tmpfs_f2fs_from_blank_disks(light_installed, livevm, target, run_pyinfra, tmp_path):
    variables, profile, _output = light_installed
    assert_target_verified(livevm, verification_data("light-tmpfs-f2fs", variables))
    check_config(target, profile, tmp_path)
    check_access_and_pins(target, profile)
    assert target.check_output("findmnt -no FSTYPE --mountpoint /mnt") == "tmpfs"
    # one bounded tmpfs: / with the profile's size (the kernel shows it in KiB), /tmp a folder on it
    assert "size=2097152k" in mount_options(target, "/mnt")
    assert target.run("findmnt --mountpoint /mnt/tmp").rc != 0
    f2fs = mount_options(target, "/mnt/.local")
    assert {"compress_algorithm=lz4", "compress_chksum", "compress_mode=fs", "compress_extension=*"} <= set(f2fs), f2fs
    assert target.check_output("findmnt -no FSTYPE --mountpoint /mnt/.local") == "f2fs"
    check_f2fs_compresses(target)

    kept = ["/mnt/local", "/mnt/remote", "/mnt/nix", "/mnt/var/log"]
    write_marks(target, kept, "kept")
    pool_name = profile.pools["rpool"].name
    # (exported: only /mnt/remote goes; the tmpfs root and the F2FS binds stay mounted)
    assert_converged_with_export_untouched(target, run_pyinfra, "light-tmpfs-f2fs", variables, pool_name)

    result, output = deploy(run_pyinfra, "light-tmpfs-f2fs", variables)
    assert result.returncode == 0, output
    assert_marks(target, kept, "kept")
    # the binds show the F2FS's directories
    assert target.file("/mnt/.local/nix/tabula-mark").exists and target.file("/mnt/.local/system/tabula-mark").exists

    # drift the checks name (then put back): the tmpfs root's bound, a pool property
    target.check_output(f"mount -o remount,size=1G /mnt && zfs set compression=off {pool_name}")
    result, report = run_verification(livevm, verification_data("light-tmpfs-f2fs", variables))
    assert result.returncode != 0
    failed = sorted(re.findall(r"^FAILED tests/verify/test_target\.py::test_(\w+)\[", report, re.M))
    assert failed == ["mounts", "zfs"], report[-4000:]
    for line in ("/mnt: options rw,nosuid,nodev,noatime,size=1048576k,mode=755,inode64 lack size=2G",
                 f"{pool_name}: compression=off, the profile wants zstd"):
        assert line in report.splitlines() or f"E   {line}" in report, (line, report[-4000:])
    target.check_output(f"mount -o remount,size=2G /mnt && zfs set compression=zstd {pool_name}")

    # a reboot, as the initrd sees it: a new, empty tmpfs root; home and the rest are kept
    home = home_of(profile)
    target.check_output(f"mkdir -p {home}")
    write_marks(target, ["/mnt"], "gone")
    write_marks(target, [home], "kept")
    assert_only_the_temp_writes_are_reported(target, run_pyinfra, "light-tmpfs-f2fs", variables,
                                             profile.persistence.root)
    rollback_like_the_initrd(target, profile)
    assert not target.file("/mnt/tabula-mark").exists
    assert_marks(target, kept + [home], "kept")
    assert lost_paths(gaps(run_pyinfra, "light-tmpfs-f2fs", variables)) == []


def test_partlabel_clash_is_refused_before_any_change(clean_disks, target, run_pyinfra):
    nvme = by_id(target, "TABULA-NVME0")
    foreign = f"foreign-{host_hash(ZFS_HOST)}"
    target.check_output(f"sgdisk -n1:0:+16M -t1:8300 -c1:{foreign} {nvme} && udevadm settle")
    before = disks_snapshot(target)
    result, output = deploy(run_pyinfra, "zfs-raidz1", zfs_vars(target))
    assert result.returncode != 0, output
    partition = target.check_output(f"readlink -f {nvme}-part1")
    assert (f"partlabel '{foreign}' of the profile is already used by {partition} on install-target, which is "
            "not one of the profile's disks: /dev/disk/by-partlabel would be ambiguous") in output, output[-4000:]
    assert operation_commands(output) == []
    assert disks_snapshot(target) == before


def test_too_small_disk_is_refused_before_any_change(clean_disks, target, run_pyinfra):
    before = disks_snapshot(target)
    result, output = deploy(run_pyinfra, "zfs-raidz1", zfs_vars(target, data_disk_size="5G"))
    assert result.returncode != 0, output
    # the first member the guard measures, by the field that declares it and both sizes
    assert (f"disks.raidz1.size: {by_id(target, 'TABULA-RZ1')} has {4 * 1024**3} bytes, less than the declared "
            f"5G ({5 * 1024**3} bytes)") in output, output[-4000:]
    assert operation_commands(output) == []
    assert disks_snapshot(target) == before
    assert target.run("zpool list -H").stdout.strip() == ""
