"""
Patch nixos-generate-config's hardware-configuration.nix on its syntax tree (tree-sitter-nix).

What the tool detected about the hardware (kernel modules, microcode, host platform, DHCP)
is kept byte for byte; what it detected about storage (``fileSystems``, ``swapDevices``,
``boot.initrd.luks.devices``) is removed and the profile's storage bindings take the place of
the first of them, so the file reads like the guide's hardware-configuration.nix. Storage is
found in every form Nix allows for it: the real tool's (``fileSystems."/x" =`` with its
``{ device = …`` on the next line, the dotted ``boot.initrd.luks.devices."x".device = …;``
between them, a multi-line ``swapDevices``), split attribute paths, and bindings nested in
``boot = { initrd = { … }; }``; the rest of a line it shares is kept.

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


def is_valid(text: str) -> bool:
    """Whether the text parses as Nix (a file cut short by an interrupted write does not)."""
    return not _PARSER.parse(text.encode()).root_node.has_error


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


def _leads_to_storage(path: tuple[str, ...]) -> bool:
    """A strict prefix of a storage path (``boot``, ``boot.initrd``): its attrset may hold storage."""
    return any(len(path) < len(prefix) and prefix[: len(path)] == path for prefix in STORAGE_ATTRPATHS)


def _storage_bindings(binding_set: tree_sitter.Node, outer: tuple[str, ...] = ()) -> list[tuple[tree_sitter.Node, bool]]:
    """(binding, top level?) for every storage binding, dotted (``boot.initrd.luks.devices."x".device``)
    or nested in attrsets (``boot = { initrd.luks.devices = …; };``)."""
    found = []
    for child in binding_set.named_children:
        if child.type != "binding":
            continue
        path = outer + attrpath(child)
        if _is_storage(path):
            found.append((child, not outer))
        elif _leads_to_storage(path):
            value = child.child_by_field_name("expression")
            if value is not None and value.type in ("attrset_expression", "rec_attrset_expression"):
                inner = next((c for c in value.named_children if c.type == "binding_set"), None)
                if inner is not None:
                    found += [(b, False) for b, _ in _storage_bindings(inner, path)]
    return found


def _removal_span(text: bytes, start: int, end: int) -> tuple[int, int]:
    """What to cut for the binding at [start, end): its whole lines and the blank lines after them,
    but never anything else that shares its first or last line (a comment after it goes with it)."""
    line_start = text.rfind(b"\n", 0, start) + 1
    line_end = text.find(b"\n", end)
    line_end = len(text) if line_end < 0 else line_end
    after = text[end:line_end]
    shares_before = bool(text[line_start:start].strip())
    shares_after = bool(after.strip()) and not after.strip().startswith(b"#")
    if shares_after:
        # `binding; other = …;`: cut the binding and the spaces up to what follows
        return start, end + len(after) - len(after.lstrip())
    if shares_before:
        # `other = …; binding;`: cut from the end of what precedes, keep the line break
        return len(text[:start].rstrip(b" \t")), line_end
    cut_end = min(line_end + 1, len(text))
    while True:
        next_end = text.find(b"\n", cut_end)
        if next_end < 0 or text[cut_end:next_end].strip():
            break
        cut_end = next_end + 1
    return line_start, cut_end


def _merge_overlaps(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _merge(text: bytes, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping spans as one; one that leaves only indentation on its line takes the whole line
    (two bindings that shared a line)."""
    widened = []
    for start, end in _merge_overlaps(spans):
        line_start = text.rfind(b"\n", 0, start) + 1
        if start > line_start and not text[line_start:start].strip() and text[end:end + 1] in (b"", b"\n"):
            start, end = _removal_span(text, line_start, end)
        widened.append((start, end))
    return _merge_overlaps(widened)


def _cut(text: bytes, spans: list[tuple[int, int]], begin: int, stop: int) -> bytes:
    """text[begin:stop] without the spans (each span lies wholly on one side of begin and stop)."""
    out = bytearray()
    cursor = begin
    for start, end in spans:
        if start >= begin and end <= stop:
            out += text[cursor:start]
            cursor = end
    return bytes(out + text[cursor:stop])


def _drop_leading_blank_lines(text: bytes) -> bytes:
    while True:
        line_end = text.find(b"\n")
        if line_end < 0 or text[:line_end].strip():
            return text
        text = text[line_end + 1:]


def patch_hardware_configuration(generated: str, storage_bindings: str) -> str:
    """Replace the storage bindings of a generated hardware-configuration.nix.

    + generated: the text nixos-generate-config wrote (or an earlier result of this function)
    + storage_bindings: Nix bindings, two-space indented, as ``render_storage`` returns them

    Every binding under ``fileSystems``, ``swapDevices`` and ``boot.initrd.luks.devices`` goes,
    wherever it is (the real tool puts the dotted LUKS binding between the ``fileSystems``
    entries); the profile's block takes the line of the first top-level one, or comes last.
    """
    tree = parse(generated)
    source = generated.encode()
    bindings = module_bindings(tree)

    found = _storage_bindings(bindings)
    # the marker a previous patch left: tree-sitter may put comments between bindings inside or
    # outside the binding_set
    markers = [c for c in (*bindings.named_children, *bindings.parent.named_children)
               if c.type == "comment" and c.text.decode().strip() == MARKER]
    top_level = [node for node, top in found if top] + markers
    spans = _merge(source, [_removal_span(source, n.start_byte, n.end_byte)
                            for n in [node for node, _ in found] + markers])

    block = f"  {MARKER}\n{storage_bindings.rstrip()}\n\n".encode()
    if top_level:
        first = min(_removal_span(source, n.start_byte, n.end_byte)[0] for n in top_level)
        # at a line start: the first one's own line, or the line after the one it shares
        insert_at = first if source[first - 1:first] in (b"", b"\n") else source.find(b"\n", first) + 1
        if insert_at == 0 < first:
            raise NixPatchError("the storage bindings share the module's last line: nowhere to put the profile's")
    else:
        # no storage at the top level: before the closing brace of the module
        insert_at = source.find(b"\n", bindings.end_byte) + 1 or len(source)
        block = b"\n" + block
    for start, end in spans:
        if start < insert_at < end:
            insert_at = start
    before = _cut(source, [s for s in spans if s[1] <= insert_at], 0, insert_at)
    after = _cut(source, [s for s in spans if s[0] >= insert_at], insert_at, len(source))
    # the blank lines after the block are the block's own: what the cut left there goes
    result = (before + block + _drop_leading_blank_lines(after)).decode()
    parse(result)  # never hand back text that does not parse
    return result
