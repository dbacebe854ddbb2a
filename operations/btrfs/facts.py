"""
What the btrfs layer reads: the subvolumes of a filesystem through its mounted top level, a
swapfile, what a subvolume holds beyond the install's footprint (rescue), and a subvolume listed
beside its blank snapshot (gaps). Parsers are tested on output captured in the VM.
"""

from __future__ import annotations

import re
import shlex

from pyinfra.api import FactBase, QuoteString, StringCommand

from operations.profile import Filesystem
from operations.target import PRIVATE_MOUNT_ROOT, leftovers_script, listing_command, parse_leftovers


def top_level_path(device: str, fs: Filesystem) -> str:
    """Where the install keeps the filesystem's top level (subvolid=5) mounted: a private path."""
    name = fs.fs_label or device.rstrip("/").rsplit("/", 1)[-1]
    return f"{PRIVATE_MOUNT_ROOT}/btrfs/{name}"


class BtrfsSubvolumes(FactBase):
    """
    Subvolumes of the btrfs filesystem whose top level is mounted at ``path`` (empty when it is
    not mounted), from ``btrfs subvolume list -p -u -q`` and ``btrfs property get -ts .. ro``.

    .. code:: python

        {"@root-blank": {"id": 257, "parent": 5, "top_level": 5, "uuid": "…", "parent_uuid": "…",
                         "ro": True, "empty": True}}
    """

    default = dict

    def command(self, path: str) -> str:
        return subvolumes_listing(shlex.quote(path))

    def requires_command(self, path: str) -> str:
        return "btrfs"

    def process(self, output):
        return parse_subvolume_list(output)


def subvolumes_listing(top: str) -> str:
    """Shell listing the subvolumes below the top level mounted at ``top`` (a shell word), each
    line ``btrfs subvolume list -p -u -q``'s with its ro property (``ro=true``: in ``btrfs
    subvolume list -r``) and whether it is empty (a top-level one: no entry in one ``find`` of the
    top level; a nested one: ``ls -A``). A handful of processes, not two per subvolume."""
    return (
        f"if mountpoint -q {top}; then nl='\n'; "
        f"ro=$(btrfs subvolume list -r {top} | sed 's/^.* path //'); "
        f"full=$(find {top} -mindepth 2 -maxdepth 2 -printf '%P\\n' 2>/dev/null | cut -d/ -f1 | sort -u); "
        f"btrfs subvolume list -p -u -q {top} | while IFS= read -r line; do "
        "sub=${line##* path }; "
        'case "$nl$ro$nl" in *"$nl$sub$nl"*) r=ro=true ;; *) r=ro=false ;; esac; '
        'case "$sub" in '
        f'*/*) if [ -z "$(ls -A {top}/"$sub" 2>/dev/null)" ]; then e=yes; else e=no; fi ;; '
        '*) case "$nl$full$nl" in *"$nl$sub$nl"*) e=no ;; *) e=yes ;; esac ;; esac; '
        "printf '%s\\t%s\\tempty=%s\\n' \"$line\" \"$r\" \"$e\"; done; fi"
    )


_LIST_RE = re.compile(
    r"^ID (?P<id>\d+) gen \d+(?: cgen \d+)? parent (?P<parent>\d+) top level (?P<top_level>\d+)"
    # btrfs-progs pads a "-" parent_uuid with spaces to the width of a UUID
    r"(?:\s+parent_uuid (?P<parent_uuid>\S+))?(?:\s+received_uuid \S+)?(?:\s+uuid (?P<uuid>\S+))?\s+path (?P<path>.*)$"
)


def parse_subvolume_list(lines) -> dict:
    subvolumes = {}
    for line in lines:
        fields = line.split("\t")
        match = _LIST_RE.match(fields[0])
        if not match:
            continue
        extra = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        path = match.group("path").removeprefix("<FS_TREE>/")
        subvolumes[path] = {
            "id": int(match.group("id")),
            "parent": int(match.group("parent")),
            "top_level": int(match.group("top_level")),
            "uuid": match.group("uuid"),
            "parent_uuid": None if match.group("parent_uuid") in (None, "-") else match.group("parent_uuid"),
            "ro": extra.get("ro") == "true",
            "empty": extra.get("empty") == "yes",
        }
    return subvolumes


class SwapfileState(FactBase):
    """
    A swapfile's size, type, mode, attributes (lsattr), swap signature and whether it is active
    (None when the file does not exist).

    .. code:: python

        {"size": 268435456, "type": "regular file", "mode": "600", "nocow": True, "swap": True, "active": False}
    """

    def command(self, path: str) -> str:
        f = shlex.quote(path)
        return (
            f"if [ -e {f} ]; then stat --printf 'size=%s\\ntype=%F\\nmode=%a\\n' {f}; "
            f"echo attrs=$(lsattr {f} 2>/dev/null | cut -d' ' -f1); "
            f"echo signature=$(blkid -p -o value -s TYPE {f} 2>/dev/null); "
            f"if awk -v f={f} 'NR > 1 && $1 == f {{found=1}} END {{exit !found}}' /proc/swaps; "
            "then echo active=yes; else echo active=no; fi; fi"
        )

    def process(self, output):
        return parse_swapfile_state(output)


