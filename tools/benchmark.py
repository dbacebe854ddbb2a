#!/usr/bin/env python3
"""Benchmark Tabula against the guide's plain shell script, in the live VM (one run, one VM).

    TABULA_VM_INSTANCE=bench .venv/bin/python tools/benchmark.py [--swap-size 256M]

Prints, measured in the same run on the same blank NVMe disk of the VM:
  (a) Tabula's first run against tools/bench/guide.sh (the guide's steps 1-5 + swapfile, the same
      commands and LUKS settings): the disk stages (up to nixos-generate-config) and the whole
      first run up to nixos-install, each as a ratio to the script;
  (b) a converged re-run (nothing to do) against the first run, as a ratio;
  (c) the SSH round trips (commands executed) of each: the script is one SSH command; Tabula's
      are the commands pyinfra -vv echoes (facts and operations).
Targets: (a) <= 1.3, (b) <= 0.5.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.livevm import PROJECT_DIR, LiveVM  # noqa: E402

PYINFRA = Path(sys.executable).parent / "pyinfra"
GUIDE = Path(__file__).resolve().parent / "bench" / "guide.sh"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
DISK_STAGES_END = re.compile(r"--> Starting operation: nixos-generate-config")
EXECUTED = re.compile(r"\] >>> ")


def nvme_by_id(vm: LiveVM) -> str:
    return vm.stable_path("TABULA-NVME0")


def timed_pyinfra(vm: LiveVM, args: list[str], env: dict) -> dict:
    """Run pyinfra -vv, streaming: total seconds, seconds until the disk stages ended, commands."""
    argv = [str(PYINFRA), "-y", *vm.pyinfra_args(), "-vv", *args]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=PROJECT_DIR, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    disk_seconds, disk_commands, commands, tail = None, None, 0, []
    for line in proc.stdout:
        plain = ANSI.sub("", line)
        if EXECUTED.search(plain):
            commands += 1
        if disk_seconds is None and DISK_STAGES_END.search(plain):
            disk_seconds, disk_commands = time.monotonic() - started, commands
        tail = (tail + [plain])[-40:]
    proc.wait()
    total = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit("pyinfra failed:\n" + "".join(tail))
    return {"seconds": total, "commands": commands,
            "disk_seconds": disk_seconds if disk_seconds is not None else total,
            "disk_commands": disk_commands if disk_commands is not None else commands}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swap-size", default="256M")
    args = parser.parse_args()

    vm = LiveVM()
    vm.ensure_up()
    vm.install_standins()
    disk = nvme_by_id(vm)
    passphrase = "bench-" + secrets.token_hex(8)

    # The plain script, on blank disks: one SSH command.
    vm.reset_disks()
    started = time.monotonic()
    vm.run(["sh", "-c", GUIDE.read_text(), "guide", disk, args.swap_size], input=passphrase + "\n", timeout=1800)
    guide_seconds = time.monotonic() - started
    guide_commands = sum(1 for line in GUIDE.read_text().splitlines()
                         if line.strip() and not line.lstrip().startswith(("#", "set ", "DISK=", "SWAP_SIZE=", "IFS=",
                                                                               "OPTS=", "EFI=", "ROOT=", "--")))

    # Tabula: first run on blank disks, then the converged re-run.
    vm.reset_disks()
    variables = {"disk": disk, "swap_size": args.swap_size, "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000}
    deploy = ["--data", "tabula_profile=zephyrus-btrfs", "--data", f"tabula_vars={json.dumps(variables)}",
              "--data", "tabula_install=false", "deploy.py"]
    hashed = "$6$" + secrets.token_hex(8) + "$" + secrets.token_hex(32)
    env = {"TABULA_LUKS_PASSPHRASE": passphrase, "TABULA_ROOT_PASSWORD_HASH": hashed,
           "TABULA_USER_PASSWORD_HASH": hashed}
    first = timed_pyinfra(vm, deploy, env)
    again = timed_pyinfra(vm, deploy, env)
    vm.reset_disks()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"Tabula benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}: {cpu}, "
          f"{os.cpu_count()} cores; live VM (QEMU TCG), zephyrus-btrfs on a 16 GiB NVMe, swapfile {args.swap_size}")
    print(f"  guide.sh (steps 1-5 + swapfile)      {guide_seconds:7.1f} s   1 SSH round trip ({guide_commands} commands)")
    print(f"  tabula first run, disk stages         {first['disk_seconds']:7.1f} s   {first['disk_commands']} commands")
    print(f"  tabula first run, up to nixos-install {first['seconds']:7.1f} s   {first['commands']} commands")
    print(f"  tabula converged re-run               {again['seconds']:7.1f} s   {again['commands']} commands")
    print(f"  (a) first run / guide.sh:      disk stages {first['disk_seconds'] / guide_seconds:.2f}   "
          f"whole run {first['seconds'] / guide_seconds:.2f}   (target <= 1.3)")
    print(f"  (b) converged re-run / first:  {again['seconds'] / first['seconds']:.2f}   (target <= 0.5)")
    print(f"  (c) SSH round trips:           guide 1, first run {first['commands']}, re-run {again['commands']}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
