"""
disko's Nix, for the layers' disko nodes (``Layer.disko_node``) and the export that assembles
them (``operations.disko``): plain data (dicts, lists, strings) printed as Nix by ``nix_value``,
with ``Script`` for shell hooks and ``disko_size`` for sizes. Pure functions; no layer imports here.

    from operations.diskolit import Script, disko_size, mounted
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from operations.errors import TabulaError
from operations.nixlit import nix_attr, nix_indented_string, nix_string

if TYPE_CHECKING:       # (the gpt layer, which the profile model imports, uses this module)
    from operations.profile import Bind, Profile


class DiskoError(TabulaError):
    """The profile holds something the disko export cannot express."""


@dataclass(frozen=True)
class Expr:
    """Nix text printed as it is (e.g. an interpolating ''-string)."""

    text: str


@dataclass(frozen=True)
class Script:
    """Shell lines printed as a Nix ''-string. With ``root``, the first line sets ``$root`` to
    disko's rootMountPoint (where the install is mounted, /mnt by default)."""

    text: str
    root: bool = False


def nix_value(value, level: int = 0) -> str:
    """Python data as a Nix expression, attribute sets one binding a line, indented by two."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, Expr):
        return value.text
    if isinstance(value, Script):
        text = nix_indented_string(value.text, inner)
        if value.root:
            text = text.replace("''\n", "''\n" + inner + "root=${lib.escapeShellArg config.disko.rootMountPoint}\n", 1)
        return text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return nix_string(value)
    if isinstance(value, (list, tuple)):
        if not value:
            return "[ ]"
        if all(isinstance(v, (str, int, bool)) for v in value):
            return "[ " + "".join(nix_value(v) + " " for v in value) + "]"
        return "[\n" + "".join(f"{inner}{nix_value(v, level + 1)}\n" for v in value) + f"{pad}]"
    if isinstance(value, dict):
        if not value:
            return "{ }"
        return "{\n" + "".join(f"{inner}{nix_attr(str(k))} = {nix_value(v, level + 1)};\n"
                               for k, v in value.items()) + f"{pad}}}"
    raise TypeError(f"no Nix form for {value!r}")


def disko_size(size_bytes: int) -> str:
    """Bytes as disko (sgdisk, btrfs mkswapfile) takes sizes: a number with K/M/G/T (binary)."""
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    raise DiskoError(f"size of {size_bytes} bytes is no whole number of KiB: disko cannot express it")


def mounted(mountpoint: str | None, options) -> dict:
    """disko's mountpoint and mountOptions of a node (nothing for one that is not mounted)."""
    if not mountpoint:
        return {}
    return {"mountpoint": mountpoint, **({"mountOptions": list(options)} if options else {})}


def new_flag(name: str) -> str:
    """The shell variable a preCreateHook sets when it found no such subvolume or dataset yet."""
    return "tabula_new_" + re.sub(r"[^A-Za-z0-9]", "_", name)


def _binds_by_host(profile: Profile) -> dict[str, list[Bind]]:
    """Bind mounts grouped by the mount point of the (non-bind) mount holding their source."""
    hosts = [m.mountpoint for m in profile.all_mounts() if "bind" not in m.options]
    found: dict[str, list[Bind]] = {}
    for bind in (m for m in profile.mounts if m.type == "bind"):
        inside = [h for h in hosts if h == "/" or bind.source == h or bind.source.startswith(h + "/")]
        found.setdefault(max(inside, key=len), []).append(bind)
    return found


def bind_hooks(profile: Profile, mountpoints: list[str]) -> dict:
    """The postMountHook making the binds whose source lies on one of these mount points (disko
    has no bind node: they are plain fileSystems beside disko.devices, made at install time)."""
    binds = _binds_by_host(profile)
    lines = []
    for host in mountpoints:
        for bind in binds.get(host, []):
            src, dst = shlex.quote(bind.source), shlex.quote(bind.mountpoint)
            remount = ",".join(["remount", "bind", *bind.options])
            lines += [f'if mountpoint -q "$root"{shlex.quote(host)} && ! mountpoint -q "$root"{dst}; then',
                      f'  mkdir -p "$root"{src} "$root"{dst}',
                      f'  mount --bind "$root"{src} "$root"{dst}',
                      f'  mount -o {shlex.quote(remount)} "$root"{dst}' if bind.options else None,
                      "fi"]
    lines = [line for line in lines if line is not None]
    if not lines:
        return {}
    return {"postMountHook": Script("# bind mounts (fileSystems below disko.devices)\n" + "\n".join(lines), root=True)}
