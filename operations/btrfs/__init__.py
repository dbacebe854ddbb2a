"""
The btrfs layer: subvolumes, the blank snapshot the root rolls back to, swapfiles, and the
initrd service that restores the root at every boot.

Subvolume facts need the filesystem mounted, so its top level (subvolid=5) stays mounted at a
private path, /run/tabula/btrfs/<label>, for the whole install (and re-runs). pyinfra 3 evaluates
operations again at execution, so on blank disks the plan (--dry) shows every create and the run
sees the filesystem made by the earlier stages.

    facts.py        what it reads (subvolumes, a swapfile, leftovers, a subvolume beside its blank)
    subvolumes.py   the top level and the subvolumes (the blank snapshot taken right after creation)
    rollback.py     the blank snapshot's rule, and the restore the initrd and the rescue both run
    swapfile.py     the swapfile and its rule
    rescue.py       the rescue's restore of the root
"""

from __future__ import annotations

import shlex

from pyinfra import logger

from operations.btrfs.facts import (BtrfsRootLeftovers, BtrfsSubvolumes, BtrfsTopLevelSubvolumes, SubvolumeAgainstBlank,
                                    SwapfileResumeOffset, SwapfileState, parse_resume_offset, parse_root_leftovers,
                                    parse_subvolume_list, parse_swapfile_state, top_level_path)
from operations.btrfs.rescue import restored
from operations.btrfs.rollback import (ROLLBACK_MOUNTDIR, BlankProblem, blank_problems, restore_command, restore_lines,
                                       rollback_script)
from operations.btrfs.subvolumes import subvolumes, top_level
from operations.btrfs.swapfile import swapfile, swapfile_commands, swapfile_problems
from operations.adoptlit import EPHEMERAL_ROOTS, size_text
from operations.adoptlit import mounted_at as mount_fields
from operations.contract import Layer, Target
from operations.diskolit import Script, bind_hooks, disko_size, mounted, new_flag
from operations.filesystems import formatted_node
from operations.mounts import Mounts
from operations.nixlit import HIBERNATE_RESUME, DeviceIds, NixFragments, device_units, nix_attr, nix_indented_string, nix_list, nix_string
from operations.profile import Filesystem, Profile, Subvolume
from operations.run import FactRequest, Run
from operations.target import CanonicalPath, Written, install_path, parse_listing, under

__all__ = ["BtrfsRootLeftovers", "BtrfsSubvolumes", "BtrfsTopLevelSubvolumes", "SubvolumeAgainstBlank", "SwapfileState",
           "SwapfileResumeOffset", "parse_resume_offset", "RESUME_OFFSET", "resume_swapfile",
           "parse_root_leftovers", "parse_subvolume_list", "parse_swapfile_state", "top_level_path", "restored",
           "ROLLBACK_MOUNTDIR", "BlankProblem", "blank_problems", "restore_command", "restore_lines", "rollback_script",
           "subvolumes", "top_level", "swapfile", "swapfile_commands", "swapfile_problems", "LAYER"]


def btrfs_filesystems(profile: Profile) -> list[tuple[str, Filesystem]]:
    """(device, filesystem) of every btrfs with subvolumes."""
    return [(device, fs) for device, fs in profile.filesystems() if fs.format == "btrfs" and fs.subvolumes]


def rollback_targets(profile: Profile) -> list[tuple[str, Filesystem, Subvolume]]:
    """(device, filesystem, subvolume) of every subvolume with a blank snapshot."""
    return [(device, fs, sub) for device, fs in profile.filesystems() for sub in fs.subvolumes if sub.blank_snapshot]


def top_level_options(fs: Filesystem) -> tuple[str, ...]:
    """The filesystem-wide options of its first mounted subvolume: btrfs applies those of the
    first mount of a filesystem to all its later subvolume mounts, so the top level carries them."""
    first = next((s for s in fs.subvolumes if s.mountpoint), None)
    return tuple(o for o in (first.mount_options if first else ()) if not o.startswith(("subvol", "ro")))


def swapfile_paths(profile: Profile) -> list[tuple[str, Subvolume]]:
    """(the swapfile under /mnt, its subvolume) of every swapfile."""
    return [(f"{install_path(sub.mountpoint)}/swapfile", sub) for _, fs in btrfs_filesystems(profile)
            for sub in fs.subvolumes if sub.swapfile and sub.mountpoint]


