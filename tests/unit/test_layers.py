"""The package's import graph reads top-down: stages -> layers -> shared modules, no cycles, and
every import at the top of its module (an import inside a function is how a cycle hides). A
layer may be a package (btrfs, zfs): its modules are the layer's."""
import ast
from pathlib import Path

import operations

PACKAGE = Path(operations.__file__).parent
# Modules every layer may use; they import no layer (gpt.types: the GPT type table the profile
# model checks codes against, data only).
SHARED = {"errors", "profile", "run", "factbatch", "target", "nixlit", "diskolit", "secrets", "nixpatch", "settings", "contract",
          "gpt.types"}
# One module or package per layer: facts, operations, Nix fragment, problems.
LAYERS = {"gpt", "luks", "filesystems", "btrfs", "zfs", "mounts", "nixos", "persist"}
# What orders the layers and walks the registry (``layers``): the guard, verify, gaps, the export.
STAGES = {"stages", "layers", "disks", "nixeval", "nixfiles", "gaps", "disko", "verify"}
LIMIT = 500         # lines: a module a reader can hold


def modules() -> dict[str, Path]:
    """Dotted names below operations (a package by its name, its modules as package.module)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            found[name] = path
    return found


def tier(name: str) -> str:
    for names, label in ((SHARED, "shared"), (LAYERS, "layer"), (STAGES, "stage")):
        if name in names:
            return label
    return tier(name.rsplit(".", 1)[0]) if "." in name else "unknown"


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(operations modules imported at the top, imports found inside functions or classes)."""
    tree = ast.parse(path.read_text())
    top = set(tree.body)
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "operations":
            rest = node.module.split(".", 1)[1] if "." in node.module else ""
            names = [a.name for a in node.names] if not rest else [rest]
            if node in top:
                found.update(names)
            elif not isinstance(node, ast.ImportFrom) or not _under_type_checking(tree, node):
                nested.append(f"{path.stem}:{node.lineno} imports {', '.join(names)}")
    return found, nested


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
               and node in ast.walk(block) for block in tree.body)


def graph() -> dict[str, set[str]]:
    return {name: imports(path)[0] for name, path in modules().items()}


def test_every_module_has_a_place():
    assert [name for name in modules() if tier(name) == "unknown"] == []


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > LIMIT}
    assert long == {}


def test_imports_are_at_the_top_of_each_module():
    nested = [line for path in modules().values() for line in imports(path)[1]]
    assert nested == []


def test_shared_modules_import_no_layer_and_layers_no_stage():
    edges = graph()
    upward = [f"{m} -> {d}" for m, deps in edges.items() for d in deps
              if (tier(m), tier(d)) in (("shared", "layer"), ("shared", "stage"), ("layer", "stage"))]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join(path + (module,))
        if module in done or module not in edges:
            return
        for dependency in edges[module]:
            if dependency != module and not dependency.startswith(module + "."):    # a package's own modules
                visit(dependency, path + (module,))
        done.add(module)

    for module in edges:
        visit(module, ())
