"""
Fewer SSH round trips, the main cost of a run (each command is one round trip to the target).

Three rules, used by every layer module:

- ``read(Fact, **args)``: a fact is read from the target once and kept until the next command
  that may change the target. pyinfra 3 itself keeps nothing: every operation read its facts
  again, so a converged run read ``/proc/mounts`` once per mount. What is kept is thrown away
  as soon as any Tabula operation yields a command (before that command runs), so no operation
  ever sees a value from before a change.
- ``read_many([(Fact, args), ...])``: facts that are all needed now are read in one round trip
  (each part's output goes to its own fact's ``process``) and kept like single reads.
- ``one_command(...)``: the commands of one step go to the target as one ``sh -c`` script that
  stops at the first failure, instead of one round trip each.
- ``before_first_change(key, prepare)``: commands that must run before this run's first change,
  if it makes one (a read-only view of a pool is made writable first), yielded ahead of it.
- ``record_created(...)`` / ``created_this_run(...)`` and ``record_fresh(...)`` / ``is_fresh(...)``:
  what this run's own commands have just made (a partition, a container, a filesystem, an empty
  mounted filesystem) holds nothing the run must keep, so the next step does not read it first.
  It relies instead on the checks inside its own command (luksFormat and mkfs look for a
  signature again, cryptsetup open for a mapping of that name, mount for a mounted point), which
  stop the run if the target disagrees. A re-run reads everything, as it knows nothing of the
  run before it.

    from operations.roundtrips import operation, read, read_many, one_command
"""

from __future__ import annotations

import functools
import re

from pyinfra import host, logger
from pyinfra.api import FactBase, QuoteString, StringCommand
from pyinfra.api import operation as pyinfra_operation

from operations.errors import TabulaError

# host name -> {(fact class, arguments): value}
_kept: dict[str, dict] = {}


def _key(fact, kwargs: dict) -> tuple:
    return (fact, repr(sorted(kwargs.items())))


def read(fact, **kwargs):
    """``host.get_fact(fact, **kwargs)``, read once until the next command that may change the target."""
    kept = _kept.setdefault(host.name, {})
    key = _key(fact, kwargs)
    if key not in kept:
        kept[key] = host.get_fact(fact, **kwargs)
    return kept[key]


def read_many(requests: list[tuple[type, dict]]) -> list:
    """The facts' values, in order; those not kept already are read together in one round trip."""
    kept = _kept.setdefault(host.name, {})
    missing = []
    for fact, kwargs in requests:
        key = _key(fact, kwargs)
        if key not in kept and key not in [k for k, _, _ in missing]:
            missing.append((key, fact, kwargs))
    if len(missing) == 1:
        _, fact, kwargs = missing[0]
        kept[missing[0][0]] = host.get_fact(fact, **kwargs)
    elif missing:
        kept.update(_read_together(missing))
    return [kept[_key(fact, kwargs)] for fact, kwargs in requests]


def _read_together(missing: list[tuple]) -> dict:
    sections = host.get_fact(FactBatch, commands=[_fact_command(fact, kwargs) for _, fact, kwargs in missing])
    if len(sections) != len(missing):
        raise TabulaError(f"reading {len(missing)} facts in one command gave {len(sections)} answers: "
                          "the connection to the target may have dropped; run again")
    values = {}
    for (key, fact, kwargs), (status, lines) in zip(missing, sections):
        if status != 0:
            # A failing fact command: read it alone, so pyinfra reports it as it always does.
            values[key] = host.get_fact(fact, **kwargs)
        else:
            values[key] = _processed(fact, kwargs, lines)
    return values


_PART = "##tabula-part##"
_MISSING = "##tabula-missing-command##"


# Shell words whose effect must not reach the next part of a batch: such a part runs in a subshell.
_LEAKING = re.compile(r"\b(exit|cd|set|shift|trap|exec|umask|return)\b")


def group(text: str) -> str:
    """A fact command as one shell group: ``{ ...; }`` (no extra process: each costs ~30 ms on a
    slow target) unless it may exit or change the shell, then a ``( ... )`` subshell."""
    return f"( {text}\n)" if _LEAKING.search(text) else f"{{ {text}\n}}"


def _fact_command(fact, kwargs: dict) -> str:
    instance = fact()
    command = instance.command(**kwargs)
    text = command.get_raw_value() if isinstance(command, StringCommand) else str(command)
    required = instance.requires_command(**kwargs)
    if required:
        text = f"if command -v {required} >/dev/null 2>&1; then {group(text)}; else echo '{_MISSING}'; fi"
    return text


