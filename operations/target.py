"""
What every layer reads on the target, and where the installed system lives while it is built:
the install root, paths under it, and general facts (where a path points, what is at several
paths, a file's text, a folder's digest, what blkid probes on a device, the devices' UUIDs).
It imports no layer: layers and stages import it.

    from operations.target import INSTALL_ROOT, install_path, CanonicalPath, PathsState

The layers' checks (``checks(host, settings, root)``) read the same facts through a testinfra
host: ``read_fact(host, PathsState, paths=[...])``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import posixpath
import shlex
import tarfile
import time
from dataclasses import dataclass

from pyinfra.api import FactBase, QuoteString, StringCommand

from operations.factbatch import SETTLE

# Where the installed system is mounted while it is built, and its NixOS configuration.
INSTALL_ROOT = "/mnt"
CONFIG_DIR = f"{INSTALL_ROOT}/etc/nixos"
# Where layers keep private mounts of their own (e.g. a btrfs top level for subvolume facts).
PRIVATE_MOUNT_ROOT = "/run/tabula"

# What a formatting command says when it finds a signature on its device (the checks inside
# luksFormat, mkfs and mkswap), after "<device> ... not formatting it".
SIGNATURE_FOUND_ADVICE = ("(left by an earlier install on this disk?). Run again to have it checked and kept, "
                          "or clear it with wipefs -a if it holds nothing you need")


def install_path(mountpoint: str) -> str:
    """/ -> /mnt, /home -> /mnt/home: where a mount of the installed system lives during install."""
    return INSTALL_ROOT if mountpoint == "/" else f"{INSTALL_ROOT}{mountpoint}"


def system_root(wanted: str, mounts: dict) -> str:
    """Where the installed system is, for the day-two tools (gaps.py, verify): the install root
    while the live system holds it after the install (something is mounted there), "/" once it
    booted. ``wanted`` (inventory data ``tabula_root``: "auto", "/", "/mnt") decides when not
    "auto"; ``mounts``: the ``Mounts`` fact."""
    if wanted != "auto":
        return wanted
    return INSTALL_ROOT if INSTALL_ROOT in mounts else "/"


def under(root: str, path: str) -> str:
    """A path of the installed system as seen from where it is checked: the install root while it
    is built (``/mnt``: / -> /mnt, /home -> /mnt/home) or ``/`` on the booted system itself."""
    if root in ("", "/"):
        return path
    return root if path == "/" else f"{root.rstrip('/')}{path}"


def decode_octal(text: str) -> str:
    r"""/proc/mounts and /proc/swaps escape space, tab, newline and backslash as \040 etc."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) + 0 and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class CheckError(RuntimeError):
    """A check could not read the target (the fact's command failed); the message says which."""


def read_fact(host, fact: type[FactBase], **kwargs):
    """A fact read through a testinfra ``host`` as pyinfra reads it: the fact's own command (in
    ``sh``), ``process()`` on its output lines, the fact's default when it printed nothing. The
    checks read the target with the same facts the deploy uses; testinfra is never imported here."""
    instance = fact()
    command = instance.command(**kwargs)
    if isinstance(command, StringCommand):
        command = command.get_raw_value()
    result = host.run(f"sh -c {shlex.quote(command)}")
    if result.rc != 0:
        raise CheckError(f"reading {fact.__name__} failed (exit {result.rc}): {result.stderr.strip()[:300]}")
    lines = result.stdout.splitlines()
    return instance.process(lines) if lines else instance.default()


# --- facts --------------------------------------------------------------------------------------


class CanonicalPath(FactBase):
    """``readlink -f`` of a path on the target (None when it does not exist)."""

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return f"if [ -e {quoted} ]; then readlink -f {quoted}; fi"

    def process(self, output):
        return output[0] if output else None


class WholeDiskSignature(FactBase):
    """
    ``blkid -p -o export`` of a device: what its first sectors say it is (PTTYPE for a partition
    table, TYPE for a filesystem on the whole device). Empty when blank or absent.
    """

    default = dict

    def command(self, device: str) -> str:
        quoted = shlex.quote(device)
        # settle first: udev may be re-reading a partition table (its links briefly gone)
        return SETTLE + f"if [ -b {quoted} ]; then blkid -p -o export {quoted} 2>/dev/null || true; fi"

    def process(self, output):
        return parse_blkid_export(output)


