r"""Fault injection and evidence helpers for the e2e suites (faults, bad input, secrets, benchmark).

    run = run_with_fault(livevm, args, Fault("kill", op=r"^LUKS open cryptroot"))   # stop at a stage boundary
    run = run_with_fault(livevm, args, Fault("cut", cmd=r"luksFormat", delay=0.5))  # cut SSH mid-command
    run = run_with_fault(livevm, args, Fault("kill", out=r"stand-in: copying"))      # on a line of output

A fault fires when pyinfra (run with -vv, output streamed) prints ``--> Starting operation: NAME``
for a matching operation, echoes ``>>> COMMAND`` for a matching command, or prints a matching
line of a command's streamed output (nixos-install's), after ``delay`` seconds. "kill" SIGKILLs the pyinfra process on the controller; "cut" kills, from a second SSH
connection, the guest's sshd processes that serve pyinfra's connection (whatever runs in the
guest at that moment loses its controller, like on a dropped link).

A kill at an operation's start races the operation's first command: pyinfra sends it within
milliseconds of the banner, and a fast one (luksFormat with test key derivation) can finish in the
guest before the kill lands; a kill or cut aimed into a command by a delay races the command's end.
``hold="PROGRAM [SUBCOMMAND]"`` makes every such point exact: the guest's PROGRAM is shadowed for
the run by a wrapper whose ``call``-th (SUBCOMMAND) call waits, ``held="before"`` it runs (released,
it exits without running) or ``held="after"`` it ran to its end (released, it exits with its real
status, which the run died before learning); the fault fires once that call is waiting:

    run = run_with_fault(livevm, args, Fault("kill", op=r"^LUKS format ", hold="cryptsetup luksFormat"))
    run = run_with_fault(livevm, args, Fault("cut", cmd=r"mkfs\.btrfs", hold="mkfs.btrfs", held="after"))
    run = run_with_fault(livevm, args, Fault("kill", cmd=r"subvolume create", hold="btrfs subvolume create", call=2))
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.helpers import operation_commands
from tests.e2e.timing import timed
from tools.livevm import PROJECT_DIR

PYINFRA = Path(sys.executable).parent / "pyinfra"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OP_START = re.compile(r"--> Starting (?:[\w ,]+ )?operation: (.*?)\s*$")
EXEC_LINE = re.compile(r"\] >>> (.*)$")
MiB = 1024**2

# Programs whose run creates something that must be created once: a second run of one of them on
# the same target would destroy what the first made (kind -> how the created thing is named).
CREATING = {
    "sgdisk": "partition",                 # per "-n N:" on the disk (the last argument)
    "cryptsetup luksFormat": "luksFormat",  # the device (last argument)
    "mkfs": "mkfs",                         # mkfs.* and mkswap: the device (last argument)
    "mkswap": "mkfs",
    "btrfs subvolume create": "subvolume",  # the path (last argument)
    "btrfs subvolume snapshot": "subvolume",
    "zpool create": "pool",
    "zfs create": "dataset",                # the dataset (last argument)
    "zfs snapshot": "snapshot",
}

def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


@dataclass
class Fault:
    kind: str                 # "kill": SIGKILL pyinfra; "cut": kill the guest's sshd session
    op: str | None = None     # regex on the operation name (fires at its "Starting operation")
    cmd: str | None = None    # regex on an executed command (fires when pyinfra echoes it)
    delay: float = 0.0        # seconds after the trigger
    out: str | None = None    # regex on any line pyinfra prints (a streamed command's output)
    hold: str | None = None   # "PROGRAM [SUBCOMMAND]": fire only once that call waits in the guest
    held: str = "before"      # the call waits "before" it runs (then never runs) or "after" it ran
    call: int = 1             # which matching call is held (the first, the second, ...)
    match: str | None = None  # a shell pattern on the held program's arguments (default: "SUBCOMMAND *")

    def describe(self) -> str:
        where = (f"operation /{self.op}/" if self.op else f"command /{self.cmd}/" if self.cmd
                 else f"output /{self.out}/")
        held = f", with call {self.call} of {self.hold!r} held {self.held} it ran" if self.hold else ""
        return f"{self.kind} {self.delay:g}s after {where}{held}"


@dataclass
class FaultRun:
    output: str
    returncode: int
    fired: bool
    fired_at: str = ""
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)


def pyinfra_argv(livevm, args: list[str]) -> list[str]:
    return [str(PYINFRA), "-y", *livevm.pyinfra_args(), *args]


def sshd_session_pids(livevm) -> set[int]:
    """Every sshd process in the guest except the listener (what a fault may kill)."""
    out = livevm.run("for p in $(pgrep -x sshd); do [ \"$(awk '{print $4}' /proc/$p/stat)\" != 1 ] && echo $p; done; true").stdout
    return {int(p) for p in out.split()}


def cut_ssh(livevm, spare: set[int]) -> str:
    """Kill the guest's sshd processes that are not in ``spare`` and do not serve this command."""
    script = (
        "anc=' '; p=$$; while [ \"$p\" -gt 1 ]; do anc=\"$anc$p \"; p=$(awk '{print $4}' /proc/$p/stat); done; "
        f"spare=' {' '.join(str(p) for p in sorted(spare))} '; "
        "for p in $(pgrep -x sshd); do "
        "  [ \"$(awk '{print $4}' /proc/$p/stat)\" = 1 ] && continue; "
        "  case \"$anc$spare\" in *\" $p \"*) continue;; esac; "
        "  echo killed $p $(tr '\\0' ' ' < /proc/$p/cmdline); kill -9 $p; "
        "done; true"
    )
    return livevm.run(script, timeout=60).stdout


