"""Secrets in the live VM, for every profile: the LUKS passphrase and the ZFS key (fresh random
values made with each installed state, so a hit can only be a leak) never appear

- in any process's command line in the guest while the run is in flight: a background sampler
  reads every /proc/*/cmdline every few ms; it must have seen the luksFormat/open and zfs create
  commands themselves (else it proves nothing);
- in pyinfra's output at -vvv with --debug;
- in any file on the target (/mnt with the generated Nix files and the persist tree, /run, /tmp,
  /root, /etc, /var, /opt) or on the controller (the repository, /tmp, ~/.cache/tabula).

The design keeps no LUKS or ZFS key file anywhere: both are typed at the boot prompt. The only
secrets it writes are the password hashes in <persist>/secrets, which must be 0600 in a 0700
directory (tests below).
"""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from operations.profile import load_profile
from tests import profile_cases
from tests.e2e.faults import strip_ansi
from tests.e2e.helpers import executed_commands
from tools.livevm import PROJECT_DIR, cache_root

GUEST_DIRS = "/mnt /run /tmp /root /etc /var /opt"


def by_id(livevm, serial: str) -> str:
    return livevm.stable_path(serial)


def grep_guest(livevm, needles: list[str]) -> dict[str, list[str]]:
    """needle -> the guest's files holding it: one pass over every folder for all the needles
    (a recursive grep is slow in the emulated guest), then each needle in the files found."""
    # -a: binary files too; /run/tabula-sampler holds the sampler's own (secret-free) output
    patterns = " ".join(f"-e {shlex.quote(needle)}" for needle in needles)
    found = livevm.run(f"grep -rlaF --exclude-dir=tabula-sampler {patterns} {GUEST_DIRS} 2>/dev/null; true",
                       timeout=600).stdout.split()
    holders = {needle: [] for needle in needles}
    for path in found:
        for needle in needles:
            if livevm.run(["grep", "-qaF", needle, path], check=False).returncode == 0:
                holders[needle].append(path)
    return holders


def grep_controller(needle: str) -> str:
    dirs = [str(PROJECT_DIR), "/tmp", str(cache_root() / "vm")]
    # (*.record: the installed states' own record of their secrets, tests/e2e/states.py)
    found = subprocess.run(["grep", "-rlaF", "--exclude-dir=.venv", "--exclude-dir=.git",
                            "--exclude=*.raw", "--exclude=*.qcow2", "--exclude=*.record", needle, *dirs],
                           capture_output=True, text=True)
    return found.stdout


def must_see(profile) -> list[str]:
    """The secret-handling commands the install of this profile runs (from the profile: its LUKS
    containers, its encrypted datasets), which the sampler must have caught in flight."""
    patterns = []
    if profile.luks_devices():
        patterns += [r"cryptsetup luksFormat", r"cryptsetup open"]
    if any(ds.encryption for pool in profile.pools.values() for ds in pool.datasets):
        patterns.append(r"zfs create .*encryption")
    return patterns


@pytest.mark.parametrize("profile_name", profile_cases.profile_names())
def test_secrets_stay_secret(profile_name, installed, livevm, target):
    """Every profile's install (its installed state, tests/e2e/states.py: made with fresh random
    secrets, at -vvv --debug, with the sampler running)."""
    state = installed(profile_name)
    profile = load_profile(profile_name, state.variables)
    luks, zfs_key = state.secrets["TABULA_LUKS_PASSPHRASE"], state.secrets["TABULA_ZFS_KEY"]
    root_hash = state.secrets["TABULA_ROOT_PASSWORD_HASH"]
    output, seen = strip_ansi(state.output), state.cmdlines
    assert "--> Results:" in output and executed_commands(output), "the install's output was not kept"

    # the sampler caught the secret-handling commands in flight: it would have seen a secret in argv
    patterns = must_see(profile)
    assert patterns, f"{profile_name} handles no secret on a command's stdin: nothing to sample"
    for pattern in patterns:
        assert re.search(pattern, seen), f"sampler never saw /{pattern}/ run: it proves nothing\n{seen[:3000]}"
    # (booleans first: pytest must not print a secret into the test log when an assertion fails)
    in_guest = grep_guest(livevm, [luks, zfs_key, root_hash])
    for secret in (luks, zfs_key):
        in_argv = secret in seen
        assert not in_argv, "a secret was in a process's command line in the guest"
        in_output = secret in output or any(secret in cmd for cmd in executed_commands(output))
        assert not in_output, "a secret is in pyinfra's -vvv --debug output"
        files = in_guest[secret]
        assert files == [], f"a secret is in files on the target: {files}"
        files = grep_controller(secret)
        assert files == "", f"a secret is in files on the controller: {files}"
    # the hashes are secrets too: only in the files meant for them
    hash_in_output = root_hash in output
    assert not hash_in_output, "a password hash is in pyinfra's output"
    holders = sorted(in_guest[root_hash])
    persist = f"/mnt{profile.persistence.root}"
    # (a btrfs top level Tabula keeps mounted under /run/tabula shows the same files, by subvolume)
    same_files = re.compile(rf"^({re.escape(persist)}|/run/tabula/btrfs/[^/]+/[^/]+)/secrets/[^/]+$")
    assert holders and all(same_files.match(h) for h in holders), holders

    # secret files 0600 in a 0700 directory, owned by root
    assert target.file(f"{persist}/secrets").mode == 0o700
    assert target.file(f"{persist}/secrets").user == "root"
    names = livevm.run(f"ls {persist}/secrets").stdout.split()
    assert names
    for name in names:
        assert target.file(f"{persist}/secrets/{name}").mode == 0o600, name
        assert target.file(f"{persist}/secrets/{name}").user == "root", name
    # the generated Nix files name no secret (checked by the grep over /mnt above) and exist
    assert livevm.run("ls /mnt/etc/nixos").stdout.split(), "no generated Nix files to check"