def parse_blkid_export(lines) -> dict:
    found = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip()
    return found


class BlockDeviceIds(FactBase):
    """
    blkid's view of block devices: ``{device: {"UUID": ..., "PARTUUID": ..., "TYPE": ...}}``.
    Devices that do not exist yet are absent from the result (not an error).

    .. code:: python

        ids = read(BlockDeviceIds, devices=["/dev/disk/by-partlabel/EFI"])
    """

    def command(self, devices) -> StringCommand:
        script = 'for d in "$@"; do [ -b "$d" ] || continue; echo "DEVICE=$d"; blkid -o export "$d" || true; done'
        return StringCommand("sh", "-c", QuoteString(script), "ids", *[QuoteString(d) for d in devices])

    def process(self, output):
        return parse_exports(output, "DEVICE")

    @staticmethod
    def default():
        return {}


class FileText(FactBase):
    """A text file's exact content, or None when it does not exist (base64 keeps bytes intact)."""

    def command(self, path) -> StringCommand:
        return StringCommand("sh", "-c", QuoteString('[ -f "$1" ] && { echo present; base64 -w0 "$1"; echo; } || true'),
                             "filetext", QuoteString(path))

    def process(self, output):
        if not output or output[0] != "present":
            return None
        return base64.b64decode("".join(output[1:])).decode()

    @staticmethod
    def default():
        return None


def digest_script(folder: str = '"$1"') -> str:
    """Shell printing the digest of a folder (a shell word): sha256 over the names and contents
    of every file below it. The one digest: the fact reads it, the install stamp records it."""
    return f'cd {folder} && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum | sha256sum | cut -d" " -f1'


