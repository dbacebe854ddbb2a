"""
Several facts read in one round trip: each fact's command runs in one shell script, its output
goes to its own fact's ``process``, as pyinfra would have read it alone.

    values = host.get_fact(FactBatch, requests=[(Mounts, {}), (FileText, {"path": "/x"})])
"""

from __future__ import annotations

import re

from pyinfra import logger
from pyinfra.api import FactBase, StringCommand

# A fact and its arguments, as a layer asks for it: ``(PathsState, {"paths": [...]})``.
FactRequest = tuple[type[FactBase], dict]


def request_key(fact, kwargs: dict) -> tuple:
    return (fact, repr(sorted(kwargs.items())))


_PART = "##tabula-part##"
_MISSING = "##tabula-missing-command##"
# How a fact that probes block devices starts (udev may be re-reading a partition table).
SETTLE = "udevadm settle 2>/dev/null; "
# Shell words whose effect must not reach the next part of a batch: such a part runs in a subshell.
_LEAKING = re.compile(r"\b(exit|cd|set|shift|trap|exec|umask|return)\b")


def group(text: str) -> str:
    """A fact command as one shell group: ``{ ...; }`` (no extra process: each costs ~30 ms on a
    slow target) unless it may exit or change the shell, then a ``( ... )`` subshell."""
    return f"( {text}\n)" if _LEAKING.search(text) else f"{{ {text}\n}}"


def _own_command(fact, kwargs: dict) -> str:
    command = fact().command(**kwargs)
    return command.get_raw_value() if isinstance(command, StringCommand) else str(command)


def fact_command(fact, kwargs: dict, settled: bool = False) -> str:
    """A fact's command as shell text, guarded by ``requires_command`` as pyinfra guards it.
    ``settled``: udev has just settled (the batch did it once for all its parts)."""
    text = _own_command(fact, kwargs)
    if settled:
        text = text.removeprefix(SETTLE)
    required = fact().requires_command(**kwargs)
    if required:
        text = f"if command -v {required} >/dev/null 2>&1; then {group(text)}; else echo '{_MISSING}'; fi"
    return text


# A part of a batch whose command failed: it is read again alone, so pyinfra reports it as usual.
FAILED = object()


def processed(fact, kwargs: dict, status: int, lines: list[str], prefix: str = ""):
    """A part's value as pyinfra's own fact reading gives it: the default unless it printed something."""
    if status != 0:
        return FAILED
    if lines == [_MISSING]:
        logger.warning(f"{prefix}fact {fact.__name__} skipped: {fact().requires_command(**kwargs)} is not installed")
        return fact().default()
    if not lines:
        return fact().default()
    return fact().process(lines)


class FactBatch(FactBase):
    """
    Several facts in one round trip: their values in order (``FAILED`` for a part whose command
    failed). Each part's output goes to its own fact's ``process``.

    + requests: ``[(Fact, kwargs), ...]``

    .. code:: python

        host.get_fact(FactBatch, requests=[(Mounts, {}), (FileText, {"path": "/mnt/etc/nixos/flake.nix"})])
    """

    def command(self, requests) -> str:
        self.requests = list(requests)      # pyinfra processes the output with this same instance
        # Facts that first let udev settle (a partition table may be re-read): once for them all.
        settle = any(_own_command(fact, kwargs).startswith(SETTLE) for fact, kwargs in self.requests)
        return (SETTLE if settle else "") + "; ".join(
            f"echo '{_PART}'; {group(fact_command(fact, kwargs, settle))}; echo \"{_PART} $?\""
            for fact, kwargs in self.requests)

    def process(self, output):
        return [processed(fact, kwargs, status, lines)
                for (fact, kwargs), (status, lines) in zip(self.requests, split_sections(output))]

    @staticmethod
    def default():
        return []


def split_sections(output) -> list[tuple[int, list[str]]]:
    """A batch's output as ``[(exit status, output lines), ...]`` in order."""
    sections, lines = [], None
    for line in output:
        if line == _PART:
            lines = []
        elif _PART + " " in line and lines is not None:
            # (after output that did not end in a newline, the status marker ends its last line)
            before, _, status = line.partition(_PART + " ")
            if before:
                lines.append(before)
            sections.append((int(status), lines))
            lines = None
        elif lines is not None:
            lines.append(line)
    return sections
