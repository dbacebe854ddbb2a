"""The ZFS operations that had no test: the kernel module loaded only when it is not, and the
keys of the encryption roots loaded (from stdin) only where they are not."""
from __future__ import annotations

import pytest

from operations import zfs
from operations.zfs.pool import kernel_module
from operations.zfs.rescue import keys_loaded
from operations.zfs.facts import ZfsModuleLoaded, ZfsPoolDatasets
from tests.unit.pyinfra_fake import fake_run, run_op

POOL = "rpool-e2a50abf"
ROOT = f"{POOL}/remote"


def datasets(keystatus: str) -> dict:
    """ZfsPoolDatasets as its command's output parses (``zfs get -H ... all``: name, property,
    value, source, tab-separated), for a pool whose remote dataset is an encryption root."""
    lines = [f"{POOL}\ttype\tfilesystem\t-", f"{ROOT}\ttype\tfilesystem\t-",
             f"{ROOT}\tencryptionroot\t{ROOT}\t-", f"{ROOT}\tkeystatus\t{keystatus}\t-",
             f"{ROOT}/system\tkeystatus\t{keystatus}\t-"]
    return ZfsPoolDatasets().process(lines)


@pytest.mark.parametrize("loaded, commands, noop", [(True, [], "the zfs kernel module is already loaded"),
                                                     (False, ["modprobe zfs"], None)])
def test_the_kernel_module_is_loaded_only_when_it_is_not(monkeypatch, loaded, commands, noop):
    got, _, host = run_op(monkeypatch, zfs, kernel_module, {ZfsModuleLoaded: loaded})
    assert got == commands
    assert host.noops == ([noop] if noop else [])


def test_loaded_keys_are_a_noop(monkeypatch):
    got, _, host = run_op(monkeypatch, zfs, keys_loaded, {ZfsPoolDatasets: datasets("available")},
                          pool_name=POOL, roots=(ROOT,))
    assert got == [] and host.noops == [f"the key of {ROOT} is loaded"]


def test_an_unloaded_key_is_loaded_from_stdin_never_argv(monkeypatch):
    other = f"{POOL}/vault"
    facts = {ZfsPoolDatasets: {**datasets("unavailable"), other: {"keystatus": ("available", "-")}}}
    got, _, host = run_op(monkeypatch, zfs, keys_loaded, facts, pool_name=POOL, roots=(ROOT, other))
    assert len(got) == 1 and f"zfs load-key {ROOT}" in got[0]
    assert "zfs load-key " + other not in got[0]             # only the roots whose key is not loaded
    assert 'IFS= read -r key' in got[0]                      # the key comes from stdin


def test_keys_of_a_pool_that_is_not_imported(monkeypatch):
    # planning: the pool is imported by an earlier step of this run, so the load is planned
    run = fake_run({ZfsPoolDatasets: {}}, executing=False)
    got, _, _ = run_op(monkeypatch, zfs, keys_loaded, {}, run=run, pool_name=POOL, roots=(ROOT,))
    assert len(got) == 1 and f"zfs load-key {ROOT}" in got[0]
    # executing: not imported by now is an error that says so
    with pytest.raises(zfs.ZfsError, match=f"pool {POOL} is not imported: cannot load the keys of {ROOT}"):
        run_op(monkeypatch, zfs, keys_loaded, {ZfsPoolDatasets: {}}, pool_name=POOL, roots=(ROOT,))
