#!/usr/bin/env python3
"""Did a change alter what Tabula writes? Every profile's review rendering (tools/render.py: the
NixOS files and the disko export) at another revision and in this tree, compared file by file.

    .venv/bin/python tools/render_diff.py 167c1ae          # exit 1 when any file differs

The other revision is checked out into a temporary worktree and rendered with its own code;
both sides get the same vars (tests/profile_cases.yaml's, of this tree). A profile the other
revision does not have is said so.
"""
from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tests import profile_cases  # noqa: E402


def render(tree: Path, profile: str, out: Path) -> str | None:
    """The profile rendered by ``tree``'s own tools/render.py into ``out`` (None), or its error."""
    variables = profile_cases.render_vars(profile)
    host = variables.pop("hostname", "host")
    argv = [sys.executable, str(tree / "tools/render.py"), profile, "--host", host, "--out", str(out)]
    for key, value in variables.items():
        argv += ["--var", f"{key}={json.dumps(value)}"]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the revision to compare this tree with")
    args = parser.parse_args()
    differs = False
    with tempfile.TemporaryDirectory(prefix="tabula-render-diff-") as scratch:
        other = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(other), args.revision], cwd=PROJECT, check=True)
        try:
            for profile in profile_cases.profile_names():
                before, now = Path(scratch) / "before" / profile, Path(scratch) / "now" / profile
                error = render(other, profile, before) or render(PROJECT, profile, now)
                if error:
                    print(f"{profile}: not rendered: {error}")
                    differs = True
                    continue
                names = sorted({p.name for p in before.iterdir()} | {p.name for p in now.iterdir()})
                changed = [n for n in names if not (before / n).exists() or not (now / n).exists()
                           or (before / n).read_bytes() != (now / n).read_bytes()]
                print(f"{profile}: " + (f"differs: {', '.join(changed)}" if changed else f"identical ({len(names)} files)"))
                for name in changed:
                    differs = True
                    old = (before / name).read_text().splitlines(keepends=True) if (before / name).exists() else []
                    new = (now / name).read_text().splitlines(keepends=True) if (now / name).exists() else []
                    sys.stdout.writelines(difflib.unified_diff(old, new, f"{args.revision}/{name}", f"now/{name}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=PROJECT, check=False)
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
