#!/usr/bin/env python3
"""Review without disks: render a profile's NixOS files (and its disko export) for a host name into a folder.

    .venv/bin/python tools/render.py zephyrus-btrfs --host g16 --var disk=/dev/disk/by-id/nvme-X --out /tmp/g16
    .venv/bin/python tools/render.py zfs-raidz1 --host nas --var ssd=... --var rz1=... --out /tmp/nas \
        --var 'authorized_keys=["ssh-ed25519 AAAA... me@desk"]'      # a headless profile needs a way in

Touches no disk and runs no command: partitions whose UUIDs only exist after partitioning keep
their /dev/disk/by-partlabel/ path here (the deploy writes /dev/disk/by-uuid/<real UUID>), and
hardware-configuration.nix is a skeleton with the profile's storage bindings (on the target,
nixos-generate-config supplies the detected hardware part). disko.nix is the same layout as a
disko configuration (operations/disko.py), for whoever wants to take it to disko; the deploy
does not write it. Vars the profile marks REQUIRED
and does not get here are filled with a placeholder by-id path so the layout can be read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from operations import disko  # noqa: E402
from operations.errors import TabulaError  # noqa: E402
from operations.nixfiles import choose_hardware_module, render_files  # noqa: E402
from operations.profile import REQUIRED, load_profile, profile_path  # noqa: E402


def parse_var(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--var {text!r}: use KEY=VALUE")
    return key, yaml.safe_load(value) if value else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="profile name (profiles/<name>.yaml) or path")
    parser.add_argument("--host", required=True, help="host name of the installed system")
    parser.add_argument("--var", action="append", default=[], type=parse_var, metavar="KEY=VALUE",
                        help="a profile var, as tabula_vars would give it (repeatable)")
    parser.add_argument("--dmi", default="", help="DMI product name to pick the nixos-hardware module for")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the files into")
    args = parser.parse_args(argv)

    variables = dict(args.var)
    variables["hostname"] = args.host
    try:
        declared = (yaml.safe_load(profile_path(args.profile).read_text()) or {}).get("vars", {}) or {}
        for key, value in declared.items():
            if value == REQUIRED and key not in variables:
                variables[key] = f"/dev/disk/by-id/REVIEW-{key}"
                print(f"note: var {key} not given; using {variables[key]} for review", file=sys.stderr)
        profile = load_profile(args.profile, variables)
        module, note = choose_hardware_module(profile, args.dmi)
        rendered = render_files(profile, None, None, hardware_module=module, placeholder=True)
        rendered["disko.nix"] = disko.render(profile)
    except (TabulaError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, text in sorted(rendered.items()):
        (args.out / filename).write_text(text)
        print(args.out / filename)
    print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
