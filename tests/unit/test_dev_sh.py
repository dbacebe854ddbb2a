"""./dev.sh setup on a NixOS host takes the flake's dev shell, never apt; on Debian it is unchanged.

A real NixOS-like host, faked for dev.sh alone: in a mount namespace of its own (``unshare -m``,
root), /etc gets an overlay holding ``/etc/NIXOS`` and apt-get, dpkg-query and sudo are
bind-mounted over by a spy that logs its call and fails. ``nix`` is a stand-in first on PATH: it
logs its arguments and runs what follows ``--command`` as ``nix develop`` would (with the dev
shell's TABULA_DEV_SHELL=1); nothing is built. dev.sh runs in a copy of the project's dev.sh.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
SPIED = ("apt-get", "dpkg-query", "sudo")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare for a mount namespace")

SPY = """#!/bin/sh
echo "$(basename "$0") $*" >> "$SPY_LOG"
exit 1
"""
# dpkg-query on Debian: every package installed, so setup goes on to the venv check
DPKG_INSTALLED = """#!/bin/sh
echo "dpkg-query $*" >> "$SPY_LOG"
printf 'install ok installed'
"""
NIX = """#!/bin/sh
echo "nix $*" >> "$SPY_LOG"
while [ $# -gt 0 ] && [ "$1" != --command ]; do shift; done
shift
TABULA_DEV_SHELL=1 exec "$@"
"""


def run_dev_sh(tmp_path: Path, nixos: bool, spies: dict[str, str], prepare=None) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    """``./dev.sh setup`` in a copy of dev.sh and pyproject.toml (``prepare(project)`` then lays
    out more), in a mount namespace with the spies; (the run, the logged calls, the project)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dev.sh", "pyproject.toml"):
        shutil.copy2(PROJECT / name, project / name)
    if prepare:
        prepare(project)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in spies.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = "set -e\n"
    if nixos:
        upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
        upper.mkdir()
        work.mkdir()
        (upper / "NIXOS").touch()
        script += f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc\n"
    for name in SPIED:
        real = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if real:
            script += f"mount --bind {bin_dir / name} {real}\n"
    script += f"cd {project} && exec ./dev.sh setup\n"
    log = tmp_path / "calls.log"
    log.touch()
    env = dict(os.environ, SPY_LOG=str(log), PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("TABULA_DEV_SHELL", None)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    return done, log.read_text().splitlines(), project


def test_nixos_host_takes_the_dev_shell_never_apt(tmp_path):
    spies = {name: SPY for name in SPIED} | {"nix": NIX}
    done, calls, project = run_dev_sh(tmp_path, nixos=True, spies=spies)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == [f"nix --extra-experimental-features nix-command flakes develop {project} --command ./dev.sh setup"]
    assert "NixOS: running in the flake's dev shell" in done.stdout
    # the venv over the dev shell's Python: nothing downloaded, the project importable
    assert "include-system-site-packages = true" in (project / ".venv" / "pyvenv.cfg").read_text()
    pth = list((project / ".venv").glob("lib/python3*/site-packages/tabula-dev.pth"))
    assert [p.read_text().strip() for p in pth] == [str(project)]
    assert os.access(project / ".venv" / "bin" / "pyinfra", os.X_OK)


def up_to_date_venv(project: Path) -> None:
    pyinfra = project / ".venv" / "bin" / "pyinfra"
    pyinfra.parent.mkdir(parents=True)
    pyinfra.write_text("#!/bin/sh\n")
    pyinfra.chmod(0o755)
    os.utime(project / "pyproject.toml", (1, 1))
    (project / ".venv" / ".installed").touch()


def test_debian_host_is_unchanged(tmp_path):
    """Without /etc/NIXOS: the Debian packages are checked with dpkg-query (all installed here,
    and the venv is up to date), and nix is never called."""
    spies = {name: SPY for name in SPIED} | {"dpkg-query": DPKG_INSTALLED, "nix": NIX}
    done, calls, _ = run_dev_sh(tmp_path, nixos=False, spies=spies, prepare=up_to_date_venv)
    assert done.returncode == 0, done.stdout + done.stderr
    packages = ["qemu-system-x86", "qemu-utils", "swtpm", "debootstrap", "e2fsprogs", "nix-bin", "openssh-client",
                "python3-venv"]
    assert calls == [f"dpkg-query -W -f=${{Status}} {package}" for package in packages], calls
    assert "NixOS" not in done.stdout
