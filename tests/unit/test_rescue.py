"""Rescue (rescue.py): the facts' parsers on output captured in the VM
(tests/unit/fixtures/capture_rescue.py), what the destructive commands do in a real shell (with
stand-ins for btrfs and zfs that log what they are asked), and the operations' decisions."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from operations import btrfs, persist, stages, zfs
from operations.errors import TabulaError
from operations.mounts import Mounts, parse_proc_mounts
from operations.profile import load_profile
from operations.target import DirectoryDigest, install_footprint, leftovers_script, parse_leftovers
from tests.unit.pyinfra_fake import FakeState, fixture_lines, run_op
from tests.unit.vm_vars import TEST_AUTHORIZED_KEY

TOP = "/run/tabula/btrfs/nixos"
ZEPHYRUS_MOUNTS = ("/", "/boot", "/home", "/nix", "/persist", "/swap", "/var/log")
POOL = "rpool-2790ee34"
TEMPS = ((f"{POOL}/temp/root", "/"), (f"{POOL}/temp/tmp", "/tmp"))
RAIDZ1_MOUNTS = ("/", "/boot", "/home", "/local", "/nix", "/remote", "/tmp", "/var/log")


@pytest.fixture
def root_subvolume():
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/x", "swap_size": "256M"})
    return next(s for _, fs in profile.filesystems() for s in fs.subvolumes if s.blank_snapshot)


@pytest.fixture
def planning(monkeypatch):
    monkeypatch.setattr(FakeState, "is_executing", False)


def sh(script: str, cwd: Path, path_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path_dir is not None:
        env["PATH"] = f"{path_dir}:{env['PATH']}"
    return subprocess.run(["sh", "-c", script], cwd=cwd, env=env, capture_output=True, text=True)


# --- the install's footprint, and what is beyond it -----------------------------------------------


def test_footprint_of_the_root_is_its_mount_points_and_etc_nixos():
    folders, config = install_footprint("/", list(ZEPHYRUS_MOUNTS))
    assert folders == ["boot", "etc", "home", "nix", "persist", "swap", "var", "var/log"]
    assert config == "etc/nixos"
    assert install_footprint("/tmp", list(RAIDZ1_MOUNTS)) == ([], None)
    assert install_footprint("/var", ["/", "/var", "/var/log/x"]) == (["log", "log/x"], None)


def make_tree(root: Path, entries: list[str]) -> None:
    for entry in entries:
        path = root / entry.rstrip("/")
        if entry.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")


def leftovers_in(tmp_path: Path, entries: list[str]) -> list[tuple[str, str]]:
    root = tmp_path / "root"
    root.mkdir()
    make_tree(root, entries)
    ran = sh(leftovers_script(str(root), *install_footprint("/", list(ZEPHYRUS_MOUNTS))), tmp_path)
    assert ran.returncode == 0, ran.stderr
    return sorted(parse_leftovers(ran.stdout.splitlines()))


FOOTPRINT = ["boot/", "home/", "nix/", "persist/", "swap/", "var/log/", "etc/nixos/flake.nix",
             "etc/nixos/hardware-configuration.nix", "etc/nixos/sub dir/x"]


def test_leftovers_script_in_a_real_shell(tmp_path):
    assert leftovers_in(tmp_path, FOOTPRINT) == []


def test_leftovers_are_everything_else(tmp_path):
    found = leftovers_in(tmp_path, FOOTPRINT + ["junk-file", "srv/deep/file", "var/lib/", "home/kept", "etc/passwd",
                                                "etc/nixos-old/x", "name with spaces"])
    assert found == [("d", "etc/nixos-old"), ("d", "srv"), ("d", "srv/deep"), ("d", "var/lib"),
                     ("f", "etc/nixos-old/x"), ("f", "etc/passwd"), ("f", "home/kept"), ("f", "junk-file"),
                     ("f", "name with spaces"), ("f", "srv/deep/file")]


def test_a_file_where_a_mount_point_belongs_is_a_leftover(tmp_path):
    assert leftovers_in(tmp_path, ["nix", "boot/"]) == [("f", "nix")]


def test_leftovers_are_listed_up_to_a_limit(tmp_path):
    assert len(leftovers_in(tmp_path, [f"junk-{i}" for i in range(200)])) == 20


def test_parse_root_leftovers_captured():
    # @root of the installed zephyrus-btrfs target, then broken (files, a nested subvolume)
    assert btrfs.parse_root_leftovers(fixture_lines("rescue_btrfs_leftovers_installed.txt")) == []
    broken = btrfs.parse_root_leftovers(fixture_lines("rescue_btrfs_leftovers_broken.txt"))
    assert ("f", "junk-file") in broken and ("d", "var/lib") in broken and ("d", "var/lib/machines") in broken
    assert not [path for _, path in broken if path.startswith("etc/nixos") or path in ("nix", "boot", "var/log")]
    assert btrfs.parse_root_leftovers(fixture_lines("rescue_btrfs_leftovers_absent.txt")) is None


# --- btrfs: the restore command in a real shell -------------------------------------------------

FAKE_BTRFS = r"""#!/bin/sh
# Stand-in for btrfs: subvolumes are folders, "ro" is a marker file beside them, every call logged.
echo "btrfs $*" >> "$LOG"
case "$1 $2" in
  "property get") if [ -e "$4.ro" ]; then echo ro=true; else echo ro=false; fi ;;
  "subvolume list") cat "$LIST" ;;
  "subvolume delete") rm -rf "$3" ;;
  "subvolume snapshot") mkdir "$4" ;;
