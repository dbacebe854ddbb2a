#!/usr/bin/env python3
"""The offline NixOS evaluation kit of ``../shared/nix``, unpacked once into a cache.

The kit (nixpkgs 24.05, impermanence, nixos-hardware, disko, two compat modules) is test data:
read from beside the project, never copied into it. Each tarball is unpacked into
``~/.cache/tabula/nixkit/<sha256 of the tarball>/`` so a changed tarball gets a fresh folder
and an unchanged one is reused.

    .venv/bin/python tools/nixkit.py paths                   # JSON: input name -> unpacked folder
    .venv/bin/python tools/nixkit.py generate-config > x.pl  # the real nixos-generate-config, substituted
    .venv/bin/python tools/nixkit.py check                   # is the kit there? (what is missing, how to point at one)

Stdlib only, like tools/livevm.py. TABULA_NIX_KIT points at another kit folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent

# The tarballs a flake input is overridden with (input name -> tarball stem), per nixos-hardware
# snapshot: 2024-11 has gu605my and its own hardware.graphics compatibility, 2026-08 has gu605cw
# and needs both compat modules on 24.05 (the kit's README).
NIXPKGS = "nixpkgs-24.05"
INPUTS_2024 = {"nixpkgs": NIXPKGS, "impermanence": "impermanence-2024-11",
               "nixos-hardware": "nixos-hardware-2024-11", "disko": "disko-2024-11"}
INPUTS_2026 = {**INPUTS_2024, "nixos-hardware": "nixos-hardware-2026-08",
               # nixos-hardware-2026-08 has a nixpkgs input of its own whose lock Nix 2.8 cannot read
               "nixos-hardware/nixpkgs": NIXPKGS}
COMPAT_GRAPHICS = "compat-graphics-24.11.nix"
COMPAT_TUNED = "compat-tuned.nix"
# The one trace the kit's README names as harmless: it comes from its stubbed ShellCheck.
KNOWN_TRACE = 'getExe: Package "ShellCheck-0.0.0-offline-stub"'
# compat-graphics maps the 24.11 names with mkRenamedOptionModule, which warns at every use of
# the new name: that warning is the shim at work, not a problem of the generated files.
COMPAT_GRAPHICS_TRACE = re.compile(r"The option `hardware\.graphics\.\w+' defined in `[^']*' has been renamed to "
                                   r"`hardware\.opengl\.\w+'")
GENERATE_CONFIG = "nixos/modules/installer/tools/nixos-generate-config.pl"
# Build-time placeholders of nixos-generate-config.pl, as the kit's README gives them for a
# Debian live system (the configuration templates: the installer's minimal one is enough).
MINIMAL_CONFIGURATION = """\
{ config, lib, pkgs, ... }:

