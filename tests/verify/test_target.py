"""One test per layer: does the target hold what the profile promises? Each layer's rules live in
the layer (``Layer.problems``, the rules its own steps apply); a failing layer lists one line per
mismatch. Run it as conftest.py says: ``pytest tests/verify --hosts=ssh://install-target``."""
from __future__ import annotations

import pytest

from operations.verify import LAYERS, check_layer

BY_NAME = dict(LAYERS)


def verify_layer(name: str, host, target) -> None:
    layer = BY_NAME[name]
    if not layer.applies(target.settings.profile):
        pytest.skip(f"profile {target.settings.profile.name} has {layer.absent}")
    failures = check_layer(layer, host, target.settings, target.root)
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
