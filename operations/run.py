"""
One run on one host, built by ``operations.stages`` and handed to every layer and operation:
the settings, the secrets (read once, from the controller), the layers, the facts read from
the target, and what this run has made. Nothing about a run lives anywhere else: several hosts
in one pyinfra run each have a ``Run`` of their own.

Fewer SSH round trips, the main cost of a run (each command is one round trip to the target):

- ``run.read(Fact, **args)``: a fact is read from the target once and kept until the next command
  that may change the target. pyinfra 3 itself keeps nothing: every operation read its facts
  again, so a converged run read ``/proc/mounts`` once per mount. What is kept is thrown away as
  soon as any Tabula operation yields a command (before that command runs), so no operation ever
  sees a value from before a change.
- ``run.read_many([(Fact, args), ...])``: facts that are all needed now are read in one round trip
  (each part's output goes to its own fact's ``process``) and kept like single reads. The stages
  read every layer's ``observe`` this way before the first step: a converged re-run reads the
  target once and has nothing else to read.
- ``one_command(...)``: the commands of one step go to the target as one shell script that stops
  at the first failure, instead of one round trip each.
- ``run.before_first_change(key, prepare)``: commands that must run before this run's first
  change, if it makes one (a read-only view of a pool is made writable first), yielded ahead of it.
- ``run.tell(text)``: what an operation is about to do, one line of its own output. Operation
  names stay short (pyinfra's results table fits in 120 columns); the details are told here,
  while the run is prepared (so the plan of ``--dry`` shows them) and again when it runs.
- ``run.record_created(...)`` / ``run.created_this_run(...)`` and ``run.record_fresh(...)`` /
  ``run.is_fresh(...)``: what this run's own commands have just made (a partition, a container, a
  filesystem, an empty mounted filesystem) holds nothing the run must keep, so the next step does
  not read it first. It relies instead on the checks inside its own command (luksFormat and mkfs
  look for a signature again, cryptsetup open for a mapping of that name, mount for a mounted
  point), which stop the run if the target disagrees. A re-run reads everything, as it knows
  nothing of the run before it.

pyinfra runs an operation's body twice, while planning and again at execution, so a run keeps
one ``Phase`` for each: the kept facts, what the phase made (typed ``Made`` records), the
preparations before the first change and the disks planned to be wiped. Execution starts from
the facts planning read last (no command ran in between); what a --dry plan assumed is never lent
to the execution. The kept facts are also thrown away after any other operation, a stock pyinfra
one included: at execution when it ends (a state callback), while planning when it plans a change.

    from operations.run import Run, operation, one_command

    @operation()
    def step(run: Run, path: str):
        if run.read(PathExists, path=path):
            run.noop(f"{path} exists")
            return
        run.tell(f"make {path}")
        yield StringCommand("mkdir", "-p", QuoteString(path))
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from pyinfra import logger
from pyinfra.api import StringCommand
from pyinfra.api import operation as pyinfra_operation
from pyinfra.api.state import BaseStateCallback

from operations.errors import TabulaError
from operations.factbatch import FAILED, FactBatch, FactRequest, request_key

__all__ = ["FAILED", "FactBatch", "FactRequest", "request_key", "Made", "MadeKind", "Phase", "Run", "operation",
           "one_command", "script"]


# --- what this run made ---------------------------------------------------------------------------


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
class Phase:
    """What a run keeps in one phase (planning, or execution).

    + facts: the facts read, until the next command that may change the target
    + made: what this phase's commands make (``Made``), so a later step need not read it first
    + fresh: {path: fresh?} under the install root: fresh when this run mounted an empty
      filesystem there and nothing was written to it since
    + before_change: {key: function returning commands} to run ahead of the next change, once
    + planned_wipes: the stable paths of the disks this run wipes first (confirmed by the guard)
    + stock_changes_seen: planning: changes other (stock pyinfra) operations had planned when the
      facts were last checked
    + at_start: the facts as they were read before the run's first command (None until then): what
      the target held before this run changed anything
    """

    facts: dict = field(default_factory=dict)
    made: set[Made] = field(default_factory=set)
    fresh: dict[str, bool] = field(default_factory=dict)
    before_change: dict[str, Callable] = field(default_factory=dict)
    planned_wipes: set[str] = field(default_factory=set)
    stock_changes_seen: int = 0
    at_start: dict | None = None

    def lose_facts(self) -> None:
        """A command may have changed the target: the kept facts are thrown away (the first time,
        kept as what the target held before this run changed anything)."""
        if self.at_start is None:
            self.at_start = dict(self.facts)
        self.facts.clear()


class Run:
    """
    One deploy (or rescue, or gap report) on one host.

    + host: the pyinfra host (or a stand-in with ``get_fact``, ``noop``, ``name``, ``state``)
    + settings: ``operations.settings.Settings`` (the profile, and what the run is asked to do)
    + layers: the layer registry (``operations.layers.LAYERS``), for steps that walk every layer
    + secrets: ``operations.secrets.Secrets``, read once from the controller by the stages
    """

    def __init__(self, host, settings=None, layers: tuple = (), secrets=None):
        self.host = host
        self.settings = settings
        self.layers = tuple(layers)
        self.secrets = secrets if secrets is not None else {}     # (the stages read them: read_secrets)
        self._phases: dict[bool, Phase] = {}
        self._tabula_ops: set[str] = set()          # this host's operations that are Tabula's
        self._tabula_changes: set[str] = set()      # ...and those that planned a change
        self._watching = False

    def __repr__(self) -> str:          # pyinfra may print operation arguments: never the secrets
        return f"<run on {getattr(self.host, 'name', '?')}>"

    @property
    def profile(self):
        return self.settings.profile

    @property
    def executing(self) -> bool:
        """True while pyinfra executes the operations, False while it plans them (and in --dry)."""
        return bool(self.host.state.is_executing)

    @property
    def prefix(self) -> str:
        return getattr(self.host, "print_prefix", "")

    def phase(self) -> Phase:
        """The state of the current phase (execution starts from what planning read last)."""
        executing = self.executing
        if executing not in self._phases:
            phase = self._phases[executing] = Phase()
            planned = self._phases.get(False)
            if executing and planned is not None:
                phase.facts = dict(planned.facts)
                phase.planned_wipes = set(planned.planned_wipes)
                # (no command has run before execution: what planning found first is still the start)
                phase.at_start = dict(planned.at_start if planned.at_start is not None else planned.facts)
            self._watch_operations()
        return self._phases[executing]

    # --- facts ---------------------------------------------------------------------------------

    def current_facts(self) -> dict:
        """The kept facts, thrown away first if a stock pyinfra operation planned a change since."""
        phase = self.phase()
        changes = self._stock_changes()
        if changes != phase.stock_changes_seen:
            phase.lose_facts()
            phase.stock_changes_seen = changes
        return phase.facts

    def read(self, fact, **kwargs):
        """``host.get_fact(fact, **kwargs)``, read once until the next command that may change the target."""
        kept = self.current_facts()
        key = request_key(fact, kwargs)
        if key not in kept:
            kept[key] = self.host.get_fact(fact, **kwargs)
        return kept[key]

    def read_many(self, requests: list[FactRequest]) -> list:
        """The facts' values, in order; those not kept already are read together in one round trip."""
        kept = self.current_facts()
        missing: dict[tuple, FactRequest] = {}
        for fact, kwargs in requests:
            key = request_key(fact, kwargs)
            if key not in kept:
                missing.setdefault(key, (fact, kwargs))
        if len(missing) == 1:
            [(key, (fact, kwargs))] = missing.items()
            kept[key] = self.host.get_fact(fact, **kwargs)
        elif missing:
            kept.update(self._read_together(missing))
        return [kept[request_key(fact, kwargs)] for fact, kwargs in requests]

    def _read_together(self, missing: dict[tuple, FactRequest]) -> dict:
        wanted = list(missing.values())
        values = self.host.get_fact(FactBatch, requests=wanted)
        if len(values) != len(wanted):
            raise TabulaError(f"reading {len(wanted)} facts in one command gave {len(values)} answers: "
                              "the connection to the target may have dropped; run again")
        found = {}
        for key, (fact, kwargs), value in zip(missing, wanted, values):
            # A failing fact command: read it alone, so pyinfra reports it as it always does.
            found[key] = self.host.get_fact(fact, **kwargs) if value is FAILED else value
        return found

    def remember(self, requests: list[FactRequest], values: list) -> None:
        """Keep what a command of this run read as its last act (``FactBatch`` values; a part that
        failed is read again when asked): the target as the command left it."""
        kept = self.phase().facts
        kept.update({request_key(fact, kwargs): value for (fact, kwargs), value in zip(requests, values)
                     if value is not FAILED})

    def forget(self) -> None:
        """Throw away every fact kept (a command may change anything)."""
        self.phase().lose_facts()

    def read_at_start(self, fact, **kwargs):
        """The fact as it was read before this run's first command, or None when it was not read
        then. For a step about what this run has just made: nothing could be there before, so
        what stood in its place then is all there is to check (the step's command checks again)."""
        phase = self.phase()
        kept = phase.facts if phase.at_start is None else phase.at_start
        return kept.get(request_key(fact, kwargs))

    # --- what this run made --------------------------------------------------------------------

    def record_created(self, *things: Made) -> None:
        """Note that this run's command (being yielded now) creates these things, new and empty."""
        self.phase().made.update(things)

    def created_this_run(self, thing: Made) -> bool:
        """Whether a command of this same run created the thing (then it holds nothing to keep)."""
        return thing in self.phase().made

    def record_fresh(self, path: str, fresh: bool) -> None:
        """Note that ``path`` is now an empty filesystem this run mounted (True), or that this run
        wrote below it or found it in place (False). Deeper records win over shallower ones."""
        self.phase().fresh[path.rstrip("/") or "/"] = fresh

    def is_fresh(self, path: str) -> bool:
        """Whether nothing can be at ``path`` yet: its nearest recorded parent (or itself) is fresh."""
        recorded = self.phase().fresh
        path = path.rstrip("/") or "/"
        while True:
            if path in recorded:
                return recorded[path]
            if path == "/":
                return False
            path = path.rsplit("/", 1)[0] or "/"

    def plan_wipe(self, disk_path: str) -> None:
        """Note that this run wipes the disk first (the guard confirmed it)."""
        self.phase().planned_wipes.add(disk_path)

    def before_wipe(self) -> bool:
        """True while planning a run that wipes a disk first: facts still show the old content, so
        the later stages plan as if on blank disks (at execution they see the wiped disk)."""
        return not self.executing and bool(self.phase().planned_wipes)

    def before_first_change(self, key: str, prepare: Callable[[], list]) -> None:
        """Have ``prepare()``'s commands run ahead of the next command any Tabula operation yields,
        once. ``key`` names the preparation: registering it again replaces it."""
        self.phase().before_change[key] = prepare

    def cancel_before_first_change(self, key: str) -> None:
        """Drop a preparation that is no longer needed (what it would undo was undone otherwise)."""
        self.phase().before_change.pop(key, None)

    def take_before_change(self) -> list:
        phase = self.phase()
        pending, phase.before_change = phase.before_change, {}
        return [command for prepare in pending.values() for command in prepare()]

    # --- output ----------------------------------------------------------------------------------

    def tell(self, text: str) -> None:
        """One line of the current operation's own output, saying what it is about to do (its name
        stays short). Called right before the operation's first command: pyinfra runs the operation
        while preparing (the plan shows the line) and again at execution (the line comes again, as
        a noop's does)."""
        logger.info(f"{self.prefix}{text}")

    def noop(self, text: str) -> None:
        """The operation has nothing to do: ``text`` says what is already true."""
        self.host.noop(text)

    # --- other operations -------------------------------------------------------------------------

    def _stock_changes(self) -> int:
        """While planning: how many operations of this host planned a change that are not Tabula's."""
        state = self.host.state
        if state.is_executing or not hasattr(state, "get_meta_for_host"):
            return 0
        return state.get_meta_for_host(self.host).ops_change - len(self._tabula_changes)

    def _watch_operations(self) -> None:
        state = self.host.state
        if not self._watching and hasattr(state, "add_callback_handler"):
            state.add_callback_handler(_ForgetAfterStockOperations(self))
            self._watching = True

    def entered(self, op_hash: str | None) -> None:
        """A Tabula operation of this run starts (it forgets the facts itself, before each command)."""
        if op_hash:
            self._tabula_ops.add(op_hash)

    def changing(self, op_hash: str | None) -> None:
        """A Tabula operation of this run yields its first command while planning."""
        if op_hash and not self.executing:
            self._tabula_changes.add(op_hash)


