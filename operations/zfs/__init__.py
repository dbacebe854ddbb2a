"""
The zfs layer: pools with their exact topology, datasets by category (temp/local/remote) with
their properties, native encryption, the ``@empty`` snapshots of temp datasets, and the NixOS
settings that import, unlock and roll back the pool at boot.

Pools and datasets hang in the profile tree (``Profile.pools``; members are partitions whose
content is ``type: zfs``), mounts are done by the mounts layer from ``Profile.all_mounts()``
(datasets use ``mountpoint=legacy``), so this layer only creates and checks.

    common.py     what every part shares (the empty snapshot, the key, the walk of the pools)
    facts.py      what it reads
    pool.py       the kernel module, the pool with its topology, its export
    view.py       the read-only view of an exported pool (a converged run writes nothing)
    datasets.py   the datasets, @empty, properties
    nix.py        ZFS support, hostId, the key prompt, the initrd rollback to @empty
    rescue.py     the rescue's import, keys and rollback to @empty
"""

from __future__ import annotations

import shlex

from operations.adoptlit import EPHEMERAL_ROOTS, mounted_at
from operations.contract import Layer, Target
from operations.diskolit import DiskoError, Script, new_flag
from operations.nixlit import DeviceIds, NixFragments
from operations.mounts import Mounts
from operations.profile import Dataset, Pool, Profile, ZfsMember
from operations.run import FactRequest, Run
from operations.target import Written
from operations.zfs.common import (EMPTY_SNAPSHOT, KEY, ONE_TIME_PROPERTIES, VALUE_ALIASES, ZfsError, canonical,
                                   encryption_roots, member_devices, ordered_datasets, search_dirs, temp_datasets)
from operations.zfs.datasets import dataset, dataset_properties, property_drift, property_problems
from operations.zfs.facts import (SnapshotDiff, ZfsImportablePools, ZfsModuleLoaded, ZfsPoolDatasets, ZfsPoolState,
                                  ZfsTempState, ZpoolProperties, parse_snapshot_diff, parse_temp_state, parse_zpool_status)
from operations.zfs.nix import nix_configuration, nix_fragments, nix_rollback_service, rollback_script
from operations.zfs.pool import (create_pool_command, describe_topology, export_pool, kernel_module, pool, pool_options,
                                 topology_differences)
from operations.zfs.rescue import keys_loaded, present, rollback_command, rolled_back
from operations.zfs.view import (PoolView, ZfsReadOnlyView, ZfsViewClosed, load_keys_script, make_view_writable,
                                 read_only_mount_command, unmount_pool_script)

# (the name tests/e2e/test_zfs_profiles.py uses)
_load_keys_script = load_keys_script

__all__ = ["EMPTY_SNAPSHOT", "KEY", "ONE_TIME_PROPERTIES", "VALUE_ALIASES", "ZfsError", "canonical", "encryption_roots",
           "member_devices", "ordered_datasets", "search_dirs", "temp_datasets", "dataset", "dataset_properties",
           "property_drift", "property_problems", "SnapshotDiff", "ZfsImportablePools", "ZfsModuleLoaded",
           "ZfsPoolDatasets", "ZfsPoolState", "ZfsTempState", "ZpoolProperties", "parse_snapshot_diff",
           "parse_temp_state", "parse_zpool_status", "nix_configuration", "nix_fragments", "nix_rollback_service",
           "rollback_script", "create_pool_command", "describe_topology", "export_pool", "kernel_module", "pool",
           "pool_options", "topology_differences", "keys_loaded", "present", "rollback_command", "rolled_back",
           "PoolView", "ZfsReadOnlyView", "ZfsViewClosed", "load_keys_script", "make_view_writable",
           "read_only_mount_command", "unmount_pool_script", "pool_view", "LAYER"]

_DIFF_KINDS = {"F": "file", "/": "directory", "@": "link"}


def pool_view(run: Run, pool_def: Pool) -> PoolView:
    """How this run reads the pool when it leaves it exported: the profile's mounts, the
    encryption roots and the run's key."""
    return PoolView(mounts=tuple(run.profile.all_mounts()), encryption_roots=encryption_roots(pool_def),
                    key=run.secrets.get(KEY), exported_at_end=run.settings.tabula_export_pools)


