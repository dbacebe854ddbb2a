"""Secrets in the live VM: the LUKS passphrase and the ZFS key (fresh random values per test, so a
hit can only be a leak) never appear

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

import json
import os
import secrets
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.e2e.faults import CmdlineSampler, run_with_fault, strip_ansi
from tests.e2e.helpers import executed_commands
from tools.livevm import PROJECT_DIR, cache_root

GUEST_DIRS = "/mnt /run /tmp /root /etc /var /opt"


def by_id(livevm, serial: str) -> str:
    return livevm.stable_path(serial)


def grep_guest(livevm, needle: str) -> str:
    # -a: binary files too; /run/tabula-sampler holds the sampler's own (secret-free) output
    return livevm.run(f"grep -rlaF --exclude-dir=tabula-sampler {shlex.quote(needle)} {GUEST_DIRS} "
                      "2>/dev/null; true", timeout=600).stdout


def grep_controller(needle: str) -> str:
    dirs = [str(PROJECT_DIR), "/tmp", str(cache_root() / "vm")]
    found = subprocess.run(["grep", "-rlaF", "--exclude-dir=.venv", "--exclude-dir=.git",
                            "--exclude=*.raw", "--exclude=*.qcow2", needle, *dirs],
                           capture_output=True, text=True)
    return found.stdout


PROFILES = {
    "zephyrus-btrfs": (lambda vm: {"disk": by_id(vm, "TABULA-NVME0"), "swap_size": "256M",
                                   "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000},
                       [r"cryptsetup luksFormat", r"cryptsetup open"]),
    "light-tmpfs-f2fs": (lambda vm: {"hostname": "tabula-secrets", "disk": by_id(vm, "TABULA-SSD"),
                                     "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000},
                         [r"cryptsetup luksFormat", r"cryptsetup open", r"zfs create .*encryption"]),
}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_secrets_stay_secret(profile, clean_disks, livevm, target, monkeypatch):
    import re
    luks = "luks-" + secrets.token_hex(12)
    zfs_key = "zfs-" + secrets.token_hex(12)
    root_hash = "$6$" + secrets.token_hex(8) + "$" + secrets.token_hex(32)
    env = {"TABULA_LUKS_PASSPHRASE": luks, "TABULA_ZFS_KEY": zfs_key,
           "TABULA_ROOT_PASSWORD_HASH": root_hash, "TABULA_USER_PASSWORD_HASH": root_hash}
    for key in ("LUKS_PASSPHRASE", "ZFS_KEY", "ROOT_PASSWORD_HASH", "USER_PASSWORD_HASH"):
        monkeypatch.delenv(f"TABULA_{key}_FILE", raising=False)
    make_vars, must_see = PROFILES[profile]
    variables = make_vars(livevm)
    args = ["-vvv", "--debug", "--data", f"tabula_profile={profile}", "--data", f"tabula_vars={json.dumps(variables)}",
            "--data", "tabula_install=false", "--data", "tabula_export_pools=false", "deploy.py"]

    sampler = CmdlineSampler(livevm)
    sampler.start()
    try:
        run = run_with_fault(livevm, args, None, env=env)
    finally:
        seen = sampler.stop()
    output = strip_ansi(run.output)
    assert run.returncode == 0, output[-8000:]

    # the sampler caught the secret-handling commands in flight: it would have seen a secret in argv
    for pattern in must_see:
        assert re.search(pattern, seen), f"sampler never saw /{pattern}/ run: it proves nothing\n{seen[:3000]}"
    # (booleans first: pytest must not print a secret into the test log when an assertion fails)
    for secret in (luks, zfs_key):
        in_argv = secret in seen
        assert not in_argv, "a secret was in a process's command line in the guest"
        in_output = secret in output or any(secret in cmd for cmd in executed_commands(output))
        assert not in_output, "a secret is in pyinfra's -vvv --debug output"
        files = grep_guest(livevm, secret)
        assert files == "", f"a secret is in files on the target: {files}"
        files = grep_controller(secret)
        assert files == "", f"a secret is in files on the controller: {files}"
    # the hashes are secrets too: only in the files meant for them
    hash_in_output = root_hash in output
    assert not hash_in_output, "a password hash is in pyinfra's output"
    holders = sorted(grep_guest(livevm, root_hash).split())
    persist = {"zephyrus-btrfs": "/mnt/persist", "light-tmpfs-f2fs": "/mnt/remote"}[profile]
    # (the btrfs top level stays mounted under /run/tabula: the same files, seen through @persist)
    same_files = re.compile(rf"^({re.escape(persist)}|/run/tabula/btrfs/[^/]+/@persist)/secrets/[^/]+$")
    assert holders and all(same_files.match(h) for h in holders), holders

    # secret files 0600 in a 0700 directory, owned by root
    assert target.file(f"{persist}/secrets").mode == 0o700
    assert target.file(f"{persist}/secrets").user == "root"
    for name in livevm.run(f"ls {persist}/secrets").stdout.split():
        assert target.file(f"{persist}/secrets/{name}").mode == 0o600, name
    # the generated Nix files name no secret (checked by the grep over /mnt above) and exist
    assert livevm.run("ls /mnt/etc/nixos").stdout.split(), "no generated Nix files to check"
