"""Tests that need the offline Nix kit (tests/nix, tests/e2e: the VM's nixos-generate-config comes
from it) are skipped with one message when it is missing (tools/nixkit.py: what it is, where it is
looked for, how to point at one); the unit tests run without it."""
from pathlib import Path

import pytest

from tools import nixkit

NEEDS_KIT = ("nix", "e2e")


def pytest_collection_modifyitems(config, items):
    missing = nixkit.missing_kit()
    if not missing:
        return
    tests = Path(__file__).parent
    skip = pytest.mark.skip(reason=missing.replace("\n", " "))
    for item in items:
        if any(tests / folder in Path(item.fspath).parents for folder in NEEDS_KIT):
            item.add_marker(skip)