# What an encryption root says in ``encryption``, never in its properties.
_ENCRYPTION_PROPERTIES = ("encryption", "keyformat", "keylocation", "pbkdf2iters")


def local_properties(props: dict, root: str) -> dict[str, str]:
    """The properties set on a dataset itself (``zfs get``'s source ``local``); a mount point as
    the installed system has it (a pool imported under ``root`` shows it below the altroot)."""
    found = {key: value for key, (value, source) in props.items()
             if source == "local" and key not in _ENCRYPTION_PROPERTIES}
    if root != "/" and found.get("mountpoint", "").startswith(root.rstrip("/") + "/"):
        found["mountpoint"] = found["mountpoint"][len(root.rstrip("/")):]
    return found


def unadoptable_pool(topology: dict, root_props: dict) -> str | None:
    """Why a pool's layout is not one a profile can hold, or None."""
    if any(not isinstance(member, str) for member in topology.get("log", []) + topology.get("cache", [])):
        return "a mirrored log or cache: a profile lists log and cache members as single devices"
    if topology.get("spare"):
        return "hot spares: a profile has no place for them"
    if root_props.get("encryption", ("off",))[0] not in ("off", "-"):
        return "its root dataset is encrypted: a profile encrypts datasets below the root only"
    return None


def adopted_dataset(found, draft, pool_name: str, full: str, props: dict, datasets: dict) -> dict:
    node: dict = {"name": full.removeprefix(f"{pool_name}/"), "properties": local_properties(props, found.root)}
    mounts = found.mounts_of(full)
    if mounts:
        mountpoint = sorted(mounts)[0]
        node.update(mounted_at(mountpoint, mounts[mountpoint]["options"]))
    if f"{full}@{EMPTY_SNAPSHOT}" in datasets:
        node["empty_snapshot"] = True
    elif node.get("mountpoint") == "/":
        draft.refuse(full, f"the root dataset has no @{EMPTY_SNAPSHOT}: nothing rolls it back at boot (an "
                           f"ephemeral root is {EPHEMERAL_ROOTS})")
    if props.get("encryptionroot", ("-",))[0] == full and props.get("encryption", ("off",))[0] != "off":
        node["encryption"] = {"keyformat": props["keyformat"][0], "keylocation": props["keylocation"][0],
                              "encryption": props["encryption"][0]}
    return node


