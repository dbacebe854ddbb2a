#!/usr/bin/env python3
"""Benchmark Tabula against the guide's plain shell script, in the live VM (one run, one VM).

    TABULA_VM_INSTANCE=bench .venv/bin/python tools/benchmark.py [--swap-size 256M] [--rounds 5]

Prints, measured in the same run on the same blank NVMe disk of the VM, each ratio the median of
the rounds (one round: the script, Tabula's first run, its re-run):
  (a) Tabula's first run against tools/bench/guide.sh (the guide's sequence as one plain script:
      the same commands and LUKS settings, the same NixOS files, the same /persist seeding): the
      disk stages (up to nixos-generate-config) and the whole first run up to nixos-install, each
      as a ratio to the same part of the script; and the whole run without the host identity on
      both sides (SSH host keys and machine-id: the RSA 4096 key's random prime search takes 2 to
      30 s under TCG whoever runs it, so it drowns the difference between the two);
  (b) a converged re-run (nothing to do) against the first run, as a ratio;
  (c) the SSH round trips (commands executed) of each: the script is one SSH command; Tabula's
      are the commands pyinfra -vv echoes (facts and operations).
Targets: (a) <= 1.3, (b) <= 0.5.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from operations.nixfiles import render_files  # noqa: E402
from operations.profile import load_profile  # noqa: E402
from tools.livevm import PROJECT_DIR, LiveVM  # noqa: E402

PYINFRA = Path(sys.executable).parent / "pyinfra"
GUIDE = Path(__file__).resolve().parent / "bench" / "guide.sh"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
DISK_STAGES_END = re.compile(r"--> Starting operation: nixos-generate-config")
IDENTITY_START = re.compile(r"--> Starting operation: Persist host identity")
NEXT_STEP = re.compile(r"--> (Starting operation|Results)")
EXECUTED = re.compile(r"\] >>> ")


def nvme_by_id(vm: LiveVM) -> str:
    return vm.stable_path("TABULA-NVME0")


def timed_pyinfra(vm: LiveVM, args: list[str], env: dict) -> dict:
    """Run pyinfra -vv, streaming: total seconds, seconds until the disk stages ended, seconds of the
    host identity operation, commands."""
    argv = [str(PYINFRA), "-y", *vm.pyinfra_args(), "-vv", *args]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=PROJECT_DIR, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    disk_seconds, disk_commands, commands, tail = None, None, 0, []
    identity_started, identity_seconds = None, None
    for line in proc.stdout:
        plain = ANSI.sub("", line)
        if EXECUTED.search(plain):
            commands += 1
        if disk_seconds is None and DISK_STAGES_END.search(plain):
            disk_seconds, disk_commands = time.monotonic() - started, commands
        if identity_started is not None and NEXT_STEP.search(plain):
            identity_seconds, identity_started = time.monotonic() - identity_started, None
        if IDENTITY_START.search(plain):
            identity_started = time.monotonic()
        tail = (tail + [plain])[-40:]
    proc.wait()
    total = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit("pyinfra failed:\n" + "".join(tail))
    if identity_seconds is None:     # renamed operation: the ratio without it would be skewed
        raise SystemExit("benchmark: no 'Persist host identity' operation in pyinfra's output:\n" + "".join(tail))
    return {"seconds": total, "commands": commands, "identity_seconds": identity_seconds,
            "disk_seconds": disk_seconds if disk_seconds is not None else total,
            "disk_commands": disk_commands if disk_commands is not None else commands}


def nixos_files_tar(variables: dict) -> str:
    """The profile's NixOS files as the guide's user would paste them (base64 tar)."""
    rendered = render_files(load_profile("zephyrus-btrfs", variables), None, None, placeholder=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in sorted(rendered.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buffer.getvalue()).decode()


def timed_guide(vm: LiveVM, disk: str, swap_size: str, stdin: str) -> dict:
    """The plain script over one SSH command: total seconds, seconds until its disk stages ended,
    seconds of its host identity part."""
    argv = vm.ssh_argv("--", " ".join(["sh", "-c", shlex.quote(GUIDE.read_text()), "guide", disk, swap_size]))
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    proc.stdin.write(stdin)
    proc.stdin.close()
    disk_seconds, identity_started, identity_seconds, tail = None, None, None, []
    for line in proc.stdout:
        if disk_seconds is None and line.strip() == "disk stages done":
            disk_seconds = time.monotonic() - started
        elif line.strip() == "host identity start":
            identity_started = time.monotonic()
        elif line.strip() == "host identity done" and identity_started is not None:
            identity_seconds = time.monotonic() - identity_started
        tail = (tail + [line])[-40:]
    proc.wait()
    if proc.returncode != 0 or disk_seconds is None or identity_seconds is None:
        raise SystemExit("guide.sh failed:\n" + "".join(tail))
    return {"seconds": time.monotonic() - started, "disk_seconds": disk_seconds,
            "identity_seconds": identity_seconds}


def script_commands(text: str) -> int:
    """Commands in the script (not comments, assignments, reads, set or the progress echo)."""
    skip = ("#", "set ", "IFS=", "echo ", "--")
    return sum(1 for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith(skip) and not re.match(r"^[A-Z_]+=", line.strip()))


def one_round(vm: LiveVM, disk: str, swap_size: str) -> dict:
    """The script, Tabula's first run and its re-run, each on the same blank disk."""
    passphrase = "bench-" + secrets.token_hex(8)
    hashed = "$6$" + secrets.token_hex(8) + "$" + secrets.token_hex(32)
    variables = {"disk": disk, "swap_size": swap_size, "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000}

    # The plain script, on blank disks: one SSH command.
    vm.reset_disks()
    guide = timed_guide(vm, disk, swap_size, "\n".join([passphrase, hashed, hashed, nixos_files_tar(variables)]) + "\n")

    # Tabula: first run on blank disks, then the converged re-run.
    vm.reset_disks()
    deploy = ["--data", "tabula_profile=zephyrus-btrfs", "--data", f"tabula_vars={json.dumps(variables)}",
              "--data", "tabula_install=false", "deploy.py"]
    env = {"TABULA_LUKS_PASSPHRASE": passphrase, "TABULA_ROOT_PASSWORD_HASH": hashed,
           "TABULA_USER_PASSWORD_HASH": hashed}
    first = timed_pyinfra(vm, deploy, env)
    again = timed_pyinfra(vm, deploy, env)
    vm.reset_disks()
    return {"guide": guide, "first": first, "again": again,
            "a_disk": first["disk_seconds"] / guide["disk_seconds"], "a_whole": first["seconds"] / guide["seconds"],
            "a_keyless": ((first["seconds"] - first["identity_seconds"])
                          / (guide["seconds"] - guide["identity_seconds"])),
            "b": again["seconds"] / first["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swap-size", default="256M")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds to take the median of (RSA key generation alone varies by tens of seconds)")
    args = parser.parse_args()

    vm = LiveVM()
    vm.ensure_up()
    vm.install_standins()
    disk = nvme_by_id(vm)
    rounds = []
    for number in range(1, args.rounds + 1):
        result = one_round(vm, disk, args.swap_size)
        rounds.append(result)
        print(f"round {number}: guide {result['guide']['seconds']:.1f} s, first run {result['first']['seconds']:.1f} s, "
              f"re-run {result['again']['seconds']:.1f} s; host identity {result['guide']['identity_seconds']:.1f} / "
              f"{result['first']['identity_seconds']:.1f} s; (a) {result['a_disk']:.2f} / {result['a_whole']:.2f} / "
              f"{result['a_keyless']:.2f}, "
              f"(b) {result['b']:.2f}", flush=True)
    # The round with the median whole-run ratio is shown in full; each ratio is its own median.
    shown = sorted(rounds, key=lambda r: r["a_whole"])[len(rounds) // 2]
    guide, first, again = shown["guide"], shown["first"], shown["again"]
    median = {key: statistics.median(r[key] for r in rounds) for key in ("a_disk", "a_whole", "a_keyless", "b")}
    guide_commands = script_commands(GUIDE.read_text())

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"Tabula benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}: {cpu}, "
          f"{os.cpu_count()} cores; live VM (QEMU TCG), zephyrus-btrfs on a 16 GiB NVMe, swapfile {args.swap_size}; "
          f"median of {len(rounds)} rounds")
    print(f"  guide.sh, disk stages (steps 1-5 + swapfile) {guide['disk_seconds']:7.1f} s   1 SSH round trip")
    print(f"  guide.sh, up to nixos-install                {guide['seconds']:7.1f} s   1 SSH round trip "
          f"({guide_commands} commands)")
    print(f"  tabula first run, disk stages                {first['disk_seconds']:7.1f} s   {first['disk_commands']} commands")
    print(f"  tabula first run, up to nixos-install        {first['seconds']:7.1f} s   {first['commands']} commands")
    print(f"  host identity (SSH host keys incl. RSA 4096, machine-id): guide.sh {guide['identity_seconds']:.1f} s, "
          f"tabula {first['identity_seconds']:.1f} s")
    print(f"  tabula converged re-run                      {again['seconds']:7.1f} s   {again['commands']} commands")
    print(f"  (a) first run / guide.sh:      disk stages {median['a_disk']:.2f}   "
          f"up to nixos-install {median['a_whole']:.2f}   (target <= 1.3)")
    print(f"      the same without the host identity on both sides: {median['a_keyless']:.2f}")
    print(f"  (b) converged re-run / first:  {median['b']:.2f}   (target <= 0.5)")
    print(f"  (c) SSH round trips:           guide 1, first run {first['commands']}, re-run {again['commands']}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