def top_level_notes(profile: Profile) -> list[str]:
    """What a run that made (or rescued) the subvolumes leaves mounted outside /mnt, and the
    commands that close the disks after it (the guide's own end of install, ``umount -R /mnt``
    then ``cryptsetup close``, stops at "still in use" without the middle one)."""
    notes = []
    for device, fs in btrfs_filesystems(profile):
        top = top_level_path(device, fs)
        mapper = device.removeprefix("/dev/mapper/") if device.startswith("/dev/mapper/") else None
        close = f"umount -R /mnt; umount {top}" + (f"; cryptsetup close {mapper}" if mapper else "")
        notes.append(f"the top level of {device} stays mounted at {top} (the next run reads its subvolumes "
                     f"there); to close the disks after this run: {close}")
    return notes


def adopt_top(found, device: str) -> str:
    """Where the top level of a btrfs is mounted whole (Tabula's private path), else a path
    never mounted (the fact then mounts it read-only for the read)."""
    return next((mp for mp, m in sorted(found.mounts.items()) if found.real(m["device"]) == device
                 and m["fstype"] == "btrfs" and m["root"] == "/"), "/nonexistent")


def blank_snapshots(top: dict[str, dict]) -> dict[str, str]:
    """{subvolume: its blank snapshot} among top-level subvolumes (BtrfsSubvolumes' form): an
    empty read-only snapshot of it (its parent_uuid is the subvolume's), or, on a booted system
    whose root was restored from the snapshot, the empty read-only subvolume it is a snapshot of."""
    by_uuid = {sub["uuid"]: path for path, sub in top.items() if sub.get("uuid")}
    found = {}
    # (empty: a read-only snapshot holding data is a backup; rolling back to it would be wrong)
    for path, sub in top.items():
        origin = by_uuid.get(sub["parent_uuid"])
        if sub["ro"] and sub["empty"] and origin and not top[origin]["ro"]:
            found[origin] = path
    for path, sub in top.items():
        origin = by_uuid.get(sub["parent_uuid"])
        if (not sub["ro"] and path not in found and origin and top[origin]["ro"] and top[origin]["empty"]
                and origin not in found.values()):
            found[path] = origin
    return found


