"""The project's own flake (flake.nix, nix/) evaluated against the offline kit, in ONE ``nix eval``.

The flake is copied as git would ship it (tracked and unignored files: no .venv), its nixpkgs
input overridden with the kit's 24.05 tree. The values are read from the evaluated flake:
through the installer's module arguments (``_module.specialArgs.self`` is the flake itself), so
one evaluation gives the package, the dev shell and the installer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from operations.nixeval import NIX_FLAGS, parse_stderr
from tools import nixkit

PROJECT = Path(__file__).resolve().parents[2]
PINS = json.loads((PROJECT / "nix" / "pins.json").read_text())["wheels"]

# sys: the installer's nixosSystem; its module argument self is the flake (inputs as overridden)
READ_BACK = """sys: let
  self = sys._module.specialArgs.self;
  tabula = self.packages.x86_64-linux.default;
  pinned = builtins.fromJSON PINNED;
  c = sys.config;
in {
  package = tabula.drvPath;
  app = self.apps.x86_64-linux.default.program;
  shell = self.devShells.x86_64-linux.default.drvPath;
  installer = c.system.build.toplevel.drvPath;
  iso = c.system.build.isoImage.drvPath;
  python = tabula.python.pythonVersion;
  modules = map (p: { name = p.pname or p.name; version = p.version or null; }
    // (if builtins.elem (p.pname or "") pinned then { url = builtins.head p.src.urls; hash = p.src.outputHash; } else { }))
    tabula.pythonModules;
  installerPackages = map (p: { name = p.pname or p.name; drv = p.drvPath; }) c.environment.systemPackages;
  supportedFilesystems = builtins.attrNames (sys.pkgs.lib.filterAttrs (_: v: v) c.boot.supportedFilesystems);
  kernelModulePackages = map (p: p.pname or p.name) c.boot.extraModulePackages;
}"""


class FlakeEvaluationError(AssertionError):
    pass


def flake_copy(dest: Path) -> Path:
    """The files git would ship (tracked, or new and not ignored) copied into ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = PROJECT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def evaluate_flake() -> tuple[dict, float]:
    """(the values of READ_BACK, seconds the nix eval took)."""
    nixpkgs = nixkit.unpacked(nixkit.NIXPKGS)
    with tempfile.TemporaryDirectory(prefix="tabula-flake-") as scratch:
        folder = flake_copy(Path(scratch))
        apply = READ_BACK.replace("PINNED", json.dumps(json.dumps(sorted(PINS))))
        argv = ["nix", "--option", "build-users-group", "", *NIX_FLAGS, "eval", "--json", "--no-write-lock-file",
                "--override-input", "nixpkgs", f"path:{nixpkgs}",
                f"path:{folder}#nixosConfigurations.installer", "--apply", apply]
        started = time.monotonic()
        # Debian's Nix 2.8 crashes (SIGSEGV) in its garbage collector on the ISO image's derivation
        # (nixpkgs' stock minimal CD too): evaluated with the collector off (~1-2 GB of memory)
        env = dict(os.environ, GC_DONT_GC="1")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL, env=env)
        seconds = time.monotonic() - started
    error, traces = parse_stderr(done.stderr)
    if done.returncode != 0:
        raise FlakeEvaluationError(f"the flake does not evaluate:\n{(error or done.stderr)[-6000:]}")
    unexpected = [t for t in traces if nixkit.KNOWN_TRACE not in t]
    if unexpected:
        raise FlakeEvaluationError("the evaluation printed warnings:\n" + "\n".join(unexpected))
    return json.loads(done.stdout), seconds