def directory_digest(files: dict[str, str]) -> str:
    """The digest ``digest_script`` computes on the target for these files (for tests and review)."""
    lines = "".join(f"{hashlib.sha256(text.encode()).hexdigest()}  ./{name}\n" for name, text in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


class DirectoryDigest(FactBase):
    """``digest_script`` of a directory, "" if it is absent."""

    def command(self, path) -> StringCommand:
        return StringCommand("sh", "-c", QuoteString(f'[ -d "$1" ] || exit 0; {digest_script()}'), "digest",
                             QuoteString(path))

    def process(self, output):
        return "\n".join(output).strip()

    @staticmethod
    def default():
        return ""


class PathExists(FactBase):
    """Whether a path exists (any type; symlinks count even when dangling)."""

    def command(self, path) -> StringCommand:
        return StringCommand("sh", "-c", QuoteString('{ [ -e "$1" ] || [ -L "$1" ]; } && echo yes || echo no'),
                             "exists", QuoteString(path))

    def process(self, output):
        return output[-1:] == ["yes"]

    @staticmethod
    def default():
        return False


class PathsState(FactBase):
    """
    What is at each of several paths, in one round trip; absent paths are left out.

    .. code:: python

        read(PathsState, paths=["/mnt/etc/nixos", "/mnt/etc/nixos/flake.nix"])
        {"/mnt/etc/nixos": {"type": "directory", "mode": "755", "user": "root", "sha256": ""},
         "/mnt/etc/nixos/flake.nix": {"type": "file", "mode": "644", "user": "root", "sha256": "9f…"}}
    """

    def command(self, paths) -> str:
        # One stat and one sha256sum for all the paths (a process per path costs ~50 ms on a slow
        # target); a missing path is left out by both, and says so on stderr only.
        quoted = " ".join(shlex.quote(p) for p in paths)
        return (f"stat -c '%F\t%a %U\t%n' -- {quoted} 2>/dev/null; echo '{_DIGESTS}'; "
                f"sha256sum -- {quoted} 2>/dev/null; true")

    def process(self, output):
        return parse_paths_state(output)

    @staticmethod
    def default():
        return {}


_DIGESTS = "##sha256##"
_KINDS_OF_STAT = {"regular file": "file", "regular empty file": "file", "directory": "directory",
                  "symbolic link": "link"}


def parse_paths_state(lines) -> dict:
    found, digests, in_digests = {}, {}, False
    for line in lines:
        if line == _DIGESTS:
            in_digests = True
        elif in_digests:
            digest, _, path = line.partition("  ")
            digests[path] = digest
        else:
            parts = line.split("\t", 2)
            if len(parts) == 3:
                kind, mode_user, path = parts
                mode, _, user = mode_user.partition(" ")
                found[path] = {"type": _KINDS_OF_STAT.get(kind, "other"), "mode": mode, "user": user, "sha256": ""}
    for path, state in found.items():
        if state["type"] == "file":
            state["sha256"] = digests.get(path, "")
    return found


def is_file_with(state: dict | None, text: str, mode: str) -> bool:
    """Whether PathsState shows a regular file with exactly this text and mode."""
    return bool(state) and state["type"] == "file" and state["mode"] == mode and \
        state["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def files_tar(files: dict[str, str], mode: str = "644", mtime: int = 0) -> bytes:
    """``{relative name: text}`` as one tar, each file with this mode and mtime."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = len(data), int(mode, 8), mtime
            tar.addfile(member, io.BytesIO(data))
    return archive.getvalue()


def write_files_command(directory: str, files: dict[str, str], mode: str = "644") -> StringCommand:
    """One command writing ``{relative name: text}`` below ``directory``, contents on stdin.

    The files go as one base64 tar (modes set in it), unpacked into a folder beside their place
    and renamed into it, one ``mv`` per folder: an interrupted write never leaves a half file
    under a name, and a handful of processes write them all (each costs ~30 ms on a slow target).
    """
    archive = files_tar(files, mode, mtime=int(time.time()))
    folders: dict[str, list[str]] = {}
    for name in files:
        folders.setdefault(posixpath.dirname(name), []).append(name)
    moves = []
    for folder, names in folders.items():
        place = shlex.quote(folder or ".")
        staged = " ".join(f'"$s/"{shlex.quote(name)}' for name in names)
        moves.append(f'mkdir -p "$d/"{place}; mv -f {staged} "$d/"{place}; ')
    script = (f'set -e; d={shlex.quote(directory)}; s="$d/.tabula-new"; rm -rf "$s"; mkdir -p "$s"; '
              'base64 -d | tar -x -C "$s"; ' + "".join(moves) + 'rm -rf "$s"')
    return StringCommand(script, _stdin=base64.encodebytes(archive).decode().splitlines())


# --- what is on a filesystem (the gap report) ----------------------------------------------------


@dataclass(frozen=True)
class Written:
    """Something on an ephemeral root, named by its path in the installed system.

    + kind: file, directory, link, subvolume (a nested btrfs subvolume) or other
    + link: a symlink's target
    """

    path: str
    kind: str
    link: str = ""


# find's -printf: type, inode, size, mtime, link target, path below the starting point. A nested
# btrfs subvolume's root directory is inode 256; -xdev stops at it and at every other mount.
# One entry a line, NUL-ended by find, then a backslash and a newline inside a name (or a link's
# target) written as \134 and \012, as /proc/mounts does: a name may hold any byte but NUL and /.
LISTING_FORMAT = r"%y\t%i\t%s\t%T@\t%l\t%P\0"
_KINDS = {"f": "file", "d": "directory", "l": "link"}


def listing_command(path_variable: str = "$1") -> str:
    """Shell that lists everything below a folder on its own filesystem, for parse_listing."""
    return (f'cd "{path_variable}" && find . -mindepth 1 -xdev -printf \'{LISTING_FORMAT}\' | '
            "sed -z 's/\\\\/\\\\134/g; s/\\n/\\\\012/g' | tr '\\0' '\\n'")


def parse_listing(lines, prefix: str = "/") -> dict[str, tuple[Written, str]]:
    """{path: (Written, "size mtime")} from listing_command's output, paths put under ``prefix``."""
    found = {}
    for line in lines:
        parts = line.split("\t", 5)
        if len(parts) != 6:
            continue
        kind, inode, size, mtime, link, relative = parts
        path = posixpath.join(prefix, decode_octal(relative))
        what = "subvolume" if kind == "d" and inode == "256" else _KINDS.get(kind, "other")
        found[path] = (Written(path, what, decode_octal(link)), f"{size} {mtime}")
    return found


# --- rescue -------------------------------------------------------------------------------------
# What the install itself leaves on an ephemeral root (a btrfs subvolume with a blank snapshot, a
# ZFS temp dataset with @empty): the mount points of the filesystems mounted below it, and
# /etc/nixos (written there by the install, copied to the persistent root, bound back at boot).
# A root holding nothing else is as the install (or a rescue) left it.

LEFTOVER_LIMIT = 20     # at most this many leftovers are listed: enough to show what is there


def install_footprint(root_mountpoint: str, mountpoints: list[str]) -> tuple[list[str], str | None]:
    """(folders the install makes on the root mounted at ``root_mountpoint``: each mount point
    below it and the folders above them; the configuration folder relative to the root, or None
    when /etc/nixos is not on this root), all relative to the root."""
    base = root_mountpoint.rstrip("/")

    def relative(path: str) -> str | None:
        if path == root_mountpoint or not path.startswith(base + "/"):
            return None
        return path[len(base) + 1:]

    folders: set[str] = set()
    for mountpoint in mountpoints:
        rel = relative(mountpoint)
        if rel:
            parts = rel.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    config = relative(CONFIG_DIR.removeprefix(INSTALL_ROOT))
    if config:
        parts = config.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(folders), config


def leftovers_script(path: str, folders: list[str], config: str | None, prefix: str = "") -> str:
    """Shell lines printing ``<prefix>TYPE<tab>PATH`` for each entry below ``path`` (this
    filesystem only: a nested subvolume or a mount is listed, not entered) that is not the
    install's footprint (``install_footprint``), at most LEFTOVER_LIMIT of them. TYPE is find's
    %y (f file, d folder, l link...). Nothing printed: nothing but the footprint is there."""
    allowed = "\\n".join(f.replace("\\", "\\\\") for f in folders)
    return (f"find {shlex.quote(path)} -xdev -mindepth 1 -printf '%y\\t%P\\n' 2>/dev/null | "
            f"awk -F '\\t' -v ok={shlex.quote(allowed)} -v keep={shlex.quote(config or '')} "
            f"-v prefix={shlex.quote(prefix)} -v limit={LEFTOVER_LIMIT} "
            "'BEGIN { n = split(ok, a, \"\\n\"); for (i = 1; i <= n; i++) if (a[i] != \"\") allowed[a[i]] = 1 } "
            "{ p = substr($0, 3) } "
            "($1 == \"d\" && (p in allowed)) || (keep != \"\" && (p == keep || index(p, keep \"/\") == 1)) { next } "
            "{ print prefix $0; if (++count >= limit) exit }'")


def parse_leftovers(lines) -> list[tuple[str, str]]:
    """``leftovers_script``'s output as [(type, relative path)]."""
    found = []
    for line in lines:
        kind, sep, path = line.partition("\t")
        if sep and path:
            found.append((kind, path))
    return found


def describe_leftovers(found: list[tuple[str, str]]) -> str:
    """'junk-file, srv/ (and more)' for a message."""
    shown = ", ".join(path + ("/" if kind == "d" else "") for kind, path in found)
    return shown + (" (and more)" if len(found) >= LEFTOVER_LIMIT else "")


class Folders(FactBase):
    """The names in a folder (none when it is absent)."""

    default = list

    def command(self, path: str) -> str:
        return f"ls -1A {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output) -> list[str]:
        return sorted(line for line in output if line)


def parse_exports(lines, marker: str) -> dict[str, dict[str, str]]:
    """``blkid -o export`` of several devices, each after a ``<marker>=<device>`` line:
    {device: {"TYPE": ..., "UUID": ...}}."""
    found: dict[str, dict[str, str]] = {}
    current = None
    for line in lines:
        key, _, value = line.partition("=")
        if key == marker:
            current = found.setdefault(value, {})
        elif current is not None and key:
            current[key] = value
    return found
