"""
The gap report: what was written to the ephemeral root since the last boot that no persisted
path and no mount keeps, so it is lost at the next boot (the guide's "Detecting Impermanence
Gaps"), with the persistence entries that would keep it.

Each layer finds what its ephemeral root holds by its own means (``Layer.gaps``):
btrfs compares the root subvolume with its blank snapshot, ZFS runs ``zfs diff <temp>@empty``,
and a tmpfs root lists its files (it starts empty). This module leaves out what persistence or
a mount covers and what NixOS makes again at every boot, groups the rest by directory, and
says which profile vars add them to ``environment.persistence``.

    pyinfra install-target gaps.py      # or @local, on the booted machine or the live system

Read only: it runs no operation (the btrfs read mounts the top level read-only for the read).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

from operations.mounts import Mounts
from operations.nixlit import nix_list, nix_string
from operations.profile import Profile
from operations.run import Run
from operations.target import Written, system_root

# What NixOS makes again at every boot (activation, systemd), or what is never state.
RECREATED = ("/run", "/tmp", "/proc", "/sys", "/dev", "/etc/static", "/etc/NIXOS", "/etc/.clean", "/etc/.updated",
             "/var/.updated", "/bin/sh", "/usr/bin/env", "/etc/mtab", "/var/empty",
             "/var/lib/machines", "/var/lib/portables")     # (nested subvolumes systemd makes)
# Where a group is a directory of its own at this depth (/var/lib/<app>, /etc/<app>, ...).
GROUP_DEPTH = {"/var/lib": 3, "/var/cache": 3, "/var/db": 3, "/var/spool": 3, "/etc": 2, "/root": 2, "/srv": 2,
               "/opt": 2, "/home": 3, "/usr/local": 3}


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def is_recreated(entry: Written) -> bool:
    """What NixOS makes again at boot: its own paths, and /etc links into the store."""
    if any(_under(entry.path, place) for place in RECREATED):
        return True
    return entry.kind == "link" and _under(entry.path, "/etc") and entry.link.startswith(("/etc/static/", "/nix/store/"))


def kept_paths(profile: Profile) -> list[str]:
    """Every place whose content outlives a boot: the persisted paths and the other mounts."""
    return ([*profile.persistence.directories, *profile.persistence.files]
            + [m.mountpoint for m in profile.all_mounts() if m.mountpoint != "/" and m.fstype != "tmpfs"])


def uncovered(entries: list[Written], profile: Profile) -> list[Written]:
    """What is lost at the next boot: not under a kept path, not made again by NixOS, and not a
    folder that only holds the way to a kept path (/var for /var/log) or other entries."""
    kept = kept_paths(profile)
    left = [e for e in entries if not is_recreated(e) and not any(_under(e.path, k) for k in kept)]
    paths = {e.path for e in left}
    structural = {posixpath.dirname(k.rstrip("/")) for k in kept}
    for k in kept:
        while k not in ("/", ""):
            k = posixpath.dirname(k)
            structural.add(k)
    return [e for e in left if e.kind != "directory"
            or (e.path not in structural and not any(p.startswith(e.path + "/") for p in paths))]


@dataclass
class Group:
    path: str
    kind: str                                   # "directory" or "file"
    entries: list[Written] = field(default_factory=list)


def group_of(path: str) -> tuple[str, str]:
    """(the path to persist for this entry, "directory" or "file")."""
    parts = path.strip("/").split("/")
    base = max((b for b in GROUP_DEPTH if _under(path, b)), key=len, default=None)
    depth = GROUP_DEPTH[base] if base else len(parts) - 1 or 1
    if len(parts) <= depth:
        return path, "file"
    return "/" + "/".join(parts[:depth]), "directory"


def grouped(entries: list[Written]) -> list[Group]:
    groups: dict[str, Group] = {}
    for entry in sorted(entries, key=lambda e: e.path):
        where, kind = group_of(entry.path) if entry.kind != "directory" else (entry.path, "directory")
        groups.setdefault(where, Group(where, kind)).entries.append(entry)
    return list(groups.values())


def report(groups: list[Group], profile: Profile, root: str, how: list[str]) -> str:
    lines = [f"gaps: what the ephemeral root of the system at {root} holds since the last boot "
             f"({'; '.join(how) or 'no ephemeral root in this profile'})"]
    if not groups:
        lines.append("  nothing: all that was written is kept (persisted or on a mount), or NixOS makes it again")
        return "\n".join(lines)
    lines.append("  lost at the next boot, not kept by persistence or a mount:")
    width = max(len(shown(g.path)) for g in groups) + 1
    for g in groups:
        if g.kind == "directory":
            names = ", ".join(shown(posixpath.relpath(e.path, g.path)) for e in g.entries[:3] if e.path != g.path)
            more = f", and {len(g.entries) - 3} more" if len(g.entries) > 3 else ""
            detail = f"{len(g.entries)} {'entry' if len(g.entries) == 1 else 'entries'}" + (f": {names}{more}" if names else "")
            lines.append(f"    {(shown(g.path) + '/').ljust(width)} {detail}")
        else:
            lines.append(f"    {shown(g.path).ljust(width)} {g.entries[0].kind}")
    directories = [g.path for g in groups if g.kind == "directory"]
    files = [g.path for g in groups if g.kind == "file"]
    wanted_dirs = [*profile.vars.get("persist_directories", []), *directories]
    wanted_files = [*profile.vars.get("persist_files", []), *files]
    lines.append("  to keep them, set these profile vars (tabula_vars):")
    if directories:
        lines.append(f"    persist_directories: {_yaml_list(wanted_dirs)}")
    if files:
        lines.append(f"    persist_files: {_yaml_list(wanted_files)}")
    lines.append("  which adds to impermanence.nix:")
    persist = nix_string(profile.persistence.root)
    if directories:
        lines.append(f"    environment.persistence.{persist}.directories = {nix_list(directories)};")
    if files:
        lines.append(f"    environment.persistence.{persist}.files = {nix_list(files)};")
    return "\n".join(lines)


def _yaml_list(items: list[str]) -> str:
    """The list as JSON, which is YAML too: what ``--data tabula_vars=...`` takes, every name exact."""
    return json.dumps(list(dict.fromkeys(items)), ensure_ascii=False)


def shown(path: str) -> str:
    """A path on one line of the report: a control character or a backslash in a name escaped
    as in JSON (``/etc/new\\nline``), anything else as it is."""
    if not any(ord(c) < 0x20 or c in "\\\x7f" for c in path):
        return path
    return json.dumps(path, ensure_ascii=False)[1:-1].replace('\\"', '"')


def find(run: Run, root: str) -> tuple[list[Group], list[str]]:
    """(the groups of what is lost at the next boot, how each layer looked)."""
    entries, how = [], []
    for layer in run.layers:
        found, said = layer.gaps(run, root)
        entries += found
        how += said
    return grouped(uncovered(entries, run.profile)), how


def show(run: Run) -> str:
    root = system_root(run.settings.tabula_root, run.read(Mounts))
    groups, how = find(run, root)
    text = report(groups, run.profile, root, how)
    print("\n".join(f"{run.prefix}{line}" for line in text.splitlines()), flush=True)
    return text
