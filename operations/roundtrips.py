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
- ``tell(text)``: what an operation is about to do, one line of its own output. Operation names
  stay short (pyinfra's results table fits in 120 columns); the details are told here, while the
  run is prepared (so the plan of ``--dry`` shows them) and again when the operation runs.
- ``record_created(...)`` / ``created_this_run(...)`` and ``record_fresh(...)`` / ``is_fresh(...)``:
  what this run's own commands have just made (a partition, a container, a filesystem, an empty
  mounted filesystem) holds nothing the run must keep, so the next step does not read it first.
  It relies instead on the checks inside its own command (luksFormat and mkfs look for a
  signature again, cryptsetup open for a mapping of that name, mount for a mounted point), which
  stop the run if the target disagrees. A re-run reads everything, as it knows nothing of the
  run before it.

All of it lives in one ``RunState`` per host and phase (planning, execution): the kept facts,
what this run made (typed ``Made`` records), the preparations before the first change and the
disks planned to be wiped. The kept facts are also thrown away after any other operation, a stock
pyinfra one included: at execution when it ends (a state callback), while planning when it plans
a change.

    from operations.roundtrips import operation, read, read_many, one_command
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from pyinfra import host, logger
from pyinfra.api import FactBase, QuoteString, StringCommand
from pyinfra.api import operation as pyinfra_operation
from pyinfra.api.state import BaseStateCallback

from operations.errors import TabulaError

def _key(fact, kwargs: dict) -> tuple:
    return (fact, repr(sorted(kwargs.items())))


def read(fact, **kwargs):
    """``host.get_fact(fact, **kwargs)``, read once until the next command that may change the target."""
    kept = run_state().current_facts()
    key = _key(fact, kwargs)
    if key not in kept:
        kept[key] = host.get_fact(fact, **kwargs)
    return kept[key]


def read_many(requests: list[tuple[type, dict]]) -> list:
    """The facts' values, in order; those not kept already are read together in one round trip."""
    kept = run_state().current_facts()
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


# --- the run state ------------------------------------------------------------------------------


class MadeKind(Enum):
    DEVICE = "device"                   # a block device: a partition, an opened LUKS mapping
    LUKS = "luks"                       # a LUKS header, on the device it formatted
    FILESYSTEM = "filesystem"           # mkfs on a device
    SUBVOLUME = "subvolume"             # a btrfs subvolume: "<device> <path>"
    POOL = "pool"                       # a ZFS pool created (or found imported, writable)
    IMPORTED_POOL = "imported pool"     # a ZFS pool this run imported
    WRITABLE_POOL = "writable pool"     # a read-only view of a pool made writable
    DATASET = "dataset"                 # a ZFS dataset created
    GENERATED = "generated"             # nixos-generate-config ran for this folder


@dataclass(frozen=True)
class Made:
    """Something this run's own command made, new and empty: ``Made.filesystem("/dev/mapper/x")``."""

    kind: MadeKind
    what: str

    @classmethod
    def device(cls, path: str) -> "Made":
        return cls(MadeKind.DEVICE, path)

    @classmethod
    def luks(cls, path: str) -> "Made":
        return cls(MadeKind.LUKS, path)

    @classmethod
    def filesystem(cls, device: str) -> "Made":
        return cls(MadeKind.FILESYSTEM, device)

    @classmethod
    def subvolume(cls, device: str, path: str) -> "Made":
        return cls(MadeKind.SUBVOLUME, f"{device} {path.lstrip('/')}")

    @classmethod
    def pool(cls, name: str) -> "Made":
        return cls(MadeKind.POOL, name)

    @classmethod
    def imported_pool(cls, name: str) -> "Made":
        return cls(MadeKind.IMPORTED_POOL, name)

    @classmethod
    def writable_pool(cls, name: str) -> "Made":
        return cls(MadeKind.WRITABLE_POOL, name)

    @classmethod
    def dataset(cls, name: str) -> "Made":
        return cls(MadeKind.DATASET, name)

    @classmethod
    def generated(cls, folder: str) -> "Made":
        return cls(MadeKind.GENERATED, folder)


@dataclass
class RunState:
    """Everything a run keeps about one host in one phase (planning, or execution).

    + facts: the facts read, until the next command that may change the target. The execution
      phase starts from what planning read last (no command has run in between).
    + made: what this phase's commands make (``Made``), so a later step need not read it first.
      Kept apart by phase, so what a --dry plan assumed never reaches execution.
    + fresh: {path: fresh?} under the install root: fresh when this run mounted an empty
      filesystem there and nothing was written to it since.
    + before_change: {key: function returning commands} to run ahead of the next change, once.
    + planned_wipes: the stable paths of the disks this run wipes first (confirmed by the guard).
    """

    facts: dict = field(default_factory=dict)
    made: set[Made] = field(default_factory=set)
    fresh: dict[str, bool] = field(default_factory=dict)
    before_change: dict[str, Callable] = field(default_factory=dict)
    planned_wipes: set[str] = field(default_factory=set)
    stock_changes_seen: int = 0         # planning: changes of other (stock pyinfra) operations

    def current_facts(self) -> dict:
        """The kept facts, thrown away first if a stock pyinfra operation planned a change since."""
        changes = _stock_changes()
        if changes != self.stock_changes_seen:
            self.facts.clear()
            self.stock_changes_seen = changes
        return self.facts