{
  imports =
    [ # Include the results of the hardware scan.
      ./hardware-configuration.nix
    ];

  boot.loader.systemd-boot.enable = true;
  boot.loader.efi.canTouchEfiVariables = true;

  system.stateVersion = "24.05"; # Did you read the comment?
}
"""
GENERATE_CONFIG_PLACEHOLDERS = {
    "@perl@": "/usr/bin/perl",
    "@btrfs@": "btrfs",
    "@detectvirt@": "systemd-detect-virt",
    "@hostPlatformSystem@": "x86_64-linux",
    "@xserverEnabled@": "",
    "@desktopConfiguration@": MINIMAL_CONFIGURATION,
    "@configuration@": MINIMAL_CONFIGURATION,
}


class KitError(RuntimeError):
    """The kit is missing or broken; the message says what."""


def kit_dir() -> Path:
    return Path(os.environ.get("TABULA_NIX_KIT") or PROJECT_DIR.parent / "shared" / "nix")


def kit_files() -> list[str]:
    """Every file the tests and the test bed take from the kit."""
    stems = sorted({*INPUTS_2024.values(), *INPUTS_2026.values()})
    return [f"{stem}.tar.xz" for stem in stems] + [COMPAT_GRAPHICS, COMPAT_TUNED]


def missing_kit() -> str | None:
    """None when the kit is complete; else one message saying what the kit is, where it was
    looked for and how to point at one."""
    folder = kit_dir()
    missing = [name for name in kit_files() if not (folder / name).is_file()]
    if not missing:
        return None
    where = ("TABULA_NIX_KIT" if os.environ.get("TABULA_NIX_KIT")
             else "../shared/nix beside the project (TABULA_NIX_KIT is not set)")
    found = "it does not exist" if not folder.is_dir() else f"it lacks {', '.join(missing)}"
    return (f"The offline NixOS evaluation kit was not found at {folder} ({where}): {found}.\n"
            "The kit is nixpkgs 24.05, impermanence, nixos-hardware and disko as tarballs, and two compat "
            "modules: the tests evaluate every generated configuration against it, and the live VM takes the "
            "real nixos-generate-config from its nixpkgs.\n"
            f"Point TABULA_NIX_KIT at a folder holding {', '.join(kit_files())}, e.g.\n"
            "    TABULA_NIX_KIT=/path/to/nix-kit ./dev.sh test\n"
            "Without it, the unit tests that need no Nix still run: ./dev.sh test tests/unit")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tabula" / "nixkit"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def unpacked(stem: str) -> Path:
    """The folder ``<stem>/`` of ``<kit>/<stem>.tar.xz``, unpacked once per tarball hash."""
    tarball = kit_dir() / f"{stem}.tar.xz"
    if not tarball.is_file():
        raise KitError(f"{tarball}: not found (the offline Nix kit lives in ../shared/nix)")
    # The hash of a 26 MB tarball costs ~0.1 s; a marker keyed by size and mtime skips even that.
    stat = tarball.stat()
    quick = cache_root() / "by-stat" / f"{stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if quick.is_symlink() and (quick.resolve() / "complete").exists():
        return quick.resolve() / stem
    target = cache_root() / _sha256(tarball)[:16]
    with _lock(target):
        if not (target / "complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(target, filter="tar")
            if not (target / stem).is_dir():
                raise KitError(f"{tarball}: does not unpack into {stem}/")
            (target / "complete").write_text(stem + "\n")
        quick.parent.mkdir(parents=True, exist_ok=True)
        quick.unlink(missing_ok=True)
        quick.symlink_to(target)
    return target / stem


@dataclass(frozen=True)
class EvalSetup:
    """What one evaluation needs: flake input overrides and the test-only compat modules."""

    inputs: dict[str, str]
    compat_modules: tuple[str, ...] = ()

    def unexpected_traces(self, traces) -> list[str]:
        """The evaluation's traces but the kit's known one and those of its own compat shim."""
        shim = any(m.endswith(COMPAT_GRAPHICS) for m in self.compat_modules)
        return [t for t in traces if KNOWN_TRACE not in t and not (shim and COMPAT_GRAPHICS_TRACE.search(t))]


def setup_for(hardware_module: str | None) -> EvalSetup:
    """The kit's inputs for a configuration using this nixos-hardware module.

    gu605cw exists only in the 2026-08 snapshot, written for nixpkgs >= 24.11: both compat
    modules map 24.05 onto the newer option names. Without a hardware module nothing declares
    ``hardware.graphics`` on 24.05 (the 2024-11 snapshot does, for its own modules), so the
    graphics compat module maps it; the generated files use the current name.
    """
    if hardware_module and hardware_module.startswith("asus-zephyrus-gu605cw"):
        stems, compat = INPUTS_2026, (COMPAT_GRAPHICS, COMPAT_TUNED)
    elif hardware_module:
        stems, compat = INPUTS_2024, ()
    else:
        stems, compat = INPUTS_2024, (COMPAT_GRAPHICS,)
    inputs = {name: str(unpacked(stem)) for name, stem in stems.items()}
    return EvalSetup(inputs=inputs, compat_modules=tuple(str(kit_dir() / m) for m in compat))


def generate_config_script() -> str:
    """The real nixos-generate-config of the kit's nixpkgs, placeholders substituted."""
    text = (unpacked(NIXPKGS) / GENERATE_CONFIG).read_text()
    for placeholder, value in GENERATE_CONFIG_PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    left = sorted(set(re.findall(r"@[A-Za-z]+@", text)))
    if left:
        raise KitError(f"{GENERATE_CONFIG}: placeholders left unsubstituted: {' '.join(left)}")
    return text


def main(argv: list[str]) -> int:
    if argv[:1] == ["paths"]:
        stems = sorted({*INPUTS_2024.values(), *INPUTS_2026.values()})
        print(json.dumps({stem: str(unpacked(stem)) for stem in stems}, indent=2))
        return 0
    if argv[:1] == ["check"]:
        message = missing_kit()
        print(message or f"kit complete at {kit_dir()}", file=sys.stderr if message else sys.stdout)
        return 1 if message else 0
    if argv[:1] == ["generate-config"]:
        sys.stdout.write(generate_config_script())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