esac
"""


@pytest.fixture
def fake_btrfs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "btrfs").write_text(FAKE_BTRFS)
    (bin_dir / "btrfs").chmod(0o755)
    top = tmp_path / "top"
    make_tree(top, ["@root-blank/", "@root/junk", "@root/var/lib/machines/nested-again/x", "@persist/kept",
                    "@home/kept"])
    (top / "@root-blank.ro").write_text("")
    (tmp_path / "list").write_text(
        "ID 256 gen 20 top level 5 path @root\n"
        "ID 257 gen 8 top level 5 path @root-blank\n"
        "ID 258 gen 9 top level 5 path @persist\n"
        "ID 263 gen 21 top level 256 path @root/var/lib/machines\n"
        "ID 264 gen 22 top level 263 path @root/var/lib/machines/nested-again\n"
        "ID 265 gen 23 top level 5 path @rootless\n")
    os.environ["LOG"], os.environ["LIST"] = str(tmp_path / "log"), str(tmp_path / "list")
    yield tmp_path, bin_dir, top
    del os.environ["LOG"], os.environ["LIST"]


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "log"
    return [line.replace(str(tmp_path), "") for line in log.read_text().splitlines()] if log.exists() else []


def restore(fake, **kwargs) -> subprocess.CompletedProcess:
    tmp_path, bin_dir, top = fake
    command = btrfs.restore_command(str(top), "@root", "@root-blank", **kwargs)
    return sh(shlex.split(str(command))[2], tmp_path, bin_dir)


def test_restore_deletes_nested_deepest_first_then_snapshots_the_blank(fake_btrfs):
    ran = restore(fake_btrfs)
    assert ran.returncode == 0, ran.stderr
    tmp_path, _, top = fake_btrfs
    assert [c for c in calls(tmp_path) if "delete" in c or "snapshot" in c] == [
        "btrfs subvolume delete /top/@root/var/lib/machines/nested-again",
        "btrfs subvolume delete /top/@root/var/lib/machines",
        "btrfs subvolume delete /top/@root",
        "btrfs subvolume snapshot /top/@root-blank /top/@root"]
    assert ran.stdout.splitlines() == ["deleting nested subvolume @root/var/lib/machines/nested-again",
                                       "deleting nested subvolume @root/var/lib/machines",
                                       "deleting @root", "restoring @root from @root-blank"]
    assert list((top / "@root").iterdir()) == []
    assert (top / "@persist/kept").exists() and (top / "@home/kept").exists()


def test_the_boot_and_the_rescue_delete_nested_subvolumes_one_way_deepest_first(fake_btrfs):
    """One deletion (btrfs.restore_lines) rendered into the initrd's script and the rescue's
    command, deepest first by depth: also a subvolume moved into a newer one (an older ID, deeper)."""
    tmp_path, bin_dir, top = fake_btrfs
    for program in ("mount", "umount"):
        (bin_dir / program).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / program).chmod(0o755)
    listing = ("ID 256 gen 20 top level 5 path @root\n"
               "ID 257 gen 8 top level 5 path @root-blank\n"
               "ID 259 gen 9 top level 263 path @root/srv/moved/old\n"       # made first, moved in later
               "ID 263 gen 21 top level 256 path @root/srv/moved\n")
    rescue_script = shlex.split(str(btrfs.restore_command(str(top), "@root", "@root-blank")))[2]
    boot_script = btrfs.rollback_script("/dev/fake", "@root", "@root-blank", mountdir=str(top))
    assert btrfs.restore_lines() in rescue_script
    assert "\n".join(f"  {line}" for line in btrfs.restore_lines().splitlines()) in boot_script
    for script, shell in ((rescue_script, "sh"), (boot_script, "bash")):
        (tmp_path / "list").write_text(listing)
        make_tree(top, ["@root/srv/moved/old/x"])
        (tmp_path / "log").unlink(missing_ok=True)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        ran = subprocess.run([shell, "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        assert [c for c in calls(tmp_path) if "delete" in c or "snapshot " in c] == [
            "btrfs subvolume delete /top/@root/srv/moved/old", "btrfs subvolume delete /top/@root/srv/moved",
            "btrfs subvolume delete /top/@root", "btrfs subvolume snapshot /top/@root-blank /top/@root"], shell


def test_restore_without_root_only_snapshots(fake_btrfs):
    tmp_path, _, top = fake_btrfs
    subprocess.run(["rm", "-rf", str(top / "@root")], check=True)
    (tmp_path / "list").write_text("ID 257 gen 8 top level 5 path @root-blank\n")
    ran = restore(fake_btrfs)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["restoring @root from @root-blank"]


@pytest.mark.parametrize("breakage, reason", [
    ("missing", "its blank snapshot @root-blank is missing"),
    ("writable", "its blank snapshot @root-blank is writable"),
    ("not empty", "its blank snapshot @root-blank is not empty"),
])
def test_restore_refuses_before_deleting_anything(fake_btrfs, breakage, reason):
    tmp_path, _, top = fake_btrfs
    if breakage == "missing":
        subprocess.run(["rm", "-rf", str(top / "@root-blank"), str(top / "@root-blank.ro")], check=True)
    elif breakage == "writable":
        (top / "@root-blank.ro").unlink()
    else:
        (top / "@root-blank/etc").mkdir()
    ran = restore(fake_btrfs)
    assert ran.returncode == 1
    assert ran.stderr.strip() == f"tabula: refusing to restore @root: {reason}; nothing was changed"
    assert not [c for c in calls(tmp_path) if "delete" in c or "snapshot" in c or "list" in c]
    assert (top / "@root/junk").exists()


def test_restore_stops_at_the_first_failed_delete(fake_btrfs):
    tmp_path, bin_dir, top = fake_btrfs
    text = FAKE_BTRFS.replace('"subvolume delete") rm -rf "$3" ;;', '"subvolume delete") exit 1 ;;')
    (bin_dir / "btrfs").write_text(text)
    ran = restore(fake_btrfs)
    assert ran.returncode != 0
    assert not [c for c in calls(tmp_path) if "snapshot" in c or c.endswith("delete /top/@root")]


# --- btrfs: the operation's decisions -------------------------------------------------------------


@pytest.fixture
def installed_facts():
    subvolumes = btrfs.parse_subvolume_list(fixture_lines("btrfs_subvolumes_installed.txt"))
    mounts = parse_proc_mounts(fixture_lines("btrfs_proc_mounts_installed.txt"))
    return {btrfs.BtrfsSubvolumes: subvolumes, btrfs.BtrfsRootLeftovers: [], Mounts: mounts}


def restored(monkeypatch, facts, subvolume):
    return run_op(monkeypatch, btrfs, btrfs.restored, facts, top=TOP, subvolume=subvolume,
                  device="/dev/mapper/cryptroot", mountpoints=ZEPHYRUS_MOUNTS)


def test_root_as_the_install_left_it_is_a_noop(monkeypatch, installed_facts, root_subvolume):
    commands, _, fake = restored(monkeypatch, installed_facts, root_subvolume)
    assert commands == []
    assert fake.noops == ["@root holds no nested subvolume and nothing but the install's mount points and "
                          "etc/nixos: as restored from @root-blank"]


@pytest.mark.parametrize("breakage", ["files", "nested", "deleted", "read-only"])
def test_broken_root_is_restored_after_unmounting_the_install_tree(monkeypatch, installed_facts, root_subvolume,
                                                                   breakage):
    facts = installed_facts
    if breakage == "files":
        facts[btrfs.BtrfsRootLeftovers] = [("f", "junk-file")]
    elif breakage == "nested":
        facts[btrfs.BtrfsSubvolumes]["@root/var/lib/machines"] = dict(facts[btrfs.BtrfsSubvolumes]["@root"])
    elif breakage == "deleted":
        del facts[btrfs.BtrfsSubvolumes]["@root"]
        facts[btrfs.BtrfsRootLeftovers] = None
    else:
        facts[btrfs.BtrfsSubvolumes]["@root"]["ro"] = True
    commands, _, _ = restored(monkeypatch, facts, root_subvolume)
    assert commands == [str(btrfs.restore_command(TOP, "@root", "@root-blank", unmount=("/mnt",)))]


@pytest.mark.parametrize("breakage, message", [
    ("missing", "refusing to restore @root on /dev/mapper/cryptroot: its blank snapshot @root-blank is missing"),
    ("writable", "refusing to restore @root on /dev/mapper/cryptroot: its blank snapshot @root-blank is writable"),
    ("not empty", "its blank snapshot @root-blank is not empty"),
])
def test_bad_blank_is_refused(monkeypatch, installed_facts, root_subvolume, breakage, message):
    blank = installed_facts[btrfs.BtrfsSubvolumes]["@root-blank"]
    if breakage == "missing":
        del installed_facts[btrfs.BtrfsSubvolumes]["@root-blank"]
    elif breakage == "writable":
        blank["ro"] = False
    else:
        blank["empty"] = False
    installed_facts[btrfs.BtrfsRootLeftovers] = [("f", "junk-file")]
    with pytest.raises(TabulaError, match=message):
        restored(monkeypatch, installed_facts, root_subvolume)


def test_planned_while_the_container_is_closed(monkeypatch, planning, root_subvolume):
    commands, _, _ = restored(monkeypatch, {Mounts: {}}, root_subvolume)
    assert commands == [str(btrfs.restore_command(TOP, "@root", "@root-blank"))]


def test_top_level_missing_at_execution_is_an_error(monkeypatch, root_subvolume):
    with pytest.raises(TabulaError, match="not mounted"):
        restored(monkeypatch, {Mounts: {}}, root_subvolume)


# --- ZFS ------------------------------------------------------------------------------------------


def test_parse_temp_state_captured():
    # zfs-raidz1 in the VM: as installed (view mounted read-only), written into, then its
    # temp/tmp@empty destroyed; and the pool not imported.
    state = zfs.parse_temp_state(fixture_lines("rescue_zfs_temp_installed.txt"))
    root, tmp = state["datasets"][f"{POOL}/temp/root"], state["datasets"][f"{POOL}/temp/tmp"]
    assert state["imported"] is True
    assert root["state"] == "ok" and root["written"] > 0 and root["mounted"] == "/mnt" and root["leftovers"] == []
    assert tmp["state"] == "ok" and tmp["mounted"] == "/mnt/tmp" and tmp["leftovers"] == []
    broken = zfs.parse_temp_state(fixture_lines("rescue_zfs_temp_broken.txt"))["datasets"]
    assert ("f", "tabula-junk") in broken[f"{POOL}/temp/root"]["leftovers"]
    assert ("d", "var/lib") in broken[f"{POOL}/temp/root"]["leftovers"]
    assert broken[f"{POOL}/temp/tmp"]["leftovers"] == [("f", "tabula-junk")]
    nosnap = zfs.parse_temp_state(fixture_lines("rescue_zfs_temp_nosnapshot.txt"))["datasets"]
    assert nosnap[f"{POOL}/temp/tmp"]["state"] == "nosnapshot"
    assert zfs.parse_temp_state(fixture_lines("rescue_zfs_temp_exported.txt")) == {"imported": False, "datasets": {}}


def temp_state(**datasets) -> dict:
    base = {"state": "ok", "written": 0, "mounted": None, "leftovers": []}
    return {"imported": True, "datasets": {f"{POOL}/temp/{k}": {**base, **v} for k, v in datasets.items()}}


def rolled_back(monkeypatch, state):
    return run_op(monkeypatch, zfs, zfs.rolled_back, {zfs.ZfsTempState: state}, pool_name=POOL, temps=TEMPS,
                  mountpoints=RAIDZ1_MOUNTS)


def test_temp_not_written_or_holding_only_the_footprint_is_a_noop(monkeypatch):
    commands, _, fake = rolled_back(monkeypatch, temp_state(root={"written": 86016, "mounted": "/mnt"}, tmp={}))
    assert commands == []
    assert fake.noops == [f"{POOL}/temp/root holds nothing but the install's mount points and etc/nixos since "
                          f"@empty; {POOL}/temp/tmp has nothing written since @empty"]


def test_only_written_temp_datasets_are_rolled_back(monkeypatch):
    state = temp_state(root={"written": 86016, "mounted": "/mnt", "leftovers": [("f", "junk")]}, tmp={})
    commands, _, _ = rolled_back(monkeypatch, state)
    assert commands == [str(zfs.rollback_command(POOL, [f"{POOL}/temp/root"]))]
    # written, not mounted: what it holds cannot be seen, so it is rolled back
    commands, _, _ = rolled_back(monkeypatch, temp_state(root={}, tmp={"written": 4096}))
    assert commands == [str(zfs.rollback_command(POOL, [f"{POOL}/temp/tmp"]))]


@pytest.mark.parametrize("state, message", [
    ("nosnapshot", f"refusing to roll back {POOL}/temp/tmp: its snapshot {POOL}/temp/tmp@empty is missing"),
    ("absent", f"refusing to roll back {POOL}/temp/tmp: the dataset is missing"),
])
def test_missing_empty_snapshot_is_refused(monkeypatch, state, message):
    with pytest.raises(TabulaError, match=message):
        rolled_back(monkeypatch, temp_state(root={"written": 5}, tmp={"state": state}))


def test_rollback_planned_while_the_pool_is_not_imported(monkeypatch, planning):
    commands, _, _ = rolled_back(monkeypatch, {"imported": False, "datasets": {}})
    assert commands == [str(zfs.rollback_command(POOL, [n for n, _ in TEMPS]))]


FAKE_ZFS = r"""#!/bin/sh
echo "zfs $*" >> "$LOG"
case "$1" in
  list) [ "$5" != "$MISSING" ] ;;
