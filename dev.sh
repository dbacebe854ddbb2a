#!/usr/bin/env bash
# Tabula developer entry point. Every sub-command first makes sure the machine has what it needs
# (Debian packages, a Python venv in .venv), so on a fresh Debian 12 machine one command is enough.
#   ./dev.sh demo    full install of the default profile into the live VM, then verification
#   ./dev.sh test    all tests: unit, Nix evaluation, end-to-end in the live VM (two lanes, two VMs)
#   ./dev.sh setup   only the set-up
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(qemu-system-x86 qemu-utils debootstrap e2fsprogs nix-bin openssh-client python3-venv)

setup() {
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
    setup) setup ;;
    demo) setup; exec .venv/bin/python tools/demo.py "$@" ;;
    # tools/testrun.py: the unit and Nix tests, then the e2e files on two lanes, each with a live
    # VM of its own (with paths given: plain pytest on them)
    test) setup; exec .venv/bin/python tools/testrun.py "$@" ;;
    *) echo "usage: $0 {demo|test|setup} [args]" >&2; exit 2 ;;
esac