# (host name, executing?) -> RunState
_states: dict[tuple[str, bool], RunState] = {}
# Hashes of the operations that are Tabula's (they forget facts themselves, before each command),
# and, per host, those that planned a change.
_tabula_ops: set[str] = set()
_tabula_changes: dict[str, set[str]] = {}


def run_state() -> RunState:
    """The current host's state in the current phase."""
    executing = bool(host.state.is_executing)
    key = (host.name, executing)
    if key not in _states:
        state = _states[key] = RunState()
        if executing:
            planned = _states.get((host.name, False))
            if planned is not None:
                state.facts = dict(planned.facts)
                state.planned_wipes = set(planned.planned_wipes)
        _watch_operations(host.state)
    return _states[key]


def _stock_changes() -> int:
    """While planning: how many operations of this host planned a change that are not Tabula's."""
    state = host.state
    if state.is_executing or not hasattr(state, "get_meta_for_host"):
        return 0
    return state.get_meta_for_host(host).ops_change - len(_tabula_changes.get(host.name, ()))


class _ForgetAfterStockOperations(BaseStateCallback):
    """At execution, any operation that is not Tabula's may have changed anything: the facts kept
    for its host are thrown away when it ends (Tabula's operations do it before each command)."""

    @staticmethod
    def operation_host_success(state, host, op_hash, retry_count: int = 0):
        _forget_after(host, op_hash)

    @staticmethod
    def operation_host_error(state, host, op_hash, retry_count: int = 0, max_retries: int = 0):
        _forget_after(host, op_hash)


def _forget_after(op_host, op_hash) -> None:
    if op_hash not in _tabula_ops:
        state = _states.get((op_host.name, True))
        if state is not None:
            state.facts.clear()


_watched: list = []


def _watch_operations(state) -> None:
    if hasattr(state, "add_callback_handler") and not any(s is state for s in _watched):
        state.add_callback_handler(_ForgetAfterStockOperations())
        _watched.append(state)


def reset() -> None:
    """Forget every host's run state (tests; a new deploy in the same process)."""
    _states.clear()
    _tabula_ops.clear()
    _tabula_changes.clear()


def plan_wipe(disk_path: str) -> None:
    """Note that this run wipes the disk first (the guard confirmed it)."""
    run_state().planned_wipes.add(disk_path)


def before_wipe() -> bool:
    """
    True while planning a run that wipes a disk first: facts still show the old content, so the
    later stages plan as if on blank disks (at execution they see the wiped disk).
    """
    return not host.state.is_executing and bool(run_state().planned_wipes)


# --- what this run made ------------------------------------------------------------------------


def record_created(*things: Made) -> None:
    """Note that this run's command (being yielded now) creates these things, new and empty."""
    run_state().made.update(things)


def created_this_run(thing: Made) -> bool:
    """Whether a command of this same run created the thing (then it holds nothing to keep)."""
    return thing in run_state().made


def record_fresh(path: str, fresh: bool) -> None:
    """Note that ``path`` is now an empty filesystem this run mounted (True), or that this run
    wrote below it or found it in place (False). Deeper records win over shallower ones."""
    run_state().fresh[path.rstrip("/") or "/"] = fresh


def is_fresh(path: str) -> bool:
    """Whether nothing can be at ``path`` yet: its nearest recorded parent (or itself) is fresh."""
    recorded = run_state().fresh
    path = path.rstrip("/") or "/"
    while True:
        if path in recorded:
            return recorded[path]
        if path == "/":
            return False
        path = path.rsplit("/", 1)[0] or "/"


def before_first_change(key: str, prepare) -> None:
    """Have ``prepare()``'s commands run ahead of the next command any Tabula operation yields,
    once. ``key`` names the preparation: registering it again replaces it."""
    run_state().before_change[key] = prepare


def cancel_before_first_change(key: str) -> None:
    """Drop a preparation that is no longer needed (what it would undo was undone otherwise)."""
    run_state().before_change.pop(key, None)


def _take_before_change() -> list:
    state = run_state()
    pending, state.before_change = state.before_change, {}
    return [command for prepare in pending.values() for command in prepare()]


def forget() -> None:
    """Throw away every fact kept for the current host (a command may change anything)."""
    run_state().facts.clear()


def operation(**operation_kwargs):
    """pyinfra's ``@operation()``, forgetting the kept facts whenever the operation yields a command."""

    def decorate(func):
        @functools.wraps(func)
        def commands(*args, **kwargs):
            op_hash = getattr(host, "current_op_hash", None)
            if op_hash:
                _tabula_ops.add(op_hash)
            first = True
            for command in func(*args, **kwargs):
                if first and op_hash and not host.state.is_executing:
                    _tabula_changes.setdefault(host.name, set()).add(op_hash)
                first = False
                for prepared in _take_before_change():
                    forget()
                    yield prepared
                forget()
                yield command

        return pyinfra_operation(**operation_kwargs)(commands)

    return decorate


def tell(text: str) -> None:
    """One line of the current operation's own output, saying what it is about to do (its name
    stays short). Called right before the operation's first command: pyinfra runs the operation
    while preparing (the plan shows the line) and again at execution (the line comes again, as a
    noop's does)."""
    logger.info(f"{host.print_prefix}{text}")


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
