"""The package's import graph reads top-down: stages -> layers -> shared modules, no cycles, and
every import at the top of its module (an import inside a function is how a cycle hides). A
layer may be a package (btrfs, zfs): its modules are the layer's."""
import ast
from pathlib import Path

import operations

PACKAGE = Path(operations.__file__).parent
# Modules every layer may use; they import no layer (gpt.types: the GPT type table the profile
# model checks codes against, data only).
SHARED = {"errors", "profile", "run", "factbatch", "target", "nixlit", "diskolit", "adoptlit", "secrets", "nixpatch",
          "settings", "contract", "gpt.types"}
# One module or package per layer: facts, operations, Nix fragment, problems.
LAYERS = {"gpt", "luks", "filesystems", "btrfs", "zfs", "mounts", "nixos", "persist"}
# What orders the layers and walks the registry (``layers``): the guard, verify, gaps, the export.
STAGES = {"stages", "layers", "disks", "nixeval", "nixfiles", "gaps", "disko", "verify", "adopt"}
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


MODULE_PATHS = modules()


def tier(name: str) -> str:
    for names, label in ((SHARED, "shared"), (LAYERS, "layer"), (STAGES, "stage")):
        if name in names:
            return label
    return tier(name.rsplit(".", 1)[0]) if "." in name else "unknown"


def imported_names(node: ast.AST, module: str) -> list[str]:
    """The operations modules an import statement of ``module`` (dotted, below operations) names:
    ``from operations.x import y`` -> x; ``from operations import x, y`` -> x, y; ``import
    operations.x.y`` -> x.y; relative imports resolved against ``module``'s package."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".", 1)[1] for alias in node.names
                if alias.name.startswith("operations.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".")
        is_package = MODULE_PATHS[module].name == "__init__.py"
        base = package if is_package else package[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*base, *([node.module] if node.module else [])])
        return [target] if node.module else [".".join([*base, a.name]).lstrip(".") for a in node.names]
    if not node.module or node.module.split(".")[0] != "operations":
        return []
    rest = node.module.split(".", 1)[1] if "." in node.module else ""
    return [a.name for a in node.names] if not rest else [rest]


def imports(path: Path, module: str = "") -> tuple[set[str], list[str]]:
    """(operations modules imported at the top, imports found inside functions or classes)."""
    tree = ast.parse(path.read_text())
    top = set(tree.body)
    found, nested = set(), []
    for node in ast.walk(tree):
        names = imported_names(node, module)
        if not names:
            continue
        if node in top:
            found.update(names)
        elif not _under_type_checking(tree, node):
            nested.append(f"{path.stem}:{node.lineno} imports {', '.join(names)}")
    return found, nested


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
               and node in ast.walk(block) for block in tree.body)


def graph() -> dict[str, set[str]]:
    return {name: imports(path, name)[0] for name, path in modules().items()}


def test_every_module_has_a_place():
    assert [name for name in modules() if tier(name) == "unknown"] == []


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > LIMIT}
    assert long == {}


def test_imports_are_at_the_top_of_each_module():
    nested = [line for name, path in modules().items() for line in imports(path, name)[1]]
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


def test_every_form_of_import_is_seen(tmp_path):
    """``import operations.x``, ``from operations import x``, ``from operations.x import y`` and
    relative imports all count (a graph that missed one form would let a cycle or an upward
    import through)."""
    source = ("import operations.stages\nfrom operations import luks, mounts\nfrom operations.btrfs.facts import X\n"
              "def late():\n    import operations.disks\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    found, nested = imports(path, "gpt")
    assert found == {"stages", "luks", "mounts", "btrfs.facts"}
    assert nested == ["probe:5 imports disks"]
    MODULE_PATHS["zfs.probe"] = tmp_path / "probe.py"
    try:
        path.write_text("from .facts import ZfsPoolState\nfrom . import pool\nfrom ..run import Run\n")
        assert imports(path, "zfs.probe")[0] == {"zfs.facts", "zfs.pool", "run"}
    finally:
        del MODULE_PATHS["zfs.probe"]
