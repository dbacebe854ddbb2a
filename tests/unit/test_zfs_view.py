"""The read-only view of an exported pool (operations.zfs.PoolView): a converged re-run that leaves
the pool exported reads it without writing and reports no change; the first stage with work to do
makes it writable first. The e2e proof (same uberblock and history): tests/e2e/test_zfs_profiles.py."""

import shlex

from operations import mounts, persist, zfs
from operations.run import Made
from operations.profile import load_profile
from operations.secrets import Secret
from tests.unit.pyinfra_fake import fake_run, run_op
from tests.unit.test_zfs import raidz1_state
from tests.unit.vm_vars import ZFS_VARS

KEY = "zfs view key 0123"


def profile_and_view():
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    (pool,) = profile.pools.values()
    view = zfs.PoolView(mounts=tuple(profile.all_mounts()), encryption_roots=(f"{pool.name}/remote",),
                        key=Secret(KEY, "TABULA_ZFS_KEY"))
    return profile, pool, view


def opened(view_lines):
    return ["imported", *view_lines, "open"]


def test_an_exported_pool_is_read_through_a_read_only_import_and_nothing_is_yielded(monkeypatch):
    profile, pool, view = profile_and_view()
    devices = zfs.member_devices(profile, "rpool")
    states = iter([{"state": "absent"}, {**raidz1_state(), "readonly": True}])
    facts = {zfs.ZfsPoolState: None, zfs.ZfsImportablePools: [pool.name],
             zfs.ZfsReadOnlyView: opened(["key " + view.encryption_roots[0], "mounted /mnt", "mounted /mnt/boot"])}
    run = fake_run(facts)
    fake = run.host
    fake.get_fact = _answer(fake.get_fact, zfs.ZfsPoolState, lambda: next(states))
    commands = list(zfs.pool._inner(run, pool, devices, view=view))
    assert commands == []
    assert "imported read-only to compare" in fake.noops[0] and "nothing written" in fake.noops[0]
    assert "ZfsReadOnlyView" in fake.reads
    # the first change of any later stage is preceded by making the pool writable
    assert run.phase().before_change


def test_without_a_view_an_exported_pool_is_imported(monkeypatch):
    profile, pool, _view = profile_and_view()
    texts, _, fake = run_op(monkeypatch, zfs, zfs.pool, {zfs.ZfsPoolState: {"state": "absent"},
                                                         zfs.ZfsImportablePools: [pool.name]},
                            pool=pool, devices=zfs.member_devices(profile, "rpool"))
    assert len(texts) == 1 and "zpool import -N" in texts[0] and "readonly" not in texts[0]
    assert "ZfsReadOnlyView" not in fake.reads


def test_a_view_left_by_an_interrupted_run_is_made_writable_when_the_run_keeps_the_pool(monkeypatch):
    profile, pool, view = profile_and_view()
    keep = zfs.PoolView(view.mounts, view.encryption_roots, view.key, exported_at_end=False)
    ro = {"device": "x", "fstype": "zfs", "options": ["ro", "nosuid"]}
    texts, stdins, fake = run_op(monkeypatch, (zfs, mounts), zfs.pool,
                                 {zfs.ZfsPoolState: {**raidz1_state(), "readonly": True},
                                  mounts.Mounts: {"/mnt": ro, "/mnt/remote": ro}},
                                 pool=pool, devices=zfs.member_devices(profile, "rpool"), view=keep)
    script = shlex.split(texts[0])[2]
    # its read-only mounts go first (else the export fails: busy), then they come back writable
    assert script.index("umount /mnt/remote") < script.index(f"zpool export {pool.name}") < \
        script.index("zpool import -N -o cachefile=none") < script.index(f"rpool-{profile.hash}/remote/system /mnt/remote")
    assert stdins == [[KEY]] and "ZfsReadOnlyView" not in fake.reads