class ZfsLayer(Layer):
    name = "zfs"
    absent = "no ZFS pool"

    def make(self, run: Run) -> None:
        """Pools imported or created, datasets with properties, @empty snapshots, keys loaded. A
        run that exports the pools at the end reads an exported pool read-only."""
        profile = run.profile
        if not profile.pools:
            return
        key = run.secrets.get(KEY)
        kernel_module(run, name="ZFS kernel module")
        for pool_key, pool_def in profile.pools.items():
            devices = member_devices(profile, pool_key)
            view = pool_view(run, pool_def)
            pool(run, pool_def, devices, view=view, name=f"ZFS pool {pool_def.name}", **view.stdin())
            dataset(run, pool_def.name, properties=dict(pool_def.root_properties), create=False,
                    name=f"ZFS properties {pool_def.name}")
            for ds in ordered_datasets(pool_def):
                full = f"{pool_def.name}/{ds.name}"
                extra = {}
                if ds.encryption:
                    extra["_stdin"] = key.reveal()
                    if len(key.reveal()) < 8:
                        raise ZfsError(f"{key.source}: a ZFS passphrase needs at least 8 characters")
                dataset(run, full, properties=dataset_properties(ds),
                        encryption=ds.encryption.model_dump() if ds.encryption else None,
                        empty_snapshot=ds.empty_snapshot, name=f"ZFS dataset {full}", **extra)

    def close(self, run: Run) -> None:
        """At the very end: every pool unmounted and exported, ready for the (next) boot."""
        if run.settings.tabula_export_pools:
            for pool_def in run.profile.pools.values():
                export_pool(run, pool_def.name, name=f"ZFS export {pool_def.name}")

    def rescue(self, run: Run) -> None:
        """Each pool imported (read-only while nothing needs writing, when the run exports it at
        the end), never created; keys loaded; temp datasets rolled back to @empty."""
        profile = run.profile
        if not profile.pools:
            return
        key = run.secrets.get(KEY)
        mountpoints = tuple(m.mountpoint for m in profile.all_mounts())
        kernel_module(run, name="ZFS kernel module")
        for pool_key, pool_def in profile.pools.items():
            devices = member_devices(profile, pool_key)
            present(run, pool_def, devices, name=f"ZFS pool {pool_def.name} found")
            view = pool_view(run, pool_def)
            pool(run, pool_def, devices, view=view, name=f"ZFS pool {pool_def.name}", **view.stdin())
            if view.encryption_roots:
                keys_loaded(run, pool_def.name, view.encryption_roots, name=f"ZFS keys {pool_def.name}",
                            _stdin=key.reveal())
            temps = tuple((f"{pool_def.name}/{ds.name}", ds.mountpoint) for ds in ordered_datasets(pool_def)
                          if ds.empty_snapshot)
            if temps:
                rolled_back(run, pool_def.name, temps, mountpoints,
                            name=f"ZFS rollback to @{EMPTY_SNAPSHOT}: {', '.join(n.split('/', 1)[1] for n, _ in temps)}")

    def adopt_reads(self, found) -> list[FactRequest]:
        return [request for pool_name in found.pools for request in (
            (ZfsPoolState, {"pool_name": pool_name}), (ZfsPoolDatasets, {"pool_name": pool_name}),
            (ZpoolProperties, {"pool_name": pool_name, "properties": ("ashift",)}))]

    def adopt(self, found, draft) -> None:
        """Each imported pool whose members are partitions of the described disks: its topology
        by partlabel, ashift, the properties set on it and on each dataset, where each is
        mounted, @empty, encryption roots. An exported pool is refused (import it first)."""
        adopted = set(draft.adopted_devices())
        for pool_name in found.exported_pools:
            draft.refuse(pool_name, f"the ZFS pool is not imported: import it (zpool import -N -R {found.root} "
                                    f"{pool_name}) and adopt again")
        for pool_name in found.pools:
            topology = found.fact(ZfsPoolState, pool_name=pool_name).get("topology", {})
            datasets = found.fact(ZfsPoolDatasets, pool_name=pool_name)
            problem = unadoptable_pool(topology, datasets.get(pool_name, {}))
            if problem:
                draft.refuse(pool_name, problem)
                continue
            members = [dev for _, group in topology.get("vdevs", []) for dev in group]
            members += topology.get("log", []) + topology.get("cache", [])
            outside = [dev for dev in members if dev not in adopted or not (found.device(dev) or {}).get("partlabel")]
            if outside:
                draft.refuse(pool_name, f"members {', '.join(outside)} are not named partitions of the described disks")
                continue
            label = {dev: found.device(dev)["partlabel"] for dev in members}
            for dev in members:
                draft.content(dev, {"type": "zfs", "pool": pool_name})
            draft.pools[pool_name] = {
                "name": pool_name,
                "vdevs": [{"mode": mode, "members": [label[d] for d in group]} for mode, group in topology["vdevs"]],
                "log": [label[d] for d in topology.get("log", [])],
                "cache": [label[d] for d in topology.get("cache", [])],
                "options": {"ashift": found.fact(ZpoolProperties, pool_name=pool_name, properties=("ashift",))
                            .get("ashift", "0")},
                "root_properties": local_properties(datasets.get(pool_name, {}), found.root),
                "datasets": [adopted_dataset(found, draft, pool_name, full, props, datasets)
                             for full, props in sorted(datasets.items()) if "@" not in full and full != pool_name],
            }

    def applies(self, profile: Profile) -> bool:
        return bool(profile.pools)

    def owns(self, node) -> bool:
        return isinstance(node, ZfsMember)

    def tools(self, profile: Profile) -> dict[str, str]:
        needed = {}
        for pool_def in profile.pools.values():
            needed.update({"zpool": f"ZFS pool {pool_def.name}", "zfs": f"ZFS pool {pool_def.name}",
                           "zfs kernel module": f"ZFS pool {pool_def.name}"})
        return needed

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        needs_key = any(ds.encryption for pool_def in settings.profile.pools.values() for ds in pool_def.datasets)
        return {KEY: True} if needs_key else {}

    def observe(self, run: Run) -> list[FactRequest]:
        reads: list[FactRequest] = [(ZfsModuleLoaded, {})] if run.profile.pools else []
        for pool_key, pool_def in run.profile.pools.items():
            devices = member_devices(run.profile, pool_key)
            reads += [(ZfsPoolState, {"pool_name": pool_def.name, "devices": tuple(devices.values())}),
                      (ZfsImportablePools, {"search_dirs": search_dirs(devices)}),
                      (ZfsPoolDatasets, {"pool_name": pool_def.name})]
        return reads

    def problems(self, target: Target) -> list[str]:
        """Each pool imported with the profile's topology (real member paths), pool options and root
        properties; each dataset with its properties, ``@empty`` where the profile takes it (and
        nowhere else), encryption with its key loaded, and every dataset below an encrypted one
        inheriting its key. An install exports its pools at the end (``tabula_export_pools``):
        import them first, or verify after a run that keeps them imported."""
        failures = []
        profile = target.settings.profile
        for pool_key, pool_def in profile.pools.items():
            devices = member_devices(profile, pool_key)
            state = target.read(ZfsPoolState, pool_name=pool_def.name, devices=tuple(devices.values()))
            if state.get("state") != "imported":
                failures.append(f"pool {pool_def.name}: not imported (an install exports it at the end: "
                                f"zpool import -N -R /mnt {pool_def.name}, or run with tabula_export_pools=false)")
                continue
            failures += [f"pool {pool_def.name}: {problem}" for problem in topology_differences(pool_def, devices, state)]
            wanted = {key: value for key, value in pool_def.options.items() if key != "cachefile"}
            have = target.read(ZpoolProperties, pool_name=pool_def.name, properties=tuple(wanted)) if wanted else {}
            failures += [f"pool {pool_def.name}: {key}={have.get(key, '')}, the profile wants {value}"
                         for key, value in wanted.items() if have.get(key) != value]
            datasets = target.read(ZfsPoolDatasets, pool_name=pool_def.name)
            failures += property_problems(pool_def.name, dict(pool_def.root_properties), datasets.get(pool_def.name, {}))
            roots = encryption_roots(pool_def)
            for ds in pool_def.datasets:
                full = f"{pool_def.name}/{ds.name}"
                current = datasets.get(full)
                if current is None:
                    failures.append(f"{full}: dataset missing")
                    continue
                failures += property_problems(full, dataset_properties(ds), current)
                has_empty = f"{full}@{EMPTY_SNAPSHOT}" in datasets
                if has_empty != ds.empty_snapshot:
                    failures.append(f"{full}: " + (f"no @{EMPTY_SNAPSHOT} snapshot" if ds.empty_snapshot else
                                                   f"has an @{EMPTY_SNAPSHOT} snapshot the profile does not take"))
                if ds.encryption:
                    wanted_keys = {"encryption": ds.encryption.encryption, "keyformat": ds.encryption.keyformat,
                                   "keylocation": ds.encryption.keylocation, "encryptionroot": full,
                                   "keystatus": "available"}
                    failures += property_problems(full, wanted_keys, current)
                else:
                    above = [r for r in roots if full.startswith(f"{r}/")]
                    if above:
                        failures += property_problems(full, {"encryptionroot": max(above, key=len)}, current)
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        return nix_fragments(profile)

    def gaps(self, run: Run, root: str) -> tuple[list[Written], list[str]]:
        """What each temp dataset got since @empty (``zfs diff``), with its installed path."""
        from_mounts = run.read(Mounts)
        written, how = [], []
        for pool_def in run.profile.pools.values():
            for ds in pool_def.datasets:
                if not ds.empty_snapshot or not ds.mountpoint:
                    continue
                name = f"{pool_def.name}/{ds.name}"
                where = next((point for point, m in from_mounts.items() if m["device"] == name and m["fstype"] == "zfs"),
                             None)
                if where is None:
                    raise ZfsError(f"{name} is not mounted: import the pool and mount it (or run the install "
                                   "deploy, which mounts it under /mnt) to compare it with @empty")
                for change, kind, path in run.read(SnapshotDiff, dataset=name, snapshot=EMPTY_SNAPSHOT):
                    if change == "-" or (change == "M" and kind == "/"):
                        continue        # gone since @empty, or a folder whose entries changed (listed themselves)
                    relative = path.removeprefix(where.rstrip("/")).lstrip("/")
                    written.append(Written(f"{ds.mountpoint.rstrip('/')}/{relative}" if relative else ds.mountpoint,
                                           _DIFF_KINDS.get(kind, "other")))
                how.append(f"zfs diff {name}@{EMPTY_SNAPSHOT}")
        return written, how

    def disko(self, profile: Profile, context) -> dict:
        """Each pool as a zpool node with the exact topology, its options, root properties and
        datasets (their @empty taken by hooks only when this run created them)."""
        if not profile.pools:
            return {}
        return {"zpool": {pool_def.name: _zpool_node(pool_def, member_devices(profile, key))
                          for key, pool_def in profile.pools.items()}}

    def disko_node(self, node: ZfsMember, device: str, part, context) -> dict | None:
        """A pool member; a log member is left without content (disko would count it as a data
        member): the pool's postCreateHook adds it."""
        pool_def = context.profile.pools[node.pool]
        if part.label in pool_def.log:
            return None
        return {"type": "zfs", "pool": pool_def.name}


