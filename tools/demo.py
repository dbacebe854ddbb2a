"""
The main job, end to end: boot the live VM (building its image on first use), install the default
profile onto its blank disks with `pyinfra install-target deploy.py`, run the deploy a second time
to show it converged, then verify the target against the profile with the verification command
(`pytest tests/verify --hosts=ssh://install-target`, the README's "Day two: is the machine what the
profile says?").

    ./dev.sh demo                     # default profile (group_data/all.py)
    ./dev.sh demo --keep-disks        # do not reset the VM's disks first (resume a previous demo)

The VM's disks are scratch files of the test bed; the demo resets them before installing.
Demo secrets are generated once into ~/.cache/tabula/demo (0700 dir, 0600 files).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # stdlib up to 3.12: SHA-512 crypt hashes for the demo users

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from operations import verify  # noqa: E402
from tools import nixkit  # noqa: E402
from tools.results import grand_total  # noqa: E402
from tools.livevm import LiveVM  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tabula" / "demo"


def step(text: str) -> None:
    print(f"\n=== {time.strftime('%H:%M:%S')} {text}", flush=True)


def demo_secrets() -> dict[str, str]:
    """Secret files for the demo run, made once: the controller env names files, never values."""
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o700)
    files = {
        "LUKS_PASSPHRASE": lambda: secrets.token_urlsafe(24),
        "ROOT_PASSWORD_HASH": lambda: crypt.crypt(secrets.token_urlsafe(16), crypt.mksalt(crypt.METHOD_SHA512)),
        "USER_PASSWORD_HASH": lambda: crypt.crypt(secrets.token_urlsafe(16), crypt.mksalt(crypt.METHOD_SHA512)),
    }
    env = {}
    for name, make in files.items():
        path = CACHE / name.lower()
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(make())
        env[f"TABULA_{name}_FILE"] = str(path)
    return env


def default_profile_name() -> str:
    namespace: dict = {}
    exec((REPO / "group_data" / "all.py").read_text(), namespace)
    return namespace["tabula_profile"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-disks", action="store_true", help="do not reset the VM's disks first")
    args = parser.parse_args()
    missing = nixkit.missing_kit()      # the VM's nixos-generate-config comes from the kit
    if missing:
        print(f"./dev.sh demo: {missing}", file=sys.stderr)
        return 2

    step("live VM: build (or reuse) the image and boot")
    vm = LiveVM()
    vm.ensure_up()
    vm.install_standins()
    print(vm.run("lsblk -o NAME,SIZE,SERIAL,TYPE,MODEL").stdout)

    profile_name = default_profile_name()
    variables = {
        "disk": vm.stable_path("TABULA-NVME0"),
        "swap_size": "1G",                               # the VM's disk is 16 GiB
        "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000,  # fast key derivation for the VM only
    }
    env = {**os.environ, **demo_secrets()}
    pyinfra = [str(REPO / ".venv" / "bin" / "pyinfra"), *vm.pyinfra_args(), "deploy.py", "-y",
               "--data", f"tabula_vars={json.dumps(variables)}"]

    if not args.keep_disks:
        step("reset the VM's target disks (scratch files of the test bed)")
        vm.reset_disks()

    step(f"install profile {profile_name}: {' '.join(pyinfra)}")
    first = subprocess.run(pyinfra, cwd=REPO, env=env)
    if first.returncode != 0:
        print("first run failed: fix the cause and run `./dev.sh demo --keep-disks` to resume", file=sys.stderr)
        return first.returncode

    step("second run: must converge with no changes")
    second = subprocess.run(pyinfra, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary = second.stdout[second.stdout.rfind("--> Results:"):] if "--> Results:" in second.stdout else second.stdout[-3000:]
    print(summary)
    if second.returncode != 0:
        return second.returncode
    _, changed, errors, _ = grand_total(second.stdout)
    if changed not in ("-", "0") or errors not in ("-", "0"):
        print(f"the second run changed {changed} operation(s): it did not converge", file=sys.stderr)
        return 1
    print("second run: no changes")

    command = verify.command("ssh://install-target", {"tabula_vars": variables}, ssh_config=str(vm.write_ssh_config()))
    step(f"verify the target against the profile: {shlex.join(command)}")
    checked = subprocess.run(command, cwd=REPO)
    print("target matches the profile" if checked.returncode == 0 else
          "the target does NOT match the profile: one line per mismatch above")
    return checked.returncode


if __name__ == "__main__":
    sys.exit(main())