def test_the_view_is_made_writable_before_the_first_change_with_its_mounts_again(monkeypatch):
    profile, pool, view = profile_and_view()
    ro = {"device": "x", "fstype": "zfs", "options": ["ro", "nosuid", "nodev", "noatime"]}
    run = fake_run({mounts.Mounts: {"/mnt": ro, "/mnt/remote": ro}})
    fake = run.host
    run.before_first_change(f"pool {pool.name}",
                            lambda: [zfs.make_view_writable(run, pool.name, ("/dev/disk/by-partlabel",), view)])
    commands = list(persist.config_copy._inner(run, "/mnt/etc/nixos", "/mnt/remote/etc/nixos"))
    assert len(commands) == 2, [str(c) for c in commands]
    switch = shlex.split(str(commands[0]))[2]
    lines = switch.splitlines()
    assert lines.index("umount /mnt/remote") < lines.index("umount /mnt") < lines.index(f"zpool export {pool.name}")
    assert f"zpool import -N -o cachefile=none -d /dev/disk/by-partlabel {pool.name}" in lines
    assert f'printf "%s\\n" "$key" | zfs load-key {pool.name}/remote' in switch
    assert KEY not in switch and commands[0].connector_arguments["_stdin"] == [KEY]
    # mounted again as the profile says (read-write), parents first
    assert switch.index(f"rpool-{profile.hash}/temp/root /mnt") < switch.index(f"rpool-{profile.hash}/remote/system")
    assert "cp -a" in str(commands[1])
    assert not run.phase().before_change     # once
    assert run.created_this_run(Made.writable_pool(pool.name))
    assert fake.reads.count("Mounts") == 1


def test_export_closes_a_view_nothing_wrote_through_as_a_read(monkeypatch):
    _profile, pool, _view = profile_and_view()
    texts, _, fake = run_op(monkeypatch, zfs, zfs.export_pool,
                            {zfs.ZfsPoolState: {**raidz1_state(), "readonly": True}, zfs.ZfsViewClosed: "closed"},
                            pool_name=pool.name)
    assert texts == []
    assert "ZfsViewClosed" in fake.reads
    assert "exported as the run found it" in fake.noops[0]


def test_export_of_a_writable_pool_unmounts_and_exports(monkeypatch):
    _profile, pool, _view = profile_and_view()
    run = fake_run({zfs.ZfsPoolState: raidz1_state()})
    fake = run.host
    commands = list(zfs.export_pool._inner(run, pool_name=pool.name))
    assert len(commands) == 1 and str(commands[0]).endswith(f"&& zpool export {pool.name}")
    assert "umount -R" in str(commands[0])
    assert "ZfsViewClosed" not in fake.reads


def test_view_fact_imports_read_only_loads_keys_from_stdin_and_mounts_read_only():
    _profile, pool, view = profile_and_view()
    profile = load_profile("zfs-raidz1", ZFS_VARS)
    mounts_ = tuple(("/mnt" if m.mountpoint == "/" else "/mnt" + m.mountpoint, zfs.read_only_mount_command(m) or "")
                    for m in profile.all_mounts())
    command = zfs.ZfsReadOnlyView().command(pool.name, ("/dev/disk/by-partlabel",), view.encryption_roots, mounts_)
    script = shlex.split(command.get_raw_value())[2]
    assert f"zpool import -N -o readonly=on -o cachefile=none -d /dev/disk/by-partlabel {pool.name}" in script
    assert f"mount -t zfs -o ro,nosuid,nodev,noatime {pool.name}/temp/root /mnt" in script
    assert "mount -t vfat -o ro,fmask=0022,dmask=0022" in script
    assert KEY not in script
    assert zfs.ZfsReadOnlyView().process(["view imported", "view mounted /mnt", "view open"]) == \
        ["imported", "mounted /mnt", "open"]


def test_a_tmpfs_stops_the_view():
    light = load_profile("light-tmpfs-f2fs", {"hostname": "tabula-light", "disk": "/dev/disk/by-id/virtio-TABULA-SSD"})
    root = next(m for m in light.all_mounts() if m.mountpoint == "/")
    assert zfs.read_only_mount_command(root) is None
    bind = next(m for m in light.all_mounts() if m.mountpoint == "/nix")
    assert "remount,bind,ro" in zfs.read_only_mount_command(bind)


def _answer(get_fact, fact_class, value):
    def answer(fact, **kwargs):
        if fact is fact_class:
            get_fact(fact, **kwargs)
            return value()
        return get_fact(fact, **kwargs)
    return answer


def test_the_plan_exports_a_pool_the_run_creates_or_imports(monkeypatch):
    _profile, pool, _view = profile_and_view()
    for made in (Made.pool(pool.name), Made.imported_pool(pool.name)):
        run = fake_run({zfs.ZfsPoolState: {"state": "absent"}})
        run.record_created(made)
        commands = list(zfs.export_pool._inner(run, pool_name=pool.name))
        assert len(commands) == 1 and f"zpool export {pool.name}" in str(commands[0]), made
    run = fake_run({zfs.ZfsPoolState: {"state": "absent"}})
    assert list(zfs.export_pool._inner(run, pool_name=pool.name)) == []
    assert "is not imported" in run.host.noops[0]
