"""
Btrfs subvolumes, the blank root snapshot and swapfiles.

Subvolume facts need the filesystem mounted, so its top level (subvolid=5) stays mounted at a
private path, /run/tabula/btrfs/<label>, for the whole install (and re-runs). pyinfra 3 evaluates
operations again at execution, so on blank disks the plan (--dry) shows every create and the run
sees the filesystem made by the earlier stages.

The blank snapshot (the guide's ``@root-blank``) is taken only right after its subvolume is
created empty, never re-taken: if it exists writable or not empty, that is drift and stops the run.
"""

from __future__ import annotations

import re
import shlex

from pyinfra.api import FactBase, QuoteString, StringCommand
from operations.run import Made, Run, one_command, operation

from operations.errors import TabulaError
from operations.mounts import Mounts, subvolume_option
from operations.nixlit import NixFragments, device_units, nix_attr, nix_indented_string, nix_list, nix_string, stable_device
from operations.profile import Filesystem, Profile, Subvolume, Swapfile
from operations.settings import Settings
from operations.target import (PRIVATE_MOUNT_ROOT, CanonicalPath, Written, install_path, listing_command, parse_listing,
                               read_fact, under)
from operations.target import describe_leftovers, install_footprint, leftovers_script, parse_leftovers


def top_level_path(device: str, fs: Filesystem) -> str:
    name = fs.fs_label or device.rstrip("/").rsplit("/", 1)[-1]
    return f"{PRIVATE_MOUNT_ROOT}/btrfs/{name}"


