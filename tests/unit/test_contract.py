"""The layer contract (operations.contract.Layer) and its one registry (operations.layers.LAYERS):
every layer implements the whole contract, every layer is in the registry, and the registry is
the only list of layers. And the run is explicit: no state of a run outlives it in a module."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import operations
from operations.contract import Layer
from operations.layers import LAYERS

PACKAGE = Path(operations.__file__).parent
ROOT = PACKAGE.parent


def all_modules() -> list:
    return [importlib.import_module(info.name)
            for info in pkgutil.walk_packages(operations.__path__, prefix="operations.")]


def layer_classes() -> set[type]:
    return {value for module in all_modules() for value in vars(module).values()
            if inspect.isclass(value) and issubclass(value, Layer) and value is not Layer}


def test_every_layer_is_in_the_registry_once():
    assert {type(layer) for layer in LAYERS} == layer_classes()
    names = [layer.name for layer in LAYERS]
    assert len(set(names)) == len(names) == len(LAYERS)
    assert names == ["gpt", "luks", "filesystems", "zfs", "btrfs", "mounts", "nixos", "persist"]   # stage order


REQUIRED = sorted(name for name in Layer.__abstractmethods__)
STEPS = ["make", "mount", "fill", "install", "close", "rescue"]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_every_layer_implements_the_contract(layer):
    cls = type(layer)
    assert isinstance(cls.name, str) and isinstance(cls.absent, str) and cls.absent
    for method in REQUIRED + STEPS:
        mine, contract = getattr(cls, method), getattr(Layer, method)
        assert list(inspect.signature(mine).parameters) == list(inspect.signature(contract).parameters), method
    # each required answer is the layer's own, not the contract's
    assert [m for m in REQUIRED if getattr(cls, m) is getattr(Layer, m)] == []
    assert [m for m in STEPS if getattr(cls, m) is not getattr(Layer, m)], "a layer takes part in some step"


def test_a_class_that_misses_an_answer_is_not_a_layer():
    class Incomplete(Layer):
        name, absent = "incomplete", "nothing"

        def applies(self, profile):
            return False

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_the_registry_is_the_only_list_of_layers():
    """Besides the registry, a module may use a layer or two (the guard: the gpt table's rule,
    the mounts' facts), never walk them by name."""
    layer_modules = {type(layer).__module__.split(".")[1] for layer in LAYERS}
    listing = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        named = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "operations":
                named |= {alias.name for alias in node.names} & layer_modules
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("operations."):
                named |= {node.module.split(".")[1]} & layer_modules
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        named.discard(own)
        if len(named) > 2:
            listing[str(path.relative_to(ROOT))] = sorted(named)
    assert listing == {"operations/layers.py": sorted(layer_modules)}


def test_verify_has_one_test_per_layer():
    source = (ROOT / "tests" / "verify" / "test_target.py").read_text()
    assert [layer.name for layer in LAYERS if f"def test_{layer.name}(" not in source] == []


# --- the explicit run: nothing of a run lives in a module -------------------------------------------

MUTATORS = {"append", "add", "update", "setdefault", "pop", "clear", "extend", "insert", "remove", "discard",
            "popitem", "__setitem__"}


def module_state_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    problems = []
    module_names = {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(target, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            problems.append(f"{where}:{node.lineno}: {type(node).__name__.lower()} {', '.join(node.names)}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                text = ast.unparse(decorator)
                if "cache" in text:
                    problems.append(f"{where}:{node.lineno}: {node.name} is cached across runs ({text})")
            for inner in ast.walk(node):
                target = None
                if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) \
                        and inner.func.attr in MUTATORS and isinstance(inner.func.value, ast.Name):
                    target = inner.func.value.id
                elif isinstance(inner, (ast.Assign, ast.AugAssign)):
                    targets = inner.targets if isinstance(inner, ast.Assign) else [inner.target]
                    target = next((t.value.id for t in targets if isinstance(t, ast.Subscript)
                                   and isinstance(t.value, ast.Name)), None)
                if target in module_names and target not in _locals(node):
                    problems.append(f"{where}:{inner.lineno}: {node.name} changes the module's {target}")
        if isinstance(node, ast.Attribute) and ast.unparse(node) in ("os.environ", "os.getenv") \
                and path.name != "secrets.py":
            problems.append(f"{where}:{node.lineno}: reads the environment (secrets.py alone does)")
    return problems


def _locals(function: ast.FunctionDef) -> set[str]:
    names = {arg.arg for arg in function.args.args + function.args.kwonlyargs}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_no_module_keeps_state_of_a_run():
    """No module-level container a function changes, no global, no cached function (a secret
    cached across runs), no environment read outside secrets.py: a run's state is its Run's."""
    assert [problem for path in sorted(PACKAGE.rglob("*.py")) for problem in module_state_problems(path)] == []


def test_the_state_check_finds_what_it_looks_for(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("import functools, os\n_seen = {}\n\n\ndef remember(key):\n    _seen[key] = 1\n\n\n"
                    "@functools.lru_cache\ndef secret():\n    return os.environ['X']\n\n\n"
                    "def count():\n    global _n\n    _n = 1\n")
    found = module_state_problems(path)
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "global _n", "reads the environment (secrets.py alone does)", "remember changes the module's _seen",
        "secret is cached across runs (functools.lru_cache)"]