HOLD_DIR = "/run/tabula-hold"
HOLD_WRAPPER_DIR = "/usr/local/sbin"        # ahead of /usr/sbin and /sbin in root's PATH over SSH


def hold_wrapper(hold: str, real: str, hold_dir: str = HOLD_DIR, after: bool = False, call: int = 1,
                 match: str | None = None) -> str:
    """The wrapper script that shadows PROGRAM. While ``hold_dir/armed`` exists, its ``call``-th
    matching call marks itself ``hold_dir/held`` and waits until that mark is removed: before
    running (``after`` false; it then exits 75 without running), or once ``real`` has run to its
    end (``after``: it then exits with the real exit status, which the run that called it may no
    longer be there to learn). Every other call runs ``real``. A call matches when its arguments
    (joined, with a space after) match ``match``, a shell pattern; by default when they start with
    SUBCOMMAND (any call, without one)."""
    _program, _, subcommand = hold.partition(" ")
    pattern = match or (f"{shlex.quote(subcommand + ' ')}*" if subcommand else "*")
    wait = (f"        : > {hold_dir}/held\n"
            f"        while [ -e {hold_dir}/held ]; do sleep 0.1; done\n")
    held = (f"        {real} \"$@\"; status=$?\n{wait}        exit $status\n" if after
            else f"{wait}        exit 75\n")
    return ("#!/bin/sh\n"
            f"# a test hold (tests/e2e/faults.py): call {call} of '{hold}' waits here "
            f"{'after it ran' if after else 'and exits unrun'}\n"
            f"case \"$* \" in {pattern})\n"
            f"    if [ -e {hold_dir}/armed ]; then\n"
            f"        echo x >> {hold_dir}/calls\n"
            f"        if [ \"$(wc -l < {hold_dir}/calls)\" -eq {call} ] && rm {hold_dir}/armed 2>/dev/null; then\n"
            f"{held}"
            "        fi\n"
            "    fi;;\n"
            "esac\n"
            f"exec {real} \"$@\"\n")


def arm_hold(livevm, fault: "Fault") -> None:
    """Shadow the guest's PROGRAM with ``hold_wrapper`` for one run."""
    program = fault.hold.partition(" ")[0]
    # (the wrapper's own folder left out; /usr/local/bin kept: the installer's tools are there)
    real = livevm.run(f"PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin command -v {program}").stdout.strip()
    livevm.run(f"mkdir -p {HOLD_DIR} && rm -f {HOLD_DIR}/held {HOLD_DIR}/calls && : > {HOLD_DIR}/armed && "
               f"install -m 0755 /dev/stdin {HOLD_WRAPPER_DIR}/{program}",
               input=hold_wrapper(fault.hold, real, after=fault.held == "after", call=fault.call,
                                  match=fault.match))