# --- facts ------------------------------------------------------------------------------------


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
        top = shlex.quote(path)
        return (
            f"if mountpoint -q {top}; then btrfs subvolume list -p -u -q {top} | while IFS= read -r line; do "
            "sub=${line##* path }; "
            f"ro=$(btrfs property get -ts {top}/\"$sub\" ro 2>/dev/null); "
            f"if [ -z \"$(ls -A {top}/\"$sub\" 2>/dev/null)\" ]; then empty=yes; else empty=no; fi; "
            "printf '%s\\t%s\\tempty=%s\\n' \"$line\" \"$ro\" \"$empty\"; done; fi"
        )

    def requires_command(self, path: str) -> str:
        return "btrfs"

    def process(self, output):
        return parse_subvolume_list(output)


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
    A swapfile's size, type, attributes (lsattr), swap signature and whether it is active
    (None when the file does not exist).

    .. code:: python

        {"size": 268435456, "type": "regular file", "nocow": True, "swap": True, "active": False}
    """

    def command(self, path: str) -> str:
        f = shlex.quote(path)
        return (
            f"if [ -e {f} ]; then echo size=$(stat -c %s {f}); echo type=$(stat -c %F {f}); "
            f"echo attrs=$(lsattr {f} 2>/dev/null | cut -d' ' -f1); "
            f"echo signature=$(blkid -p -o value -s TYPE {f} 2>/dev/null); "
            f"if awk -v f={f} 'NR > 1 && $1 == f {{found=1}} END {{exit !found}}' /proc/swaps; "
            "then echo active=yes; else echo active=no; fi; fi"
        )

    def process(self, output):
        return parse_swapfile_state(output)


def parse_swapfile_state(lines) -> dict | None:
    raw = dict(line.split("=", 1) for line in lines if "=" in line)
    if not raw:
        return None
    return {
        "size": int(raw.get("size", "0") or 0),
        "type": raw.get("type"),
        "nocow": "C" in raw.get("attrs", ""),
        "swap": raw.get("signature") == "swap",
        "active": raw.get("active") == "yes",
    }


# --- operations -------------------------------------------------------------------------------


@operation()
def top_level(run: Run, device: str, path: str, options: tuple[str, ...] = ()):
    """
    Keep the top level (subvolid=5) of a btrfs filesystem mounted at a private path, where its
    subvolumes are created and inspected.

    + run: the run (facts, what it made)
    + device: the filesystem's block device, e.g. /dev/mapper/cryptroot
    + path: where to mount it, e.g. /run/tabula/btrfs/nixos
    + options: filesystem-wide mount options (compress=..., discard=...): btrfs applies those of the
      first mount of a filesystem to all its later subvolume mounts, so the top level, mounted
      first, must carry the profile's

    **Example:**

    .. code:: python

        btrfs.top_level(run, device="/dev/mapper/cryptroot", path="/run/tabula/btrfs/nixos")
    """
    # A filesystem this run just made cannot be mounted yet: the mount command checks the path.
    new = run.created_this_run(Made.filesystem(device))
    current = None if new else run.read(Mounts).get(path)
    if current:
        want = run.read(CanonicalPath, path=device)
        have = run.read(CanonicalPath, path=current["device"])
        if current["fstype"] != "btrfs" or want != have or "subvolid=5" not in current["options"]:
            raise TabulaError(f"{path} is mounted from {current['device']} ({current['fstype']}, "
                              f"{','.join(current['options'])}), not the top level of {device}: unmount it")
        run.noop(f"the top level of {device} is already mounted at {path}")
        return
    # (not read, so checked: nothing may be mounted there already)
    free = StringCommand("sh", "-c", QuoteString(
        f"if mountpoint -q {shlex.quote(path)}; then echo 'tabula: {path} is already mounted: unmount it' >&2; exit 1; fi"
    )) if new else None
    run.tell(f"mount the top level of {device} at {path}" + (f" ({','.join(options)})" if options else ""))
    yield one_command(StringCommand("mkdir", "-p", QuoteString(path)), free,
                      StringCommand("mount", "-t", "btrfs", "-o", QuoteString(",".join(["subvolid=5", *options])),
                                    QuoteString(device), QuoteString(path)))


@operation()
def subvolumes(run: Run, top: str, wanted: list[Subvolume], device: str = ""):
    """
    Create the missing top-level subvolumes; right after creating a subvolume that has a
    ``blank_snapshot``, take that read-only snapshot of it while it is still empty.

    + run: the run (facts, what it made)
    + top: where the filesystem's top level is mounted
    + wanted: the profile's subvolumes
    + device: the filesystem's block device (a filesystem this run just made has no subvolumes to
      read; btrfs itself refuses to create one that exists)

    **Example:**

    .. code:: python

        btrfs.subvolumes(run, top="/run/tabula/btrfs/nixos", wanted=[Subvolume(path="@root", blank_snapshot="@root-blank")],
                         device="/dev/mapper/cryptroot")
    """
    existing = {} if device and run.created_this_run(Made.filesystem(device)) else run.read(BtrfsSubvolumes, path=top)
    commands, created, plans = [], [], []
    for sub in wanted:
        target = f"{top}/{sub.path}"
        blank = existing.get(sub.blank_snapshot) if sub.blank_snapshot else None
        if sub.path not in existing:
            if blank is not None:
                # what the boot-time rollback does: the subvolume again as a copy of its blank state
                _check_blank(sub, blank)
                commands.append(StringCommand("btrfs", "subvolume", "snapshot",
                                              QuoteString(f"{top}/{sub.blank_snapshot}"), QuoteString(target)))
                plans.append(f"{sub.path} as a copy of {sub.blank_snapshot}")
            else:
                commands.append(StringCommand("btrfs", "subvolume", "create", QuoteString(target)))
                plans.append(sub.path)
                if sub.blank_snapshot:
                    commands.append(_snapshot_command(top, sub))
                    plans.append(f"{sub.blank_snapshot} (read-only snapshot of the empty {sub.path})")
            if device:
                created.append(Made.subvolume(device, sub.path))     # empty: a new one, or a blank copy
            continue
        if sub.blank_snapshot:
            if blank is None:
                if not existing[sub.path]["empty"]:
                    raise TabulaError(f"{sub.path} exists with content but {sub.blank_snapshot} is missing (drift): "
                                      "a snapshot now would not be blank; restore or remove it by hand")
                commands.append(_snapshot_command(top, sub))
                plans.append(f"{sub.blank_snapshot} (read-only snapshot of the empty {sub.path})")
            else:
                _check_blank(sub, blank)
    if commands:
        # One round trip, in order: a blank snapshot right after its subvolume is created.
        run.tell(f"btrfs subvolumes on {device or top}: {', '.join(plans)}")
        run.record_created(*created)
        yield one_command(*commands)
    else:
        names = ", ".join(s.path for s in wanted)
        blanks = "; ".join(f"{s.blank_snapshot} is read-only and empty" for s in wanted if s.blank_snapshot)
        run.noop(f"{top} already has the subvolumes {names}" + (f"; {blanks}" if blanks else ""))


def _snapshot_command(top: str, sub: Subvolume) -> StringCommand:
    return StringCommand("btrfs", "subvolume", "snapshot", "-r", QuoteString(f"{top}/{sub.path}"),
                         QuoteString(f"{top}/{sub.blank_snapshot}"))


def _check_blank(sub: Subvolume, blank: dict) -> None:
    if not blank["ro"]:
        raise TabulaError(f"{sub.blank_snapshot} exists but is writable (drift): the root would be rolled back to a "
                          f"state that can change. Check it, then delete it and {sub.path} by hand, or set it read-only")
    if not blank["empty"]:
        raise TabulaError(f"{sub.blank_snapshot} exists but is not empty (drift): the root would be rolled back "
                          "to that content at every boot")


def swapfile_commands(path: str, swapfile: Swapfile) -> list[StringCommand]:
    # The btrfs way: an empty file made NOCOW (no compression, no COW) before it gets any blocks.
    file = QuoteString(path)
    return [
        StringCommand("truncate", "-s", "0", file),
        StringCommand("chattr", "+C", file),
        StringCommand("fallocate", "-l", str(swapfile.size_bytes), file),
        StringCommand("chmod", "600", file),
        StringCommand("mkswap", file),
    ]


@operation()
def swapfile(run: Run, path: str, swapfile: Swapfile):
    """
    A swapfile on btrfs: NOCOW, preallocated to its size, with a swap signature. A wrong one is
    made again when it is not active; an active wrong one is drift.

    + run: the run (facts, what it made)
    + path: the swapfile under /mnt, e.g. /mnt/swap/swapfile
    + swapfile: the profile's Swapfile (size)

    **Example:**

    .. code:: python

        btrfs.swapfile(run, path="/mnt/swap/swapfile", swapfile=Swapfile(size="32GiB"))
    """
    # In an empty subvolume this run just made and mounted there is no file to read.
    state = None if run.is_fresh(path) else run.read(SwapfileState, path=path)
    want = swapfile.size_bytes
    if state is None:
        run.tell(f"swapfile {path} of {swapfile.size} ({want} bytes), NOCOW")
        run.record_fresh(path, False)
        yield one_command(*swapfile_commands(path, swapfile))
        return
    problems = []
    if state["type"] != "regular file":
        problems.append(f"it is a {state['type']}")
    if state["size"] != want:
        problems.append(f"it has {state['size']} bytes, not {swapfile.size} ({want} bytes)")
    if not state["nocow"]:
        problems.append("it lacks the No_COW attribute (chattr +C)")
    if not state["swap"]:
        problems.append("it has no swap signature")
    if not problems:
        run.noop(f"{path} is already a NOCOW swapfile of {swapfile.size} ({want} bytes)")
        return
    if state["active"] or state["type"] != "regular file":
        raise TabulaError(f"{path} is not the wanted swapfile (drift): {'; '.join(problems)}; "
                          + ("it is active swap: swapoff it first" if state["active"] else "remove it by hand"))
    run.tell(f"swapfile {path} made again ({'; '.join(problems)}): {swapfile.size} ({want} bytes), NOCOW")
    yield one_command(StringCommand("rm", "-f", QuoteString(path)), *swapfile_commands(path, swapfile))


# --- stages -----------------------------------------------------------------------------------


def _btrfs_filesystems(profile: Profile) -> list[tuple[str, Filesystem]]:
    return [(device, fs) for device, fs in profile.filesystems() if fs.format == "btrfs" and fs.subvolumes]


def apply(run: Run) -> None:
    for device, fs in _btrfs_filesystems(run.profile):
        top = top_level_path(device, fs)
        first = next((s for s in fs.subvolumes if s.mountpoint), None)
        options = tuple(o for o in (first.mount_options if first else ()) if not o.startswith(("subvol", "ro")))
        name = top.rsplit("/", 1)[-1]          # the filesystem's label (or its device's name)
        top_level(run, device=device, path=top, options=options, name=f"Btrfs top level {name}")
        subvolumes(run, top=top, wanted=list(fs.subvolumes), device=device, name=f"Btrfs subvolumes {name}")


def apply_swapfiles(run: Run) -> None:
    for _device, fs in _btrfs_filesystems(run.profile):
        for sub in fs.subvolumes:
            if sub.swapfile and sub.mountpoint:
                path = f"{install_path(sub.mountpoint)}/swapfile"
                swapfile(run, path=path, swapfile=sub.swapfile, name=f"Btrfs swapfile {path}")


# --- NixOS -------------------------------------------------------------------------------------

# Where the initrd mounts the top level to restore the root.
ROLLBACK_MOUNTDIR = "/run/tabula-rollback"


def rollback_targets(profile: Profile) -> list[tuple[str, Filesystem, Subvolume]]:
    return [(device, fs, sub) for device, fs in profile.filesystems()
            for sub in fs.subvolumes if sub.blank_snapshot]


def rollback_script(device: str, subvolume: str, blank: str, mountdir: str = ROLLBACK_MOUNTDIR) -> str:
    """The bash the initrd runs to put ``subvolume`` back to ``blank``; the e2e test runs it too.

    Nested subvolumes go first (systemd creates some, e.g. /var/lib/machines): a subvolume that
    still holds one cannot be deleted. ``btrfs subvolume list`` prints subvolumes by ID, and a
    nested subvolume is always newer than the one it sits in, so deleting in reverse order takes
    the deepest first. Without the blank snapshot nothing is deleted: a root that cannot be
    restored is better left as it is.
    """
    return f"""\