class BtrfsLayer(Layer):
    name = "btrfs"
    absent = "no btrfs subvolumes"

    def make(self, run: Run) -> None:
        for device, fs in btrfs_filesystems(run.profile):
            top = top_level_path(device, fs)
            name = top.rsplit("/", 1)[-1]          # the filesystem's label (or its device's name)
            top_level(run, device=device, path=top, options=top_level_options(fs), name=f"Btrfs top level {name}")
            subvolumes(run, top=top, wanted=list(fs.subvolumes), device=device, name=f"Btrfs subvolumes {name}")

    def fill(self, run: Run) -> None:
        """Swapfiles, once their subvolume is mounted."""
        for path, sub in swapfile_paths(run.profile):
            swapfile(run, path=path, swapfile=sub.swapfile, name=f"Btrfs swapfile {path}")

    def close(self, run: Run) -> None:
        """Says where the top level stays mounted and how to close the disks (the next run and the
        rescue read the subvolumes there; unmounting it would make every converged run mount it again)."""
        for line in top_level_notes(run.profile):
            logger.info(f"{run.prefix}{line}")

    def rescue(self, run: Run) -> None:
        """The top level mounted, each subvolume with a blank snapshot restored from it."""
        mountpoints = tuple(m.mountpoint for m in run.profile.all_mounts())
        for device, fs in btrfs_filesystems(run.profile):
            targets = [sub for sub in fs.subvolumes if sub.blank_snapshot]
            if not targets:
                continue
            top = top_level_path(device, fs)
            name = top.rsplit("/", 1)[-1]
            top_level(run, device=device, path=top, options=top_level_options(fs), name=f"Btrfs top level {name}")
            for sub in targets:
                restored(run, top=top, subvolume=sub, device=device, mountpoints=mountpoints,
                         name=f"Btrfs restore {sub.path} from {sub.blank_snapshot}")

    def adopt_reads(self, found) -> list[FactRequest]:
        """The subvolumes of every btrfs (through a top level mounted whole, else a read-only
        mount made for the read) and a swapfile in each mounted subvolume."""
        reads: list[FactRequest] = []
        for device in sorted({d["name"] for d in found.devices if d["fstype"] == "btrfs"}):
            reads.append((BtrfsTopLevelSubvolumes, {"device": device, "path": adopt_top(found, device)}))
        reads += [(SwapfileState, {"path": f"{found.root.rstrip('/')}{mp.rstrip('/')}/swapfile"})
                  for mp, m in sorted(found.installed_mounts().items()) if m["fstype"] == "btrfs"]
        return reads

    def adopt(self, found, draft) -> None:
        """Each btrfs filesystem's top-level subvolumes with where they are mounted, each one's
        blank snapshot (a read-only snapshot of it, or on a booted system the one it was restored
        from), a swapfile in a mounted one. A root subvolume without a blank snapshot is refused."""
        for device in draft.adopted_devices():
            node = draft.contents.get(device)
            if not node or node.get("format") != "btrfs":
                continue
            seen = found.fact(BtrfsTopLevelSubvolumes, device=device, path=adopt_top(found, device))
            if "unmountable" in seen:
                draft.refuse(device, f"its btrfs top level cannot be mounted to read the subvolumes: {seen['unmountable']}")
                continue
            nested = sorted(path for path in seen if "/" in path)
            if nested:
                draft.infer(f"{device}: nested subvolumes left out (a profile describes top-level ones): {', '.join(nested)}")
            top = {path: sub for path, sub in seen.items() if "/" not in path}
            blanks = blank_snapshots(top)
            mounts = found.mounts_of(device)
            subvolumes = []
            for path, sub in top.items():
                if sub["ro"]:
                    if path not in blanks.values():
                        draft.infer(f"{device}: read-only subvolume {path} left out (not a blank snapshot)")
                    continue
                entry: dict = {"path": path}
                mounted_at = sorted(mp for mp, m in mounts.items() if m["root"].lstrip("/") == path)
                if mounted_at:
                    entry.update(mount_fields(mounted_at[0], mounts[mounted_at[0]]["options"]))
                    swap = found.fact(SwapfileState, path=f"{found.root.rstrip('/')}{mounted_at[0].rstrip('/')}/swapfile")
                    if swap and swap["swap"]:
                        entry["swapfile"] = {"size": size_text(swap["size"])}
                if path in blanks:
                    entry["blank_snapshot"] = blanks[path]
                elif mounted_at[:1] == ["/"]:
                    draft.refuse(device, f"subvolume {path} is the root and has no blank snapshot: nothing rolls "
                                         f"it back at boot (an ephemeral root is {EPHEMERAL_ROOTS})")
                subvolumes.append(entry)
            node["subvolumes"] = subvolumes

    def applies(self, profile: Profile) -> bool:
        return bool(btrfs_filesystems(profile))

    def owns(self, node) -> bool:
        return isinstance(node, Filesystem) and node.format == "btrfs"

    def tools(self, profile: Profile) -> dict[str, str]:
        needed = {}
        for part, node, _ in profile.walk():
            if isinstance(node, Filesystem) and node.format == "btrfs":
                needed["btrfs"] = f"btrfs subvolumes on {part.label}"
                if any(sub.swapfile for sub in node.subvolumes):
                    needed.update({command: "the swapfile" for command in ("chattr", "mkswap", "swapon")})
        return needed

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        return {}

    def observe(self, run: Run) -> list[FactRequest]:
        current = run.read(Mounts)
        reads: list[FactRequest] = []
        for device, fs in btrfs_filesystems(run.profile):
            top = top_level_path(device, fs)
            mounted_from = current.get(top, {}).get("device", device)
            reads += [(CanonicalPath, {"path": device}), (CanonicalPath, {"path": mounted_from}),
                      (BtrfsSubvolumes, {"path": top})]
        reads += [(SwapfileState, {"path": path}) for path, _ in swapfile_paths(run.profile)]
        return reads

    def problems(self, target: Target) -> list[str]:
        """Each btrfs filesystem's subvolumes (top-level, writable), each blank snapshot (read-only,
        empty, and a snapshot of its subvolume: its parent, or on a booted system, the parent of
        the subvolume restored from it), and each swapfile (NOCOW, its size, mode 0600, a swap
        signature; whether it is active is the mounts layer's, which renders swapDevices). The
        subvolumes are read from the top level the install keeps mounted, or else through a
        read-only mount of it made for the read."""
        failures = []
        profile = target.settings.profile
        for device, fs in btrfs_filesystems(profile):
            found = target.read(BtrfsTopLevelSubvolumes, device=device, path=top_level_path(device, fs))
            if "unmountable" in found:
                failures.append(f"{device}: cannot mount its btrfs top level to read the subvolumes: "
                                f"{found['unmountable']}")
                continue
            for sub in fs.subvolumes:
                have = found.get(sub.path)
                if have is None:
                    failures.append(f"{device}: subvolume {sub.path} missing")
                    continue
                if have["top_level"] != 5:
                    failures.append(f"{device}: subvolume {sub.path} is nested (top level {have['top_level']}), "
                                    "not top-level")
                if have["ro"]:
                    failures.append(f"{device}: subvolume {sub.path} is read-only")
                if sub.blank_snapshot:
                    failures += _blank_lines(device, sub, have, found.get(sub.blank_snapshot))
        for _, sub in swapfile_paths(profile):
            path = under(target.root, sub.swapfile_path)
            state = target.read(SwapfileState, path=path)
            if state is None:
                failures.append(f"{path}: missing")
                continue
            failures += [f"{path}: {problem}" for problem in swapfile_problems(sub.swapfile, state)]
            if state["mode"] != "600":
                failures.append(f"{path}: mode {state['mode']}, not 600")
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        return nix_fragments(profile, devices)

    def nix_reads(self, profile: Profile, root: str) -> dict[str, FactRequest]:
        """With hibernation: the resume swapfile's offset."""
        resume = resume_swapfile(profile)
        return {RESUME_OFFSET: (SwapfileResumeOffset, {"path": under(root, resume[1].swapfile_path)})} if resume else {}

    def gaps(self, run: Run, root: str) -> tuple[list[Written], list[str]]:
        """What each rolled-back subvolume holds that its blank snapshot does not, with its
        installed path (both listed through a read-only mount of the top level made for the read)."""
        written, how = [], []
        for device, _fs, sub in rollback_targets(run.profile):
            found = run.read(SubvolumeAgainstBlank, device=device, subvolume=sub.path, blank=sub.blank_snapshot)
            now = parse_listing(found["root"], sub.mountpoint or "/")
            blank = parse_listing(found["blank"], sub.mountpoint or "/")
            written += [entry for path, (entry, stamp) in now.items() if blank.get(path, (None, None))[1] != stamp
                        or blank[path][0].kind != entry.kind]
            how.append(f"btrfs {sub.path} against {sub.blank_snapshot} on {device}")
        return written, how

    def disko(self, profile: Profile, context) -> dict:
        return {}

    def disko_node(self, node: Filesystem, device: str, part, context) -> dict | None:
        made = formatted_node({"type": "btrfs"}, node)
        made["subvolumes"] = {sub.path: _subvolume_node(sub) for sub in node.subvolumes}
        made.update(_blank_snapshot_hooks(device, [s for s in node.subvolumes if s.blank_snapshot]))
        mountpoints = [m for m in [node.mountpoint, *(s.mountpoint for s in node.subvolumes)] if m]
        made.update(bind_hooks(context.profile, mountpoints))
        return made


