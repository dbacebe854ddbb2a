#!/usr/bin/env bash
# Tabula developer entry point. Every sub-command first makes sure the machine has what it needs
# (Debian packages, a Python venv in .venv), so on a fresh Debian 12 machine one command is enough.
#   ./dev.sh demo    full install of the default profile into the live VM, then verification
#   ./dev.sh test    all tests: unit, Nix evaluation, end-to-end in the live VM (two lanes, two VMs)
#   ./dev.sh setup   only the set-up
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(qemu-system-x86 qemu-utils swtpm debootstrap e2fsprogs nix-bin openssh-client python3-venv)
NIX=(nix --extra-experimental-features 'nix-command flakes')

# NixOS has no apt: the flake's dev shell (nix/shell.nix) brings the Python packages and the
# tools, and .venv is a venv over its Python (no download), so every .venv/bin/... path works.
setup_nixos() {
    if [ -z "${TABULA_DEV_SHELL:-}" ]; then
        echo ">>> NixOS: running in the flake's dev shell: nix develop $PWD --command ./dev.sh $cmd $*"
        exec "${NIX[@]}" develop "$PWD" --command ./dev.sh "$cmd" "$@"
    fi
    if [ ! -x .venv/bin/pyinfra ] || [ ! .venv/bin/python -ef "$(command -v python3)" ]; then
        echo ">>> creating .venv over the dev shell's Python"
        rm -rf .venv
        python3 -m venv --system-site-packages --without-pip .venv
        # the project importable from anywhere, as pip install -e does
        pwd > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tabula-dev.pth"
        printf '#!/bin/sh\nexec "$(dirname "$0")/python" -m pyinfra "$@"\n' > .venv/bin/pyinfra
        chmod +x .venv/bin/pyinfra
    fi
}

setup() {
    if [ -e /etc/NIXOS ]; then setup_nixos "$@"; return; fi
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo ">>> installing Debian packages: ${missing[*]}"
        local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    if [ ! -x .venv/bin/pyinfra ] || [ pyproject.toml -nt .venv/.installed ]; then
        echo ">>> creating Python venv in .venv"
        python3 -m venv .venv
        .venv/bin/pip install -q --upgrade pip
        .venv/bin/pip install -q -e '.[test]'
        touch .venv/.installed
    fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
    setup) setup "$@" ;;
    demo) setup "$@"; exec .venv/bin/python tools/demo.py "$@" ;;
    # tools/testrun.py: the unit and Nix tests, then the e2e files on two lanes, each with a live
    # VM of its own (with paths given: plain pytest on them)
    test) setup "$@"; exec .venv/bin/python tools/testrun.py "$@" ;;
    *) echo "usage: $0 {demo|test|setup} [args]" >&2; exit 2 ;;
esac