mnt={mountdir}
mkdir -p "$mnt"
mount -t btrfs -o subvol=/ {device} "$mnt"
if [ -d "$mnt/{blank}" ]; then
  nested=()
  while read -r line; do
    path="${{line#* path }}"
    case "$path" in
      {subvolume}/*) nested+=("$path") ;;
    esac
  done < <(btrfs subvolume list "$mnt")
  for ((i = ${{#nested[@]}} - 1; i >= 0; i--)); do
    echo "deleting nested subvolume ${{nested[i]}}"
    btrfs subvolume delete "$mnt/${{nested[i]}}"
  done
  if [ -d "$mnt/{subvolume}" ]; then
    echo "deleting {subvolume}"
    btrfs subvolume delete "$mnt/{subvolume}"
  fi
  echo "restoring {subvolume} from {blank}"
  btrfs subvolume snapshot "$mnt/{blank}" "$mnt/{subvolume}"
else
  echo "{blank} is missing: {subvolume} is left as it is" >&2
fi
umount "$mnt"
"""


def nix_fragments(profile: Profile, ids: dict | None = None, placeholder: bool = False) -> NixFragments:
    """configuration.nix: monthly scrub of each btrfs; impermanence.nix: the initrd service that
    restores each subvolume with a blank snapshot (the guide's @root from @root-blank)."""
    impermanence, scrub = [], []
    targets = rollback_targets(profile)
    for index, (device, fs, sub) in enumerate(targets):
        path = stable_device(device, ids, "UUID", placeholder)
        units = device_units(path)
        service = "rollback" if len(targets) == 1 else f"rollback-{index + 1}"
        script = rollback_script(path, sub.path, sub.blank_snapshot)
        impermanence.append(f"""\
  # Rollback service: {sub.path} is restored from {sub.blank_snapshot} at every boot, after the
  # device is opened and before the root is mounted (systemd stage 1).
  boot.initrd.systemd.services.{nix_attr(service)} = {{
    description = {nix_string(f"Rollback btrfs subvolume {sub.path} to {sub.blank_snapshot}")};
    wantedBy = [ "initrd.target" ];
    requires = {nix_list(units[-1:])};
    after = {nix_list(units)};
    before = [ "sysroot.mount" ];
    unitConfig.DefaultDependencies = "no";
    serviceConfig.Type = "oneshot";
    script = {nix_indented_string(script)};
  }};
""")
    for device, fs in profile.filesystems():
        if fs.format == "btrfs":
            mountpoints = [s.mountpoint for s in fs.subvolumes if s.mountpoint] + ([fs.mountpoint] if fs.mountpoint else [])
            if mountpoints:
                scrub.append(sorted(mountpoints, key=len)[0])
    configuration = ""
    if scrub:
        configuration = f"""\
  # Btrfs maintenance
  services.btrfs.autoScrub = {{
    enable = true;
    interval = "monthly";
    fileSystems = {nix_list(scrub)};
  }};
"""
    return NixFragments(configuration=configuration, impermanence="\n".join(impermanence))


def required_tools(profile: Profile) -> dict[str, str]:
    """{command: what needs it} on the target, for the guard's tools check."""
    needed = {}
    for part, node, _ in profile.walk():
        if isinstance(node, Filesystem) and node.format == "btrfs":
            needed["btrfs"] = f"btrfs subvolumes on {part.label}"
            if any(sub.swapfile for sub in node.subvolumes):
                needed.update({command: "the swapfile" for command in ("chattr", "mkswap", "swapon")})
    return needed


# --- gaps: what the root holds that its blank snapshot does not -------------------------------------


class SubvolumeAgainstBlank(FactBase):
    """
    Everything in a subvolume and in its blank snapshot, read through a read-only mount of the
    top level made for the read (and taken away after): ``{"root": [lines], "blank": [lines]}``
    in ``target.listing_command``'s format. ``btrfs subvolume find-new`` (the guide's way) needs a
    generation to compare against and misses deletions and renamed files; two listings do not.

    .. code:: python

        read(SubvolumeAgainstBlank, device="/dev/mapper/cryptroot", subvolume="@root", blank="@root-blank")
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


def written_since_boot(run: Run) -> tuple[list[Written], list[str]]:
    """(what each rolled-back subvolume holds that its blank snapshot does not, with its installed
    path; how that was found) for the gap report."""
    written, how = [], []
    for device, _fs, sub in rollback_targets(run.profile):
        found = run.read(SubvolumeAgainstBlank, device=device, subvolume=sub.path, blank=sub.blank_snapshot)
        now = parse_listing(found["root"], sub.mountpoint or "/")
        blank = parse_listing(found["blank"], sub.mountpoint or "/")
        written += [entry for path, (entry, stamp) in now.items() if blank.get(path, (None, None))[1] != stamp
                    or blank[path][0].kind != entry.kind]
        how.append(f"btrfs {sub.path} against {sub.blank_snapshot} on {device}")
    return written, how


# --- rescue -------------------------------------------------------------------------------------
# From the live system, for a machine that no longer boots: the subvolume with a blank snapshot
# (@root) back to a copy of that snapshot (@root-blank), its nested subvolumes deleted first, as
# the initrd's rollback does at boot. Nothing but that subvolume is ever touched.


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


def restore_command(top: str, subvolume: str, blank: str, unmount: tuple[str, ...] = ()) -> StringCommand:
    """The shell that puts ``subvolume`` back to a writable copy of ``blank``. It checks again,
    before deleting anything, that the blank snapshot is there, read-only and empty; unmounts
    ``unmount`` (where the old subvolume is mounted, and what is mounted below); deletes the
    nested subvolumes deepest first (a subvolume holding one cannot be deleted), then the
    subvolume; snapshots the blank."""
    refuse = 'echo "tabula: refusing to restore $sub: $1; nothing was changed" >&2; exit 1'
    script = (
        f'set -e; top={shlex.quote(top)}; sub={shlex.quote(subvolume)}; blank={shlex.quote(blank)}\n'
        f'refuse() {{ {refuse}; }}\n'
        '[ -d "$top/$blank" ] || refuse "its blank snapshot $blank is missing"\n'
        '[ "$(btrfs property get -ts "$top/$blank" ro)" = ro=true ] || refuse "its blank snapshot $blank is writable"\n'
        '[ -z "$(ls -A "$top/$blank")" ] || refuse "its blank snapshot $blank is not empty"\n'
        + "".join(f'if mountpoint -q {shlex.quote(t)}; then echo "unmounting {t}"; umount -R {shlex.quote(t)}; fi\n'
                  for t in unmount) +
        # nested: the paths below $sub/, deepest first
        'btrfs subvolume list "$top" | awk -v s="$sub/" \'{ p = $0; sub(/^.* path /, "", p); '
        'if (index(p, s) == 1) print gsub("/", "/", p) "\\t" p }\' | sort -rn | cut -f2- |\n'
        'while IFS= read -r p; do echo "deleting nested subvolume $p"; btrfs subvolume delete "$top/$p" >/dev/null || exit 1; done\n'
        'if [ -e "$top/$sub" ]; then echo "deleting $sub"; btrfs subvolume delete "$top/$sub" >/dev/null; fi\n'
        'echo "restoring $sub from $blank"; btrfs subvolume snapshot "$top/$blank" "$top/$sub" >/dev/null\n'
    )
    return StringCommand("sh", "-c", QuoteString(script))


@operation()
def restored(run: Run, top: str, subvolume: Subvolume, device: str, mountpoints: tuple[str, ...] = ()):
    """
    Put a subvolume with a blank snapshot back to a copy of it: nested subvolumes deleted, the
    subvolume deleted and snapshotted again from the read-only blank (the initrd's rollback).
    Refused when the blank snapshot is missing, writable or not empty. Nothing to do when the
    subvolume holds no nested subvolume and nothing but the install's footprint (its mount
    points and etc/nixos).

    + run: the run (facts, what it made)
    + top: where the filesystem's top level is mounted (``top_level``)
    + subvolume: the profile's Subvolume (with ``blank_snapshot``)
    + device: the filesystem's block device
    + mountpoints: every mount point of the installed system (for the footprint)

    **Example:**

    .. code:: python

        btrfs.restored(run, top="/run/tabula/btrfs/nixos", subvolume=Subvolume(path="@root", mountpoint="/",
                       blank_snapshot="@root-blank"), device="/dev/mapper/cryptroot", mountpoints=("/", "/nix"))
    """
    sub, blank_name = subvolume.path, subvolume.blank_snapshot
    mounts = run.read(Mounts)
    if top not in mounts:
        if run.executing:
            raise TabulaError(f"the top level of {device} is not mounted at {top}: cannot restore {sub}")
        # Planning with the container still closed: nothing to read yet; the command checks again.
        run.tell(f"{sub} on {device}: read once {device} is open; if it holds more than "
                    f"the install left, its nested subvolumes and {sub} are deleted and {sub} restored from "
                    f"{blank_name} (refused if {blank_name} is missing, writable or not empty)")
        run.record_created(Made.subvolume(device, sub))
        yield restore_command(top, sub, blank_name)
        return
    folders, config = install_footprint(subvolume.mountpoint or "/", list(mountpoints))
    path = f"{top}/{sub}"
    existing, leftovers = run.read_many([(BtrfsSubvolumes, {"path": top}),
                                     (BtrfsRootLeftovers, {"path": path, "folders": folders, "config": config})])
    blank = existing.get(blank_name)
    if blank is None:
        raise TabulaError(f"refusing to restore {sub} on {device}: its blank snapshot {blank_name} is missing, so "
                          "there is no empty state to restore; nothing was changed")
    if not blank["ro"]:
        raise TabulaError(f"refusing to restore {sub} on {device}: its blank snapshot {blank_name} is writable, so "
                          f"it may not be blank any more; nothing was changed. Check it (ls -A {top}/{blank_name}), "
                          f"then set it read-only: btrfs property set -ts {top}/{blank_name} ro true")
    if not blank["empty"]:
        raise TabulaError(f"refusing to restore {sub} on {device}: its blank snapshot {blank_name} is not empty; "
                          "nothing was changed")
    nested = sorted(p for p in existing if p.startswith(f"{sub}/"))
    current = existing.get(sub)
    if current is not None and not current["ro"] and not nested and leftovers == []:
        run.noop(f"{sub} holds no nested subvolume and nothing but the install's mount points"
                  + (f" and {config}" if config else "") + f": as restored from {blank_name}")
        return
    found = []
    if current is None:
        found.append(f"{sub} is missing")
    elif current["ro"]:
        found.append(f"{sub} is read-only")
    if nested:
        found.append(f"nested subvolumes {', '.join(nested)}")
    if leftovers:
        found.append(f"{sub} holds {describe_leftovers(leftovers)}")
    run.tell(f"{sub} on {device}: {'; '.join(found)}: restoring it from {blank_name}")
    # Where the old subvolume is mounted (the install tree under /mnt) goes first.
    target = install_path(subvolume.mountpoint) if subvolume.mountpoint else None
    mounted = mounts.get(target) if target else None
    unmount = (target,) if mounted and mounted["fstype"] == "btrfs" and subvolume_option(mounted["options"]) == sub else ()
    run.record_created(Made.subvolume(device, sub))     # a copy of the blank: empty
    yield restore_command(top, sub, blank_name, unmount)


def rescue(run: Run) -> None:
    """The top level mounted, each subvolume with a blank snapshot restored from it."""
    mountpoints = tuple(m.mountpoint for m in run.profile.all_mounts())
    for device, fs in _btrfs_filesystems(run.profile):
        targets = [sub for sub in fs.subvolumes if sub.blank_snapshot]
        if not targets:
            continue
        top = top_level_path(device, fs)
        first = next((s for s in fs.subvolumes if s.mountpoint), None)
        options = tuple(o for o in (first.mount_options if first else ()) if not o.startswith(("subvol", "ro")))
        name = top.rsplit("/", 1)[-1]          # the filesystem's label (or its device's name)
        top_level(run, device=device, path=top, options=options, name=f"Btrfs top level {name}")
        for sub in targets:
            restored(run, top=top, subvolume=sub, device=device, mountpoints=mountpoints,
                     name=f"Btrfs restore {sub.path} from {sub.blank_snapshot}")


# --- checks -------------------------------------------------------------------------------------


def checks(host, settings: Settings, root: str) -> list[str]:
    """Each btrfs filesystem's subvolumes (top-level, writable), each blank snapshot (read-only,
    empty, and a snapshot of its subvolume: its parent, or on a booted system, the parent of the
    subvolume restored from it), and each swapfile (NOCOW, its size, mode 0600, a swap signature;
    whether it is active is the mounts layer's, which renders swapDevices). One line per mismatch.

    The subvolumes are read from the top level the install keeps mounted; where it is not (the
    booted system) the top level is mounted read-only for the read, then unmounted.

    + host: a testinfra host (``read_fact`` runs this layer's facts through it)
    """
    failures = []
    for device, fs in _btrfs_filesystems(settings.profile):
        subvolumes, problem = _read_subvolumes(host, device, fs)
        if problem:
            failures.append(problem)
            continue
        for sub in fs.subvolumes:
            have = subvolumes.get(sub.path)
            if have is None:
                failures.append(f"{device}: subvolume {sub.path} missing")
                continue
            if have["top_level"] != 5:
                failures.append(f"{device}: subvolume {sub.path} is nested (top level {have['top_level']}), not top-level")
            if have["ro"]:
                failures.append(f"{device}: subvolume {sub.path} is read-only")
            if sub.blank_snapshot:
                failures += _blank_problems(device, sub, have, subvolumes.get(sub.blank_snapshot))
    for _, fs in _btrfs_filesystems(settings.profile):
        for sub in fs.subvolumes:
            if sub.swapfile and sub.mountpoint:
                failures += _swapfile_problems(host, under(root, sub.swapfile_path), sub.swapfile)
    return failures


def _read_subvolumes(host, device: str, fs: Filesystem) -> tuple[dict, str | None]:
    subvolumes = read_fact(host, BtrfsSubvolumes, path=top_level_path(device, fs))
    if subvolumes:
        return subvolumes, None
    top = host.check_output("mktemp -d /run/tabula-verify.XXXXXX")
    try:
        mounted = host.run(f"mount -o subvolid=5,ro {shlex.quote(device)} {top}")
        if mounted.rc != 0:
            return {}, f"{device}: cannot mount its btrfs top level to read the subvolumes: {mounted.stderr.strip()}"
        try:
            return read_fact(host, BtrfsSubvolumes, path=top), None
        finally:
            host.run(f"umount {top}")
    finally:
        host.run(f"rmdir {top}")


def _blank_problems(device: str, sub: Subvolume, have: dict, blank: dict | None) -> list[str]:
    name = sub.blank_snapshot
    if blank is None:
        return [f"{device}: blank snapshot {name} missing"]
    problems = []
    if not blank["ro"]:
        problems.append(f"{device}: blank snapshot {name} is writable")
    if not blank["empty"]:
        problems.append(f"{device}: blank snapshot {name} is not empty")
    # Made from the empty subvolume at install time; at every boot the subvolume is restored from it.
    if blank["parent_uuid"] != have["uuid"] and have["parent_uuid"] != blank["uuid"]:
        problems.append(f"{device}: {name} is not a snapshot of {sub.path} (its parent {blank['parent_uuid']}, "
                        f"{sub.path} is {have['uuid']}) nor is {sub.path} restored from it")
    return problems


def _swapfile_problems(host, path: str, swapfile: Swapfile) -> list[str]:
    state = read_fact(host, SwapfileState, path=path)
    if state is None:
        return [f"{path}: missing"]
    problems = []
    if state["type"] != "regular file":
        problems.append(f"{path}: a {state['type']}, not a regular file")
    if state["size"] != swapfile.size_bytes:
        problems.append(f"{path}: {state['size']} bytes, the profile wants {swapfile.size} ({swapfile.size_bytes} bytes)")
    if not state["nocow"]:
        problems.append(f"{path}: copy-on-write is not disabled (chattr +C)")
    if not state["swap"]:
        problems.append(f"{path}: no swap signature")
    mode = host.run(f"stat -c %a {shlex.quote(path)}").stdout.strip()     # (PathsState would hash the whole file)
    if mode != "600":
        problems.append(f"{path}: mode {mode}, not 600")
    return problems
