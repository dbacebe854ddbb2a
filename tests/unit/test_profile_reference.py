"""docs/profiles.md is generated from the pydantic models: it fails here when it is stale (a field,
a default, a description or a shipped profile's vars changed and the file was not written again)."""
from tools import profile_reference


def test_the_profile_reference_is_current():
    assert profile_reference.OUT.read_text() == profile_reference.reference(), \
        "docs/profiles.md is stale: run .venv/bin/python tools/profile_reference.py"


def test_every_node_of_a_profile_is_in_it():
    from operations.profile import storage, system
    from pydantic import BaseModel

    nodes = {value for module in (storage, system) for value in vars(module).values()
             if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__
             and not value.__name__.startswith("_") and value.__name__ != "Mount"}
    assert nodes - set(profile_reference.NODES) == set()
    text = profile_reference.reference()
    assert all(f"### {node.__name__}\n" in text for node in profile_reference.NODES)