class _ForgetAfterStockOperations(BaseStateCallback):
    """At execution, any operation that is not Tabula's may have changed anything: the facts kept
    for its host are thrown away when it ends (Tabula's operations do it before each command)."""

    def __init__(self, run: Run):
        self.run = run

    def operation_host_success(self, state, host, op_hash, retry_count: int = 0):
        self._forget_after(host, op_hash)

    def operation_host_error(self, state, host, op_hash, retry_count: int = 0, max_retries: int = 0):
        self._forget_after(host, op_hash)

    def _forget_after(self, op_host, op_hash) -> None:
        run = self.run
        if op_host is run.host and op_hash not in run._tabula_ops and True in run._phases:
            run._phases[True].lose_facts()


def operation(**operation_kwargs):
    """pyinfra's ``@operation()`` for an operation whose first argument is the ``Run``: the facts
    the run keeps are forgotten whenever the operation yields a command (and the preparations
    before the run's first change are yielded ahead of it)."""

    def decorate(func):
        @functools.wraps(func)
        def commands(run: Run, *args, **kwargs):
            op_hash = getattr(run.host, "current_op_hash", None)
            run.entered(op_hash)
            first = True
            for command in func(run, *args, **kwargs):
                if first:
                    run.changing(op_hash)
                first = False
                for prepared in run.take_before_change():
                    run.forget()
                    yield prepared
                run.forget()
                yield command

        return pyinfra_operation(**operation_kwargs)(commands)

    return decorate


def one_command(*commands: StringCommand) -> StringCommand:
    """The commands as one shell script run in order, stopping at the first failure.

    Connector arguments (``_stdin``...) of the parts are kept; at most one part may read stdin.
    """
    parts = [c for c in commands if c is not None]
    if len(parts) == 1:
        return parts[0]
    arguments: dict[str, Any] = {}
    for part in parts:
        for key, value in part.connector_arguments.items():
            if key in arguments and arguments[key] != value:
                raise ValueError(f"one_command: two parts set {key} differently")
            arguments[key] = value
    # The script itself: pyinfra runs every command in a shell of its own (sh -c), no second one;
    # a part that is a list of commands is a group, so the next part runs only when it succeeded.
    return StringCommand(" && ".join(_one(part.get_raw_value()) for part in parts), **arguments)


def _one(text: str) -> str:
    return f"{{ {text}\n}}" if re.search(r"[;&|\n]", text) else text


def script(text: str, **arguments) -> StringCommand:
    """Shell text run as it is, in the shell pyinfra runs each command in (no ``sh -c`` of its
    own: a process fewer, ~50 ms on a slow target). For a script without positional arguments."""
    return StringCommand(text, **arguments)