esac
"""


def test_rollback_command_checks_every_snapshot_before_rolling_back(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "zfs").write_text(FAKE_ZFS)
    (bin_dir / "zfs").chmod(0o755)
    script = shlex.split(str(zfs.rollback_command(POOL, [n for n, _ in TEMPS])))[2]
    env = {"LOG": str(tmp_path / "log"), "MISSING": f"{POOL}/temp/tmp@empty"}
    os.environ.update(env)
    try:
        ran = sh(script, tmp_path, bin_dir)
        assert ran.returncode == 1
        assert f"refusing to roll back {POOL}/temp/tmp: its snapshot {POOL}/temp/tmp@empty is missing" in ran.stderr
        assert not [c for c in (tmp_path / "log").read_text().splitlines() if "rollback" in c]
        os.environ["MISSING"] = "none"
        (tmp_path / "log").unlink()
        ran = sh(script, tmp_path, bin_dir)
        assert ran.returncode == 0, ran.stderr
        assert [c for c in (tmp_path / "log").read_text().splitlines() if "rollback" in c] == [
            f"zfs rollback -r {POOL}/temp/root@empty", f"zfs rollback -r {POOL}/temp/tmp@empty"]
    finally:
        for key in env:
            os.environ.pop(key, None)


# --- /etc/nixos put back --------------------------------------------------------------------------


def test_config_restored_noop_when_identical(monkeypatch):
    commands, _, fake = run_op(monkeypatch, persist, persist.config_restored, {DirectoryDigest: "ab12"},
                               source="/mnt/persist/etc/nixos", dest="/mnt/etc/nixos")
    assert commands == [] and fake.noops == ["/mnt/etc/nixos already holds the same files as /mnt/persist/etc/nixos"]


def test_config_restore_script_in_a_real_shell(tmp_path):
    source, dest = tmp_path / "persist/etc/nixos", tmp_path / "root/etc/nixos"
    run = ["sh", "-c", persist.RESTORE_CONFIG_SCRIPT, "restore", str(source), str(dest)]
    dest.mkdir(parents=True)
    (dest / "stale.nix").write_text("old")
    ran = subprocess.run(run, capture_output=True, text=True)
    assert ran.returncode == 1 and "is missing or empty" in ran.stderr
    assert (dest / "stale.nix").exists()                         # nothing removed
    source.mkdir(parents=True)
    (source / "flake.nix").write_text("{}")
    os.chmod(source / "flake.nix", 0o644)
    ran = subprocess.run(run, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["flake.nix"]


# --- the stages -----------------------------------------------------------------------------------


def test_a_tmpfs_root_needs_no_rescue(monkeypatch, caplog):
    from operations.settings import Settings
    profile = load_profile("light-tmpfs-f2fs", {"hostname": "tabula-light", "disk": "/dev/disk/by-id/x"})
    assert not btrfs.rollback_targets(profile) and not zfs.temp_datasets(profile)
    called = []
    monkeypatch.setattr(stages.disks, "guard", lambda *a, **k: called.append("guard"))
    monkeypatch.setattr(stages, "host", type("H", (), {"print_prefix": "[t] "}))
    stages.rescue(Settings.of(profile))
    assert called == []
    assert "/ is a tmpfs, empty at every boot: it needs no rescue" in caplog.text


def test_a_pool_to_rescue_must_be_there(monkeypatch):
    profile = load_profile("zfs-raidz1", {"hostname": "tabula-zfs", "ssd": "/dev/disk/by-id/a", "rz1": "/dev/disk/by-id/b",
                                          "rz2": "/dev/disk/by-id/c", "rz3": "/dev/disk/by-id/d",
                                          "authorized_keys": [TEST_AUTHORIZED_KEY]})
    pool, devices = profile.pools["rpool"], zfs.member_devices(profile, "rpool")
    facts = {zfs.ZfsModuleLoaded: True, zfs.ZfsPoolState: {"state": "absent"}, zfs.ZfsImportablePools: [POOL]}
    commands, _, fake = run_op(monkeypatch, zfs, zfs.present, facts, pool=pool, devices=devices)
    assert commands == [] and fake.noops == [f"pool {POOL} is found on /dev/disk/by-partlabel, ready to import"]
    facts[zfs.ZfsImportablePools] = []
    with pytest.raises(TabulaError, match=f"refusing to rescue pool {POOL}: it is neither imported nor found"):
        run_op(monkeypatch, zfs, zfs.present, facts, pool=pool, devices=devices)
