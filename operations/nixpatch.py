"""
Patch nixos-generate-config's hardware-configuration.nix on its syntax tree (tree-sitter-nix).

What the tool detected about the hardware (kernel modules, microcode, host platform, DHCP)
is kept byte for byte; what it detected about storage (``fileSystems``, ``swapDevices``,
``boot.initrd.luks.devices``) is removed and the profile's storage bindings take the place of
the first of them, so the file reads like the guide's hardware-configuration.nix.

    from operations.nixpatch import patch_hardware_configuration
    patched = patch_hardware_configuration(generated_text, storage_bindings)
    assert patch_hardware_configuration(patched, storage_bindings) == patched

Patching is a fixed point: the second pass removes the bindings the first inserted and puts
the same text back at the same place.
"""

from __future__ import annotations

import tree_sitter
import tree_sitter_nix

from operations.errors import TabulaError

# Attribute paths owned by the profile: any binding whose path starts with one of these.
STORAGE_ATTRPATHS: tuple[tuple[str, ...], ...] = (
    ("fileSystems",),
    ("swapDevices",),
    ("boot", "initrd", "luks", "devices"),
)

# The first line of the inserted block; a comment is not a binding, so it is matched by text.
MARKER = "# Storage: from the tabula profile (edits here are replaced at the next deploy)"

_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_nix.language()))


class NixPatchError(TabulaError, ValueError):
    pass


def parse(text: str) -> tree_sitter.Tree:
    """Parse Nix text; raise NixPatchError naming the first syntax error's line."""
    tree = _PARSER.parse(text.encode())
    if tree.root_node.has_error:
        bad = _first_error(tree.root_node)
        line = bad.start_point[0] + 1 if bad else "?"
        raise NixPatchError(f"not valid Nix (syntax error near line {line})")
    return tree


def _first_error(node: tree_sitter.Node) -> tree_sitter.Node | None:
    if node.type == "ERROR" or node.is_missing:
        return node
    for child in node.children:
        found = _first_error(child)
        if found:
            return found
    return None


def _attr_name(node: tree_sitter.Node) -> str:
    """identifier -> its name; "string" -> its content (only plain strings name attributes here)."""
    text = node.text.decode()
    if node.type == "string_expression":
        return text[1:-1]
    return text


def attrpath(binding: tree_sitter.Node) -> tuple[str, ...]:
    path = binding.child_by_field_name("attrpath")
    return tuple(_attr_name(a) for a in path.children_by_field_name("attr")) if path else ()


def module_bindings(tree: tree_sitter.Tree) -> tree_sitter.Node:
    """The binding_set of the module's attribute set: the body of ``{ ... }: { ... }``."""
    node = tree.root_node
    expression = next((c for c in node.named_children if c.type != "comment"), None)
    if expression is not None and expression.type == "function_expression":
        expression = expression.child_by_field_name("body")
    if expression is None or expression.type not in ("attrset_expression", "rec_attrset_expression"):
        raise NixPatchError("expected a NixOS module: a function returning an attribute set")
    bindings = next((c for c in expression.named_children if c.type == "binding_set"), None)
    if bindings is None:
        raise NixPatchError("the module's attribute set is empty")
    return bindings


def _is_storage(path: tuple[str, ...]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in STORAGE_ATTRPATHS)


def _line_span(text: bytes, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) to whole lines plus the blank lines that follow."""
    line_start = text.rfind(b"\n", 0, start) + 1
    if text[line_start:start].strip():
        line_start = start  # something else shares the line: keep it
    line_end = text.find(b"\n", end)
    line_end = len(text) if line_end < 0 else line_end + 1
    while True:
        next_end = text.find(b"\n", line_end)
        if next_end < 0 or text[line_end:next_end].strip():
            break
        line_end = next_end + 1
    return line_start, line_end


def patch_hardware_configuration(generated: str, storage_bindings: str) -> str:
    """Replace the storage bindings of a generated hardware-configuration.nix.

    + generated: the text nixos-generate-config wrote (or an earlier result of this function)
    + storage_bindings: Nix bindings, two-space indented, as ``render_storage`` returns them
    """
    tree = parse(generated)
    source = generated.encode()
    bindings = module_bindings(tree)

    spans: list[tuple[int, int]] = []
    for child in bindings.named_children:
        if child.type == "binding" and _is_storage(attrpath(child)):
            spans.append(_line_span(source, child.start_byte, child.end_byte))
        elif child.type == "comment" and child.text.decode().strip() == MARKER:
            spans.append(_line_span(source, child.start_byte, child.end_byte))
    # tree-sitter may leave comments between bindings outside the binding_set
    for child in bindings.parent.named_children:
        if child.type == "comment" and child.text.decode().strip() == MARKER:
            spans.append(_line_span(source, child.start_byte, child.end_byte))
    spans = sorted(set(spans))

    block = f"  {MARKER}\n{storage_bindings.rstrip()}\n\n".encode()
    if spans:
        insert_at = spans[0][0]
    else:
        # No storage detected at all: before the closing brace of the module.
        insert_at = bindings.end_byte
        insert_at = source.find(b"\n", insert_at) + 1 or len(source)
        block = b"\n" + block

    out = bytearray()
    cursor = 0
    for start, end in spans:
        if start < cursor:  # overlapping spans (two bindings on one line)
            start = cursor
        out += source[cursor:start]
        if start == insert_at:
            out += block
        cursor = max(cursor, end)
    if not spans:
        out += source[:insert_at] + block
        cursor = insert_at
    out += source[cursor:]
    result = out.decode()
    parse(result)  # never hand back text that does not parse
    return result
