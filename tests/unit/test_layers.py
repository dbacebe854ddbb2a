"""The package's import graph reads top-down: stages -> layers -> shared modules, no cycles, and
every import at the top of its module (an import inside a function is how a cycle hides)."""
import ast
from pathlib import Path

import operations

PACKAGE = Path(operations.__file__).parent
# Modules every layer may use; they import no layer.
SHARED = {"errors", "profile", "run", "target", "nixlit", "secrets", "nixpatch", "settings"}
# One module per storage layer: facts, operations, Nix fragment, checks.
LAYERS = {"gpt", "luks", "filesystems", "btrfs", "zfs", "mounts", "persist"}
# What orders and assembles the layers (verify runs every layer's checks).
STAGES = {"stages", "disks", "nixeval", "nixos", "gaps", "disko", "verify"}


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(operations modules imported at the top, imports found inside functions or classes)."""
    tree = ast.parse(path.read_text())
    top = set(tree.body)
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "operations":
            names = [a.name for a in node.names] if node.module == "operations" else [node.module.split(".")[1]]
            if node in top:
                found.update(names)
            else:
                nested.append(f"{path.stem}:{node.lineno} imports {', '.join(names)}")
    return found, nested


def graph() -> dict[str, set[str]]:
    return {path.stem: imports(path)[0] for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def test_every_module_has_a_place():
    assert set(graph()) == SHARED | LAYERS | STAGES


def test_imports_are_at_the_top_of_each_module():
    nested = [line for path in PACKAGE.glob("*.py") for line in imports(path)[1]]
    assert nested == []


def test_shared_modules_import_no_layer_and_layers_no_stage():
    edges = graph()
    upward = [f"{m} -> {d}" for m in SHARED for d in edges[m] if d in LAYERS | STAGES]
    upward += [f"{m} -> {d}" for m in LAYERS for d in edges[m] if d in STAGES]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join(path + (module,))
        if module in done:
            return
        for dependency in edges[module]:
            visit(dependency, path + (module,))
        done.add(module)

    for module in edges:
        visit(module, ())
