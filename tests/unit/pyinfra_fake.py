"""A stand-in for pyinfra's ``host`` in unit tests of the layer operations: facts answered from a
table, noop messages recorded, and the operation's generator run directly (``op._inner``)."""
from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_lines(name: str) -> list[str]:
    """A captured command output, split as pyinfra hands it to a fact's process()."""
    return [line for line in (FIXTURES / name).read_text().splitlines()]


class FakeState:
    is_executing = True


class FakeHost:
    name = "install-target"
    print_prefix = "[install-target] "
    state = FakeState()

    def __init__(self, facts: dict | None = None):
        # {(FactClass, frozenset(kwargs.items())): value} or {FactClass: value} for any kwargs
        self.facts = facts or {}
        self.noops: list[str] = []
        self.reads: list[str] = []              # the facts read from the "target", in order

    def get_fact(self, fact, **kwargs):
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


def new_run_state(monkeypatch) -> None:
    """A run that has read and made nothing yet (facts, records, planned wipes: all empty)."""
    from operations import roundtrips

    monkeypatch.setattr(roundtrips, "_states", {})
    monkeypatch.setattr(roundtrips, "_tabula_ops", set())
    monkeypatch.setattr(roundtrips, "_tabula_changes", {})


def use_fake_host(monkeypatch, module, facts) -> FakeHost:
    """Answer the module's (or a tuple of modules') facts, read through operations.roundtrips,
    from the table."""
    from operations import roundtrips

    fake = FakeHost(facts)
    for each in module if isinstance(module, tuple) else (module,):
        monkeypatch.setattr(each, "host", fake)
    monkeypatch.setattr(roundtrips, "host", fake)
    new_run_state(monkeypatch)
    # Batched reads answered one by one from the table (the batching itself: test_roundtrips).
    monkeypatch.setattr(roundtrips, "_read_together",
                        lambda missing: {key: fake.get_fact(fact, **kwargs) for key, fact, kwargs in missing})
    return fake


def run_op(monkeypatch, module, op, facts, **kwargs):
    """Run an operation's generator against fake facts: (commands as text, stdin list, host)."""
    fake = use_fake_host(monkeypatch, module, facts)
    commands = list(op._inner(**kwargs))
    texts = [str(c) for c in commands]
    stdins = [c.connector_arguments.get("_stdin") for c in commands]
    return texts, stdins, fake


def unjoined(commands: list[str]) -> list[str]:
    """The parts of commands that ``roundtrips.one_command`` joined into one ``sh -c`` script."""
    import shlex

    parts = []
    for text in commands:
        words = shlex.split(text) if text.startswith("sh -c ") else []
        if len(words) == 3 and " && " in words[2]:
            parts += words[2].split(" && ")
        else:
            parts.append(text)
    return parts


def told(caplog, run) -> list[str]:
    """The lines an operation told (``roundtrips.tell``: its own output) while ``run()`` ran it."""
    import logging

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        run()
    return [record.getMessage() for record in caplog.records
            if record.name == "pyinfra" and record.levelno == logging.INFO]
