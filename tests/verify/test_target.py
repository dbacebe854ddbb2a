"""One test per layer: does the target hold what the profile promises? Each layer's checks live in
its module (``operations/<layer>.py``, section "checks"); a failing layer lists one line per
mismatch. Run it as conftest.py says: ``pytest tests/verify --hosts=ssh://install-target``."""
from __future__ import annotations

import pytest

from operations.verify import LAYERS, check_layer

CHECKS = dict(LAYERS)
# What a layer checks exists in the profile (else the layer is skipped, saying why).
APPLIES = {
    "luks": lambda p: bool(p.luks_devices()) or "no LUKS container",
    "filesystems": lambda p: bool(p.filesystems() or p.swaps()) or "no filesystem or swap partition",
    "zfs": lambda p: bool(p.pools) or "no ZFS pool",
    "btrfs": lambda p: any(fs.subvolumes for _, fs in p.filesystems()) or "no btrfs subvolumes",
}


def verify_layer(layer: str, host, target) -> None:
    applies = APPLIES.get(layer, lambda p: True)(target.settings.profile)
    if applies is not True:
        pytest.skip(f"profile {target.settings.profile.name} has {applies}")
    failures = check_layer(CHECKS[layer], host, target.settings, target.root)
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def test_gpt(host, target):
    verify_layer("gpt", host, target)


def test_luks(host, target):
    verify_layer("luks", host, target)


def test_filesystems(host, target):
    verify_layer("filesystems", host, target)


def test_zfs(host, target):
    verify_layer("zfs", host, target)


def test_btrfs(host, target):
    verify_layer("btrfs", host, target)


def test_mounts(host, target):
    verify_layer("mounts", host, target)


def test_nixos(host, target):
    verify_layer("nixos", host, target)


def test_persist(host, target):
    verify_layer("persist", host, target)