def dataset_node(pool_def: Pool, ds: Dataset) -> dict:
    options = {**dataset_properties(ds), **(ds.encryption.model_dump() if ds.encryption else {})}
    if not ds.mountpoint and options.get("canmount") != "off" and options.get("mountpoint") != "none":
        raise DiskoError(f"dataset {pool_def.name}/{ds.name} has no mountpoint: disko mounts every dataset that is "
                         "not canmount=off or mountpoint=none")
    node = {"type": "zfs_fs", "options": options}
    if ds.mountpoint:
        node["mountpoint"] = ds.mountpoint
        if ds.mount_options:
            node["mountOptions"] = list(ds.mount_options)
    if ds.empty_snapshot:
        full = shlex.quote(f"{pool_def.name}/{ds.name}")
        var = new_flag(ds.name)
        node["preCreateHook"] = Script(f"if zfs list -H -o name {full} >/dev/null 2>&1; then {var}=0; else {var}=1; fi")
        node["postCreateHook"] = Script(f'if [ "${var}" = 1 ]; then zfs snapshot {full}@{EMPTY_SNAPSHOT}; fi')
    return node


def _zpool_node(pool_def: Pool, devices: dict[str, str]) -> dict:
    """The exact topology; ``devices``: partlabel -> the device disko's member node names."""
    topology = {"type": "topology",
                "vdev": [{"mode": "" if v.mode == "stripe" else v.mode, "members": [devices[m] for m in v.members]}
                         for v in pool_def.vdevs]}
    if pool_def.cache:
        topology["cache"] = [devices[m] for m in pool_def.cache]
    node = {"type": "zpool", "mode": {"topology": topology}, "options": pool_options(pool_def),
            "rootFsOptions": dict(pool_def.root_properties),
            "datasets": {ds.name: dataset_node(pool_def, ds) for ds in pool_def.datasets}}
    if pool_def.log:
        name = shlex.quote(pool_def.name)
        lines = []
        for label in pool_def.log:
            dev = shlex.quote(devices[label])
            lines += [f'if ! zpool status -LP {name} | grep -q "$(readlink -f {dev}) "; then',
                      f"  zpool add {name} log {dev}",
                      "fi"]
        node["postCreateHook"] = Script("# the log vdev (SLOG): disko's topology has no log\n" + "\n".join(lines))
    return node


LAYER = ZfsLayer()
