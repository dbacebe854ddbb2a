"""Shared helpers for e2e tests: reading pyinfra's output.

Run pyinfra with ``-vv`` to use ``assert_no_changes``: at that verbosity pyinfra 3.10 echoes every
command it runs, facts and operations alike, as ``[host] >>> COMMAND`` on stderr (-v adds the
noop messages, -vvv the commands' output too).
"""
from __future__ import annotations

import re

RESULTS_ROW = re.compile(r"^\s*Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", re.M)
ECHO = re.compile(r"^\s*\[[^\]]+\] >>> (.*)$")
FACT_LOADED = re.compile(r"^\s*\[[^\]]+\] Loaded fact ")
OP_START = re.compile(r"^--> Starting operation: ")


def grand_total(output: str) -> tuple[str, str, str, str]:
    """(operations, success, error, no change) of pyinfra's results row ('-': none). "Success"
    counts operations that ran commands, i.e. changed something."""
    match = RESULTS_ROW.search(output)
    assert match, f"no results table in pyinfra output:\n{output[-4000:]}"
    return match.groups()


def echoed_commands(output: str) -> list[tuple[str, bool]]:
    """Every command pyinfra echoed (needs -vv), with whether it was a fact's: pyinfra logs
    "Loaded fact ..." after a fact's command, before anything else runs."""
    lines = output.splitlines()
    found = []
    for index, line in enumerate(lines):
        match = ECHO.match(line)
        if not match:
            continue
        is_fact = False
        for after in lines[index + 1:]:
            if FACT_LOADED.match(after):
                is_fact = True
                break
            if ECHO.match(after) or OP_START.match(after):
                break
        found.append((match.group(1).strip(), is_fact))
    return found


def executed_commands(output: str) -> list[str]:
    """Every command pyinfra echoed (needs -vv): facts' and operations'."""
    return [command for command, _ in echoed_commands(output)]


def operation_commands(output: str) -> list[str]:
    """The commands operations executed (facts only read state; operations change it)."""
    return [command for command, is_fact in echoed_commands(output) if not is_fact]


def assert_no_changes(output: str) -> None:
    """The run changed nothing: the results table counts no success (= changed) and no error,
    and (with -vv) every command pyinfra executed was a fact's, none an operation's."""
    _ops, changed, errors, _no_change = grand_total(output)
    assert changed == "-" and errors == "-", f"pyinfra reports changes/errors ({changed}/{errors}):\n{output[-6000:]}"
    commands = echoed_commands(output)
    assert commands, "no commands echoed: run pyinfra with -vv so executed commands can be checked"
    changing = operation_commands(output)
    assert not changing, "operations executed commands:\n" + "\n".join(changing)
