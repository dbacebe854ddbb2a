"""A stand-in for pyinfra's ``host`` in unit tests of the layer operations: facts answered from a
table, noop messages recorded, and the operation's generator run directly (``op._inner``) on a
``Run`` of its own (nothing is shared between runs: each test makes a new one)."""
from __future__ import annotations

from pathlib import Path

from operations.layers import LAYERS
from operations.run import FactBatch, Run

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_lines(name: str) -> list[str]:
    """A captured command output, split as pyinfra hands it to a fact's process()."""
    return [line for line in (FIXTURES / name).read_text().splitlines()]


class FakeState:
    is_executing = True


class FakeHost:
    name = "install-target"
    print_prefix = "[install-target] "

    def __init__(self, facts: dict | None = None, executing: bool = True):
        # {(FactClass, frozenset(kwargs.items())): value} or {FactClass: value} for any kwargs
        self.facts = facts or {}
        self.state = FakeState() if executing else PlanningState()
        self.noops: list[str] = []
        self.reads: list[str] = []              # the facts read from the "target", in order
        self.batches: list[list[str]] = []      # the facts of each batched read (one round trip each)
        self.round_trips = 0                    # each read alone, and each batch, is one

    def get_fact(self, fact, **kwargs):
        self.round_trips += 1
        if fact is FactBatch:
            # One round trip: each part answered from the table as it would be alone.
            self.batches.append([part.__name__ for part, _ in kwargs["requests"]])
            return [self._answer(part, arguments) for part, arguments in kwargs["requests"]]
        return self._answer(fact, kwargs)

    def _answer(self, fact, kwargs: dict):
        self.reads.append(fact.__name__)
        try:
            key = (fact, frozenset(kwargs.items()))
        except TypeError:                       # list arguments (paths=[...]): answered per class
            key = None
        if key in self.facts:
            return self.facts[key]
        if fact in self.facts:
            return self.facts[fact]
        default = getattr(fact, "default", None)
        return default() if callable(default) else None

    def noop(self, message: str) -> None:
        self.noops.append(message)


class PlanningState:
    is_executing = False


def fake_run(facts: dict | None = None, settings=None, secrets: dict | None = None, executing: bool = True,
             layers: tuple = LAYERS) -> Run:
    """A run on a fake host answering ``facts``: it has read and made nothing yet."""
    return Run(FakeHost(facts, executing), settings, layers=layers, secrets=dict(secrets or {}))


def run_op(monkeypatch, module, op, facts, *, run: Run | None = None, **kwargs):
    """Run an operation's generator against fake facts: (commands as text, stdin list, host).
    ``monkeypatch`` and ``module`` are kept for the tests' call shape: nothing is patched."""
    run = run or fake_run(facts)
    if run.host.facts is not facts and facts:
        run.host.facts.update(facts)
    commands = list(op._inner(run, **kwargs))
    texts = [str(c) for c in commands]
    stdins = [getattr(c, "connector_arguments", {}).get("_stdin") for c in commands]   # (a str has none)
    return texts, stdins, run.host


def unjoined(commands: list[str]) -> list[str]:
    """The parts of commands that ``run.one_command`` joined into one script (``a && b``: split
    where ``&&`` stands outside any quotes)."""
    parts = []
    for text in commands:
        quote, start, i = None, 0, 0
        while i < len(text):
            char = text[i]
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif text.startswith(" && ", i):
                parts.append(text[start:i])
                start = i = i + 4
                continue
            i += 1
        parts.append(text[start:])
    return parts


def told(caplog, run) -> list[str]:
    """The lines an operation told (``Run.tell``: its own output) while ``run()`` ran it."""
    import logging

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        run()
    return [record.getMessage() for record in caplog.records
            if record.name == "pyinfra" and record.levelno == logging.INFO]
