"""
Datasets with their properties: created parents first (a temp dataset's ``@empty`` taken in the
same command, never later, never again), the encrypted dataset's key on stdin, settable property
drift fixed with ``zfs set``, one-time properties never touched. ``property_problems`` is the
rule the step and verify apply.
"""

from __future__ import annotations

from pyinfra.api import QuoteString, StringCommand

from operations.profile import Dataset
from operations.run import Made, Run, operation
from operations.zfs.common import EMPTY_SNAPSHOT, ONE_TIME_PROPERTIES, ZfsError, canonical
from operations.zfs.facts import ZfsPoolDatasets


def dataset_properties(dataset: Dataset) -> dict[str, str]:
    """The properties a dataset is created with (mounted datasets are always legacy)."""
    props = dict(dataset.properties)
    if dataset.mountpoint:
        props.setdefault("mountpoint", "legacy")
    return props


def property_drift(wanted: dict[str, str], current: dict) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(settable differences, one-time differences) between wanted and the fact's properties."""
    settable, fixed = {}, {}
    for key, value in wanted.items():
        have = current.get(key, (None, None))[0]
        if have == canonical(key, value):
            continue
        if key in ONE_TIME_PROPERTIES:
            fixed[key] = (have, value)
        else:
            settable[key] = value
    return settable, fixed


@operation()
def dataset(run: Run, dataset_name: str, properties: dict[str, str] | None = None, encryption: dict[str, str] | None = None,
            empty_snapshot: bool = False, create: bool = True):
    """
    Create a filesystem dataset (with its ``@empty`` snapshot taken in the same command), or fix
    settable property drift on an existing one with ``zfs set``; load the key of an encrypted one.
    The encryption key is read from stdin: pass it with ``_stdin=`` (never in argv).

    + run: the run (facts, what it made)
    + dataset_name: full name, e.g. ``rpool-2790ee34/temp/root``
    + properties: properties to create with and keep (one-time ones are only checked)
    + encryption: ``{"encryption": ..., "keyformat": ..., "keylocation": "prompt"}`` for an encryption root
    + empty_snapshot: snapshot ``@empty`` right after creation (never later, never again)
    + create: False for a pool's root dataset (created by ``zpool create``): only its properties

    **Example:**

    .. code:: python

        zfs.dataset(run, "rpool-2790ee34/remote", properties={"canmount": "off"},
                    encryption={"encryption": "aes-256-gcm", "keyformat": "passphrase", "keylocation": "prompt"},
                    _stdin=run.secrets["ZFS_KEY"].reveal())
    """
    pool_name = dataset_name.split("/", 1)[0]
    wanted = {**(properties or {}), **(encryption or {})}
    if run.created_this_run(Made.pool(pool_name)):
        # A pool this run just made holds only what this run created in it (zfs create refuses
        # an existing dataset); its root dataset got its properties from zpool create -O.
        if not create:
            run.noop(f"dataset {dataset_name} got its properties from this run's zpool create")
            return
        datasets = {}
    else:
        datasets = run.read(ZfsPoolDatasets, pool_name=pool_name)
    current = datasets.get(dataset_name)

    if current is None and not create:
        run.noop(f"dataset {dataset_name} comes with its pool (which is not imported yet)")
        return
    if current is None:
        bits: list = ["zfs", "create"]
        for key, value in wanted.items():
            bits += ["-o", QuoteString(f"{key}={value}")]
        bits.append(QuoteString(dataset_name))
        if empty_snapshot:
            # The same command: nothing can be written to the dataset before its @empty exists.
            bits += ["&&", "zfs", "snapshot", QuoteString(f"{dataset_name}@{EMPTY_SNAPSHOT}")]
        run.tell(f"create {'encrypted ' if encryption else ''}dataset {dataset_name}"
             + (f" and its @{EMPTY_SNAPSHOT} snapshot" if empty_snapshot else "")
             + (f": {', '.join(f'{k}={v}' for k, v in (properties or {}).items())}" if properties else ""))
        run.record_created(Made.dataset(dataset_name))
        yield StringCommand(*bits)
        return

    settable, fixed = property_drift(wanted, current)
    if fixed:
        details = ", ".join(f"{k}={have} (profile: {want})" for k, (have, want) in fixed.items())
        raise ZfsError(f"dataset {dataset_name} has {details}: set only at creation, tabula will not recreate it")
    if empty_snapshot and f"{dataset_name}@{EMPTY_SNAPSHOT}" not in datasets:
        raise ZfsError(
            f"dataset {dataset_name} exists without @{EMPTY_SNAPSHOT}: its content is unknown, so tabula will not "
            f"snapshot it now; destroy it (zfs destroy -r {dataset_name}) and re-run to recreate it empty"
        )
    changed = False
    if settable:
        changed = True
        run.tell(f"dataset {dataset_name}: set {', '.join(f'{k}={v}' for k, v in settable.items())}")
        yield StringCommand("zfs", "set", *[QuoteString(f"{k}={v}") for k, v in settable.items()],
                            QuoteString(dataset_name))
    if encryption and current.get("keystatus", ("",))[0] == "unavailable":
        changed = True
        run.tell(f"dataset {dataset_name}: load its key")
        yield StringCommand("zfs", "load-key", QuoteString(dataset_name))
    if not changed:
        run.noop(f"dataset {dataset_name} exists with the profile's properties"
                  + (f" and its @{EMPTY_SNAPSHOT} snapshot" if empty_snapshot else "")
                  + (" and its key loaded" if encryption else ""))




def property_problems(name: str, wanted: dict[str, str], current: dict) -> list[str]:
    """Each wanted property the dataset (``ZfsPoolDatasets``' entry) does not have, one line each
    (what ``property_drift`` finds, settable or not)."""
    settable, fixed = property_drift(wanted, current)
    return [f"{name}: {key}={have if (have := current.get(key, (None, None))[0]) is not None else '(none)'}, "
            f"the profile wants {value}" for key, value in wanted.items() if key in settable or key in fixed]
