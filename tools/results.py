"""Reading pyinfra's results table, for the demo and the e2e tests alike."""
from __future__ import annotations

import re

RESULTS_ROW = re.compile(r"^\s*Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", re.M)


def grand_total(output: str) -> tuple[str, str, str, str]:
    """(operations, success, error, no change) of pyinfra's results row ('-': none). "Success"
    counts operations that ran commands, i.e. changed something."""
    match = RESULTS_ROW.search(output)
    assert match, f"no results table in pyinfra output:\n{output[-4000:]}"
    return match.groups()
