"""Where an e2e session's time goes: seconds and counts per kind of step (guest commands of the
test bed, pyinfra runs, VM states put back or saved, Nix evaluations, the verification command),
printed at the end of the session (tests/e2e/conftest.py) so a change's cost can be seen.

    with timed("pyinfra run"):
        subprocess.run(...)
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

SPENT: dict[str, list[float]] = defaultdict(list)


@contextlib.contextmanager
def timed(kind: str):
    started = time.monotonic()
    try:
        yield
    finally:
        SPENT[kind].append(time.monotonic() - started)


def summary() -> list[str]:
    rows = sorted(SPENT.items(), key=lambda item: -sum(item[1]))
    return [f"{kind:<28} {len(times):5d} x  {sum(times):8.1f} s  (mean {sum(times) / len(times):.2f} s)"
            for kind, times in rows]