class SwapfileResumeOffset(FactBase):
    """
    Where the kernel resumes a hibernated system from a btrfs swapfile: its ``resume_offset=``
    (``btrfs inspect-internal map-swapfile -r``: the file's first physical page, in pages of the
    filesystem's device). None when the file does not exist.

    .. code:: python

        533760
    """

    def command(self, path: str) -> str:
        f = shlex.quote(path)
        return f"if [ -f {f} ]; then btrfs inspect-internal map-swapfile -r {f}; fi"

    def requires_command(self, path: str) -> str:
        return "btrfs"

    def process(self, output):
        return parse_resume_offset(output)


def parse_resume_offset(lines) -> int | None:
    """``map-swapfile -r``'s one number (None when it printed none)."""
    numbers = [line.strip() for line in lines if line.strip().isdigit()]
    return int(numbers[-1]) if numbers else None


def parse_swapfile_state(lines) -> dict | None:
    raw = dict(line.split("=", 1) for line in lines if "=" in line)
    if not raw:
        return None
    return {
        "size": int(raw.get("size", "0") or 0),
        "type": raw.get("type"),
        "mode": raw.get("mode"),
        "nocow": "C" in raw.get("attrs", ""),
        "swap": raw.get("signature") == "swap",
        "active": raw.get("active") == "yes",
    }


class BtrfsRootLeftovers(FactBase):
    """
    What a subvolume (seen through the mounted top level) holds beyond the install's own
    footprint: the mount points of the filesystems mounted below it, and etc/nixos. At most
    ``target.LEFTOVER_LIMIT`` entries, as ``[(type, path)]`` (find's %y: f, d, l...); empty when
    it holds nothing else; None when the subvolume is not there (or the top level not mounted).

    + path: the subvolume through the top level, e.g. /run/tabula/btrfs/nixos/@root
    + folders, config: ``target.install_footprint`` of the subvolume's mount point

    .. code:: python

        [("f", "junk-file"), ("d", "srv")]
    """

    def command(self, path: str, folders: list[str], config: str | None) -> str:
        return (f"if [ -d {shlex.quote(path)} ]; then echo present; {leftovers_script(path, folders, config)}; "
                "else echo absent; fi")

    def process(self, output):
        return parse_root_leftovers(output)


def parse_root_leftovers(lines) -> list[tuple[str, str]] | None:
    lines = list(lines)
    if not lines or lines[0] != "present":
        return None
    return parse_leftovers(lines[1:])


class SubvolumeAgainstBlank(FactBase):
    """
    Everything in a subvolume and in its blank snapshot, read through a read-only mount of the
    top level made for the read (and taken away after): ``{"root": [lines], "blank": [lines]}``
    in ``target.listing_command``'s format. ``btrfs subvolume find-new`` (the guide's way) needs a
    generation to compare against and misses deletions and renamed files; two listings do not.

    .. code:: python

        run.read(SubvolumeAgainstBlank, device="/dev/mapper/cryptroot", subvolume="@root", blank="@root-blank")
    """

    def command(self, device: str, subvolume: str, blank: str) -> StringCommand:
        script = ('d=$(mktemp -d /run/tabula-gaps.XXXXXX) || exit 1; '
                  'if ! mount -t btrfs -o ro,subvol=/ "$1" "$d"; then rmdir "$d"; exit 1; fi; '
                  f'for s in "$2" "$3"; do echo "## $s"; [ -d "$d/$s" ] && ( {listing_command("$d/$s")} ); done; '
                  'umount "$d"; rmdir "$d"')
        return StringCommand("sh", "-c", QuoteString(script), "gaps", QuoteString(device), QuoteString(subvolume),
                             QuoteString(blank))

    def process(self, output):
        sections: dict[str, list[str]] = {"root": [], "blank": []}
        current = None
        for line in output:
            if line.startswith("## "):
                current = "root" if current is None else "blank"
            elif current:
                sections[current].append(line)
        return sections

    @staticmethod
    def default():
        return {"root": [], "blank": []}


class BtrfsTopLevelSubvolumes(FactBase):
    """
    The subvolumes of a btrfs filesystem (``BtrfsSubvolumes``' form) read through its top level
    where the install keeps it mounted, or else through a read-only mount of it made for the read
    and taken away after (the booted system; verify reads only). ``{"unmountable": why}`` when it
    cannot be mounted.

    + device: the filesystem's block device
    + path: where the install keeps its top level mounted
    """

    def command(self, device: str, path: str) -> StringCommand:
        script = ('top=$2; if ! mountpoint -q "$top"; then top=$(mktemp -d /run/tabula-verify.XXXXXX) || exit 1; '
                  'if ! said=$(mount -o subvolid=5,ro "$1" "$top" 2>&1); then rmdir "$top"; '
                  'echo "unmountable $said"; exit 0; fi; '
                  'trap \'umount "$top"; rmdir "$top"\' EXIT; fi; ' + subvolumes_listing('"$top"'))
        return StringCommand("sh", "-c", QuoteString(script), "subvolumes", QuoteString(device), QuoteString(path))

    def requires_command(self, device: str, path: str) -> str:
        return "btrfs"

    def process(self, output):
        lines = list(output)
        if lines[:1] and lines[0].startswith("unmountable"):
            return {"unmountable": lines[0].removeprefix("unmountable").strip()}
        return parse_subvolume_list(lines)

    @staticmethod
    def default():
        return {}