def release_hold(livevm, hold: str) -> None:
    """Remove the wrapper, then let a waiting call exit (it runs nothing)."""
    program = hold.partition(" ")[0]
    livevm.run(f"rm -f {HOLD_WRAPPER_DIR}/{program} {HOLD_DIR}/armed {HOLD_DIR}/held {HOLD_DIR}/calls", timeout=60)


def wait_until_held(livevm, proc, seconds: float = 600) -> bool:
    """True once the held call waits in the guest; False if pyinfra ended first."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        if livevm.run(f"[ -e {HOLD_DIR}/held ]", check=False, timeout=60).returncode == 0:
            return True
        time.sleep(0.3)
    return False


def run_with_fault(livevm, args: list[str], fault: Fault | None, env: dict | None = None,
                   timeout: float = 1800, grace: float = 60) -> FaultRun:
    """pyinfra over SSH with output streamed; the fault (if any) fires at its trigger."""
    with timed("pyinfra run" if fault is None else "pyinfra run with a fault"):
        return _run_with_fault(livevm, args, fault, env, timeout, grace)


def _run_with_fault(livevm, args: list[str], fault: Fault | None, env: dict | None, timeout: float,
                    grace: float) -> FaultRun:
    if fault and fault.hold:
        arm_hold(livevm, fault)
        try:
            return run_with_armed_fault(livevm, args, fault, env, timeout, grace)
        finally:
            release_hold(livevm, fault.hold)
    return run_with_armed_fault(livevm, args, fault, env, timeout, grace)


def run_with_armed_fault(livevm, args: list[str], fault: Fault | None, env: dict | None,
                         timeout: float, grace: float) -> FaultRun:
    spare = sshd_session_pids(livevm) if fault and fault.kind == "cut" else set()
    environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    environment = {k: v for k, v in environment.items() if v is not None}   # None: unset
    started = time.monotonic()
    proc = subprocess.Popen(pyinfra_argv(livevm, args), cwd=PROJECT_DIR, env=environment,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    lines: list[str] = []
    fired = threading.Event()
    fired_at: list[str] = []

    def fire(line: str) -> None:
        if fault.delay:
            time.sleep(fault.delay)
        if fault.hold and not wait_until_held(livevm, proc):
            return
        if proc.poll() is not None:
            return
        fired_at.append(line)
        if fault.kind == "kill":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            fired_at.append(cut_ssh(livevm, spare))

    def matches(line: str) -> bool:
        plain = strip_ansi(line)
        if fault.out:
            return bool(re.search(fault.out, plain)) and not EXEC_LINE.search(plain)
        if fault.op:
            found = OP_START.search(plain)
            return bool(found and re.search(fault.op, found.group(1)))
        found = EXEC_LINE.search(plain)
        return bool(found and re.search(fault.cmd, found.group(1)))

    deadline = started + timeout
    for line in proc.stdout:
        lines.append(line)
        if fault and not fired.is_set() and matches(line):
            fired.set()
            threading.Thread(target=fire, args=(line,), daemon=True).start()
        if time.monotonic() > deadline:
            break
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = "".join(lines)
    return FaultRun(output=output, returncode=proc.returncode, fired=bool(fired_at),
                    fired_at=" | ".join(fired_at), seconds=time.monotonic() - started,
                    commands=operation_commands(strip_ansi(output)))


def simple_commands(command: str) -> list[list[str]]:
    """The simple commands (word lists) of a shell command line, looking inside every
    ``sh -c SCRIPT`` however deeply nested (one_command joins a step's commands that way)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:                       # unbalanced quotes: not a command we made
        return []
    found, words = [], []
    for token in tokens + [";"]:
        if token and set(token) <= set(";&|(){}") or token in ("then", "do", "else", "fi", "done", "if", "while"):
            if words[:2] == ["sh", "-c"] and len(words) > 2:
                found += simple_commands(words[2])
            elif words:
                found.append(words)
            words = []
        else:
            words.append(token)
    return found


def created(commands: list[str]) -> list[str]:
    """Everything the commands created, one entry per creation: "luksFormat /dev/...", ..."""
    items = []
    for cmd in commands:
        for words in simple_commands(cmd):
            text = " ".join(words)
            for program, kind in CREATING.items():
                if not (text.startswith(program) or (program == "mkfs" and words[0].startswith("mkfs."))):
                    continue
                if kind == "partition":
                    items += [f"partition {words[-1]}#{n}" for n in re.findall(r"-n (\d+):", text)]
                elif kind == "pool":
                    items.append("pool " + next((w for w in words[2:] if not w.startswith("-") and "=" not in w), "?"))
                elif words[-1].startswith("/") or kind in ("dataset", "snapshot"):
                    items.append(f"{kind} {words[-1]}")   # (a program name inside a script is not a run of it)
                break
    return items


# How the target shows that a creation happened (for the command a fault may have cut short).
EXISTS = {
    "partition": lambda target: (lambda disk, number: f"sgdisk -i {number} {shlex.quote(disk)} 2>/dev/null "
                                                      "| grep -q 'Partition unique GUID'")(*target.rsplit("#", 1)),
    "luksFormat": lambda target: f"cryptsetup isLuks {shlex.quote(target)}",
    "mkfs": lambda target: f"[ -n \"$(blkid -p -o value -s TYPE {shlex.quote(target)} 2>/dev/null)\" ]",
    "subvolume": lambda target: f"btrfs subvolume show {shlex.quote(target)} >/dev/null 2>&1",
}
BUSY = "pgrep -x 'sgdisk|cryptsetup|mkfs.vfat|mkfs.fat|mkfs.btrfs|mkfs.f2fs|mkfs.ext4|mkswap|btrfs|zpool|zfs'"


def creations_of_faulted_run(livevm, commands: list[str]) -> list[str]:
    """What a faulted run really created. pyinfra runs one command after another, so every
    command before the last one it echoed completed; the last one may have been cut short (a
    step's commands go as one script), so each of its creations counts only if the target shows
    it, once the guest has no creating program left running."""
    if not commands:
        return []
    livevm.run(f"n=0; while {BUSY} >/dev/null && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done", check=False,
               timeout=120)
    found = created(commands[:-1])
    for item in created(commands[-1:]):
        kind, target = item.split(" ", 1)
        check = EXISTS.get(kind)
        if check is None or livevm.run(check(target), check=False, timeout=60).returncode == 0:
            found.append(item)
    return found


def duplicates(items: list[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """Items that occur more than once, leaving out those matching an ``allowed`` pattern."""
    items = [i for i in items if not any(re.search(a, i) for a in allowed)]
    return sorted({i for i in items if items.count(i) > 1})


def duplicated_creations(commands: list[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """Creations that happened more than once across the runs (must be empty)."""
    return duplicates(created(commands), allowed)


# --- disks --------------------------------------------------------------------------------------

CHECKSUMS = r"""
import glob, hashlib, os, sys
MiB = 1 << 20

def digest(device, offset, size):
    with open(device, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(size)).hexdigest()

for serial in sys.argv[1:]:
    disks = {os.path.realpath(p) for p in glob.glob(f"/dev/disk/by-id/*[-_]{serial}")}
    assert len(disks) == 1, (serial, disks)
    disk = disks.pop()
    name = os.path.basename(disk)
    size = int(open(f"/sys/block/{name}/size").read()) * 512
    regions = [("disk head", disk, 0, 4 * MiB), ("disk tail", disk, size - MiB, MiB)]
    for part in sorted(glob.glob(f"/sys/block/{name}/{name}*/start")):
        folder = os.path.dirname(part)
        start = int(open(part).read()) * 512
        length = int(open(f"{folder}/size").read()) * 512
        head = min(length, MiB)
        regions += [(f"{os.path.basename(folder)} head", disk, start, head),
                    (f"{os.path.basename(folder)} tail", disk, start + length - head, head)]
    print(serial, " ".join(f"{label.replace(' ', ':')}={digest(*where)}" for label, *where in regions))
"""


def disk_checksums(livevm, serials) -> dict[str, str]:
    """A digest of where the data that matters is, for each disk: its first 4 MiB (the GPT) and
    last MiB (the backup GPT), and each partition's first and last MiB (read from the disk at the
    partition's sysfs offsets), which hold every header Tabula writes: a LUKS2 header and its
    keyslots' start, the superblocks of vfat, btrfs, f2fs and swap, the ZFS labels L0-L3 with their
    uberblocks. md5: a change detector, five times faster than sha256 in the emulated guest."""
    with timed("disk checksums"):
        out = livevm.run(["python3", "-c", CHECKSUMS, *serials], timeout=120).stdout
    return {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines() if line.strip()}


SAMPLER = r"""
import os, sys, time
out, seen = sys.argv[1], set()
while not os.path.exists(out + "/stop"):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    seen.add(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
            except OSError:
                pass
    time.sleep(0.005)
with open(out + "/cmdlines", "w") as f:
    f.write("\n".join(sorted(seen)) + "\n")
"""


class CmdlineSampler:
    """Samples every /proc/*/cmdline in the guest from a background python3, every few ms, into a
    directory only root can read; ``stop()`` returns the distinct command lines seen."""

    OUT = "/run/tabula-sampler"

    def __init__(self, livevm):
        self.livevm = livevm

    def start(self) -> None:
        self.livevm.run(f"rm -rf {self.OUT} && mkdir -m 700 {self.OUT} && cat > {self.OUT}/sampler.py", input=SAMPLER)
        self.livevm.run(f"nohup python3 {self.OUT}/sampler.py {self.OUT} >/dev/null 2>&1 </dev/null & "
                        f"echo $! > {self.OUT}/pid")

    def stop(self) -> str:
        self.livevm.run(f"touch {self.OUT}/stop; while kill -0 $(cat {self.OUT}/pid) 2>/dev/null; do sleep 0.1; done",
                        timeout=120)
        text = self.livevm.run(f"cat {self.OUT}/cmdlines").stdout
        self.livevm.run(f"rm -rf {self.OUT}")
        return text


def changing_commands(output: str) -> list[str]:
    """Commands that operations executed (facts only read): none may run in a refused or converged run."""
    return operation_commands(output)


# --- dry plans ------------------------------------------------------------------------------------

PLAN_ROW = re.compile(r"^\s*(.+?)\s{2,}(-|\d+ \([^)]*\))\s{2,}(-|\d+ \([^)]*\))\s*$")


def plan_rows(output: str) -> dict[str, bool]:
    """The plan pyinfra prints under "--> Detected changes:" (without -y): {operation: changes?}."""
    text = strip_ansi(output)
    assert "--> Detected changes:" in text, text[-4000:]
    rows = {}
    for line in text.split("--> Detected changes:", 1)[1].splitlines()[1:]:
        if not line.strip():
            if rows:
                break
            continue
        match = PLAN_ROW.match(line)
        if match and match.group(1).strip() != "Operation":
            rows[match.group(1).strip()] = match.group(2) != "-"
    return rows


def dry_plan(livevm, args: list[str], serials, env: dict | None = None, timeout: float = 900) -> tuple[str, dict]:
    """``pyinfra --dry`` (without -y, so the plan is printed): it must succeed, execute no
    operation's command, and leave every disk byte-identical. (output, plan rows)"""
    from tests.e2e.helpers import executed_commands

    before = disk_checksums(livevm, serials)
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    with timed("pyinfra run"):
        result = subprocess.run([str(PYINFRA), *livevm.pyinfra_args(), *args, "--dry"], cwd=PROJECT_DIR,
                                env=environment, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=timeout)
    output = strip_ansi(result.stdout + result.stderr)
    assert result.returncode == 0, output[-6000:]
    assert "Beginning operation run" not in output
    assert executed_commands(output), "no fact commands echoed: run with -vv"
    assert operation_commands(output) == [], operation_commands(output)
    assert disk_checksums(livevm, serials) == before, "a dry run changed a disk"
    return output, plan_rows(output)