def nix_fragments(profile: Profile, devices: DeviceIds) -> NixFragments:
    """configuration.nix: monthly scrub of each btrfs; impermanence.nix: the initrd service that
    restores each subvolume with a blank snapshot (the guide's @root from @root-blank)."""
    impermanence, scrub = [], []
    targets = rollback_targets(profile)
    for index, (device, fs, sub) in enumerate(targets):
        path = devices.path(device)
        units = device_units(path)
        service = "rollback" if len(targets) == 1 else f"rollback-{index + 1}"
        script = rollback_script(path, sub.path, sub.blank_snapshot)
        impermanence.append(f"""\
  # Rollback service: {sub.path} is restored from {sub.blank_snapshot} at every boot, after the
  # device is opened and before the root is mounted (systemd stage 1); after the initrd has tried
  # to resume from hibernation too, so a resumed system keeps the root it hibernated with.
  boot.initrd.systemd.services.{nix_attr(service)} = {{
    description = {nix_string(f"Rollback btrfs subvolume {sub.path} to {sub.blank_snapshot}")};
    wantedBy = [ "initrd.target" ];
    requires = {nix_list(units[-1:])};
    after = {nix_list([*units, HIBERNATE_RESUME])};
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
    return NixFragments(configuration=configuration + resume_configuration(profile, devices),
                        impermanence="\n".join(impermanence))


RESUME_OFFSET = "btrfs resume offset"       # the key of the swapfile's offset in ``nix_reads``


def resume_swapfile(profile: Profile) -> tuple[str, Subvolume] | None:
    """(the device of its btrfs, the subvolume) of the swapfile a hibernated system resumes from."""
    found = profile.resume_swap() if profile.nixos.hibernate else None
    return (found[0], found[1]) if found and found[1] is not None else None


def resume_configuration(profile: Profile, devices: DeviceIds) -> str:
    """configuration.nix: resume from the swapfile, at its physical offset on the filesystem's
    device (read from the real file: placeholder 0 while it does not exist)."""
    resume = resume_swapfile(profile)
    if resume is None:
        return ""
    device, sub = resume
    offset = devices.fact(RESUME_OFFSET, f"{sub.swapfile_path}: no resume offset yet (the swapfile does not exist)")
    note = ("  # (0: a placeholder, the swapfile does not exist yet; the install writes its real offset)\n"
            if offset is None else "")
    return f"""\
  # Hibernation: resume from the swapfile {sub.swapfile_path}, at its physical offset on its
  # filesystem's device (btrfs inspect-internal map-swapfile -r {sub.swapfile_path}).
  boot.resumeDevice = {nix_string(devices.path(device))};
{note}  boot.kernelParams = [ {nix_string(f"resume_offset={offset or 0}")} ];
"""



def _blank_lines(device: str, sub: Subvolume, have: dict, blank: dict | None) -> list[str]:
    """Verify's lines for a blank snapshot: the rule (``blank_problems``), and its lineage: made
    from the empty subvolume at install time, and at every boot the subvolume restored from it."""
    name = sub.blank_snapshot
    lines = [f"{device}: blank snapshot {name} {'missing' if problem is BlankProblem.MISSING else 'is ' + problem.said}"
             for problem in blank_problems(blank)]
    if blank is not None and blank["parent_uuid"] != have["uuid"] and have["parent_uuid"] != blank["uuid"]:
        lines.append(f"{device}: {name} is not a snapshot of {sub.path} (its parent {blank['parent_uuid']}, "
                     f"{sub.path} is {have['uuid']}) nor is {sub.path} restored from it")
    return lines


def _subvolume_node(sub: Subvolume) -> dict:
    node = mounted(sub.mountpoint, sub.mount_options)
    if sub.swapfile:
        # the swapfile in its subvolume (disko: btrfs filesystem mkswapfile at format time)
        node["swap"] = {"swapfile": {"size": disko_size(sub.swapfile.size_bytes)}}
    return node


def _blank_snapshot_hooks(device: str, subs: list[Subvolume]) -> dict:
    """@root-blank the Tabula way: read-only, taken only right after the subvolume was created
    (the preCreateHook notes which exist; both hooks run in the create step's subshell)."""
    if not subs:
        return {}
    dev = shlex.quote(device)
    pre = [*(f"{new_flag(s.path)}=1" for s in subs),
           f"if blkid -o export {dev} | grep -q '^TYPE=btrfs$'; then",
           '  top=$(mktemp -d)',
           f'  mount {dev} "$top" -o subvol=/',
           *(f'  if btrfs subvolume show "$top"/{shlex.quote(s.path)} >/dev/null 2>&1; then {new_flag(s.path)}=0; fi'
             for s in subs),
           '  umount "$top"; rmdir "$top"',
           "fi"]
    post = ['top=$(mktemp -d)', f'mount {dev} "$top" -o subvol=/']
    for s in subs:
        post += [f'if [ "${new_flag(s.path)}" = 1 ]; then',
                 f'  btrfs subvolume snapshot -r "$top"/{shlex.quote(s.path)} "$top"/{shlex.quote(s.blank_snapshot)}',
                 "fi"]
    post += ['umount "$top"; rmdir "$top"']
    return {"preCreateHook": Script("\n".join(pre)), "postCreateHook": Script("\n".join(post))}


LAYER = BtrfsLayer()