def _processed(fact, kwargs: dict, lines: list[str]):
    # As pyinfra's own fact reading: the default unless the command printed something.
    if lines == [_MISSING]:
        logger.warning(f"{host.print_prefix}fact {fact.__name__} skipped: {fact().requires_command(**kwargs)} "
                       "is not installed")
        return fact().default()
    if not lines:
        return fact().default()
    return fact().process(lines)


class FactBatch(FactBase):
    """Several fact commands in one round trip: ``[(exit status, output lines), ...]`` in order."""

    def command(self, commands) -> str:
        return "; ".join(f"echo '{_PART}'; {group(text)}; echo \"{_PART} $?\"" for text in commands)

    def process(self, output):
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

    @staticmethod
    def default():
        return []


# --- what this run made ------------------------------------------------------------------------

# (host name, executing?) -> things this run's commands created ("partition <path>", "luks
# <path>", "filesystem <device>", "subvolume <device> <path>"...), and -> {path: fresh?} for
# directories under the install root: fresh when this run mounted an empty filesystem there and
# nothing was written to it since. Recorded when the creating command is yielded: if it fails,
# the run stops there. Kept apart by phase, so what a --dry plan assumed never reaches execution.
_created: dict[tuple[str, bool], set[str]] = {}
_fresh: dict[tuple[str, bool], dict[str, bool]] = {}


def _run_key() -> tuple[str, bool]:
    return (host.name, bool(host.state.is_executing))


def record_created(*things: str) -> None:
    """Note that this run's command (being yielded now) creates these things, new and empty."""
    _created.setdefault(_run_key(), set()).update(things)


def created_this_run(thing: str) -> bool:
    """Whether a command of this same run created the thing (then it holds nothing to keep)."""
    return thing in _created.get(_run_key(), ())


def record_fresh(path: str, fresh: bool) -> None:
    """Note that ``path`` is now an empty filesystem this run mounted (True), or that this run
    wrote below it or found it in place (False). Deeper records win over shallower ones."""
    _fresh.setdefault(_run_key(), {})[path.rstrip("/") or "/"] = fresh


def is_fresh(path: str) -> bool:
    """Whether nothing can be at ``path`` yet: its nearest recorded parent (or itself) is fresh."""
    recorded = _fresh.get(_run_key(), {})
    path = path.rstrip("/") or "/"
    while True:
        if path in recorded:
            return recorded[path]
        if path == "/":
            return False
        path = path.rsplit("/", 1)[0] or "/"


# (host name, executing?) -> {key: function returning commands}: what must run before the first
# command any Tabula operation yields from then on, once (a pool imported read-only to compare it,
# operations.zfs, becomes writable before anything is written). Kept apart by phase like _created.
_before_change: dict[tuple[str, bool], dict] = {}


def before_first_change(key: str, prepare) -> None:
    """Have ``prepare()``'s commands run ahead of the next command any Tabula operation yields,
    once. ``key`` names the preparation: registering it again replaces it."""
    _before_change.setdefault(_run_key(), {})[key] = prepare


def cancel_before_first_change(key: str) -> None:
    """Drop a preparation that is no longer needed (what it would undo was undone otherwise)."""
    _before_change.get(_run_key(), {}).pop(key, None)


def _take_before_change() -> list:
    if not _before_change:
        return []
    pending = _before_change.pop(_run_key(), {})
    return [command for prepare in pending.values() for command in prepare()]


def forget() -> None:
    """Throw away every fact kept for the current host (a command may change anything)."""
    _kept.pop(host.name, None)


def operation(**operation_kwargs):
    """pyinfra's ``@operation()``, forgetting the kept facts whenever the operation yields a command."""

    def decorate(func):
        @functools.wraps(func)
        def commands(*args, **kwargs):
            for command in func(*args, **kwargs):
                for prepared in _take_before_change():
                    forget()
                    yield prepared
                forget()
                yield command

        return pyinfra_operation(**operation_kwargs)(commands)

    return decorate


def one_command(*commands: StringCommand) -> StringCommand:
    """The commands as one ``sh -c`` script run in order, stopping at the first failure.

    Connector arguments (``_stdin``...) of the parts are kept; at most one part may read stdin.
    """
    parts = [c for c in commands if c is not None]
    if len(parts) == 1:
        return parts[0]
    arguments: dict = {}
    for part in parts:
        for key, value in part.connector_arguments.items():
            if key in arguments and arguments[key] != value:
                raise ValueError(f"one_command: two parts set {key} differently")
            arguments[key] = value
    script = " && ".join(part.get_raw_value() for part in parts)
    return StringCommand("sh", "-c", QuoteString(script), **arguments)
