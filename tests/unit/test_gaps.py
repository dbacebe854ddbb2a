"""The gap report: from what the layers list on the ephemeral root, what is lost at the next boot,
grouped by directory, with the profile vars that keep it. The listings come from a real shell
(find's output, parsed as the fact parses it) and from zfs diff output captured in the VM."""
import json
import os
import subprocess

from operations import gaps, mounts, zfs
from operations.profile import load_profile
from operations.settings import Settings
from operations.target import Written, listing_command, parse_listing
from tests.unit.pyinfra_fake import fake_run, fixture_lines

NVME = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"


def zephyrus(**variables):
    return load_profile("zephyrus-btrfs", {"disk": NVME, **variables})


def listed(tmp_path, prefix="/") -> list[Written]:
    out = subprocess.run(["sh", "-c", listing_command(), "list", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    return [entry for entry, _ in parse_listing(out.splitlines(), prefix).values()]


def write(root, relative, text="x"):
    path = root / relative.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_only_what_nothing_keeps_is_reported_grouped_by_directory(tmp_path):
    profile = zephyrus()
    for lost in ("/var/lib/gaptest/db.sqlite", "/var/lib/gaptest/cache/blob", "/etc/gaptest.conf", "/root/.bash_history"):
        write(tmp_path, lost)
    for kept in ("/etc/ssh/ssh_host_extra_key", "/var/lib/nixos/uid-map", "/etc/machine-id", "/var/log/boot.log",
                 "/home/sean/notes", "/persist/etc/x", "/etc/nixos/flake.nix"):
        write(tmp_path, kept)         # persisted, or under a mount of the profile
    (tmp_path / "etc").mkdir(exist_ok=True)
    os.symlink("/etc/static/hosts", tmp_path / "etc/hosts")          # NixOS links /etc into the store
    write(tmp_path, "/etc/NIXOS", "")
    write(tmp_path, "/tmp/scratch")
    (tmp_path / "boot").mkdir()                                      # a mount point
    (tmp_path / "srv/empty").mkdir(parents=True)                     # an empty folder is state too

    groups = gaps.grouped(gaps.uncovered(listed(tmp_path), profile))
    assert [(g.path, g.kind, len(g.entries)) for g in groups] == [
        ("/etc/gaptest.conf", "file", 1), ("/root/.bash_history", "file", 1), ("/srv/empty", "directory", 1),
        ("/var/lib/gaptest", "directory", 2)]       # db.sqlite and cache/blob (a folder with entries is not listed)


def test_the_report_names_the_vars_and_the_persistence_entries():
    profile = zephyrus(persist_directories=["/var/lib/docker"])
    entries = [Written("/var/lib/gaptest/db", "file"), Written("/etc/gaptest.conf", "file")]
    text = gaps.report(gaps.grouped(entries), profile, "/mnt", ["btrfs @root against @root-blank"])
    assert "/var/lib/gaptest/  1 entry: db" in text and "/etc/gaptest.conf  file" in text
    # the vars keep what they held, and get the new paths
    assert 'persist_directories: ["/var/lib/docker", "/var/lib/gaptest"]' in text
    assert 'persist_files: ["/etc/gaptest.conf"]' in text
    assert 'environment.persistence."/persist".directories = [ "/var/lib/gaptest" ];' in text
    # and the vars do what the report says: the paths join the persistence lists
    fixed = zephyrus(persist_directories=["/var/lib/docker", "/var/lib/gaptest"], persist_files=["/etc/gaptest.conf"])
    assert gaps.uncovered(entries, fixed) == []


def test_nothing_lost_says_so():
    text = gaps.report([], zephyrus(), "/", ["btrfs @root against @root-blank"])
    assert "nothing" in text and "persist_directories" not in text


def test_zfs_diff_paths_become_installed_paths(monkeypatch):
    profile = load_profile("zfs-raidz1", {"ssd": "/dev/disk/by-id/s", "rz1": "/dev/disk/by-id/1", "rz2": "/dev/disk/by-id/2",
                                          "rz3": "/dev/disk/by-id/3", "hostname": "nas",
                                          "authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk2bQ6mJ3U1qvC0pP8uQ9lE7Xw4Zr2dF5sT1aB6cN0m a@b"]})
    pool = profile.pools["rpool"].name
    diff = zfs.parse_snapshot_diff(["M\t/\t/mnt/", "+\tF\t/mnt/var/lib/app/db", "-\tF\t/mnt/gone",
                                    "R\tF\t/mnt/a\t/mnt/b\\040c", "+\t@\t/mnt/etc/hosts"])
    mounts_now = {"/mnt": {"device": f"{pool}/temp/root", "fstype": "zfs", "options": []},
                  "/mnt/tmp": {"device": f"{pool}/temp/tmp", "fstype": "zfs", "options": []}}
    run = fake_run({(zfs.SnapshotDiff, frozenset({("dataset", f"{pool}/temp/root"), ("snapshot", "empty")})): diff,
                    mounts.Mounts: mounts_now}, Settings.of(profile))
    written, how = zfs.LAYER.gaps(run, "/mnt")
    assert [(w.path, w.kind) for w in written] == [("/var/lib/app/db", "file"), ("/b c", "file"), ("/etc/hosts", "link")]
    assert how == [f"zfs diff {pool}/temp/root@empty", f"zfs diff {pool}/temp/tmp@empty"]


def test_names_with_a_line_break_or_a_quote_are_reported_exactly(tmp_path):
    """A name may hold a line break or a quote: the listing keeps it whole (find's NUL-ended
    entries, escaped as /proc/mounts does), the report shows it escaped on its line, and the
    suggested vars are JSON that gives back the exact paths (and the Nix line, a Nix string)."""
    profile = zephyrus()
    odd = ["/etc/new\nline", '/etc/${builtins.abort "x"}', "/etc/back\\slash"]
    for name in odd:
        write(tmp_path, name)
    os.symlink("target\nwith a break", tmp_path / "etc/link")
    entries = listed(tmp_path)
    assert sorted(e.path for e in entries if e.path != "/etc") == sorted([*odd, "/etc/link"])
    assert [e.link for e in entries if e.path == "/etc/link"] == ["target\nwith a break"]
    text = gaps.report(gaps.grouped(gaps.uncovered(entries, profile)), profile, "/mnt", ["a tmpfs root"])
    lines = text.splitlines()
    shown = [line.strip().rsplit(None, 1) for line in lines if line.startswith("    /")]
    assert ["/etc/new\\nline", "file"] in shown and ['/etc/${builtins.abort "x"}', "file"] in shown
    assert ["/etc/back\\\\slash", "file"] in shown
    suggested = next(line for line in lines if line.startswith("    persist_files: "))
    assert json.loads(suggested.removeprefix("    persist_files: ")) == sorted([*odd, "/etc/link"])
    nix = next(line for line in lines if "environment.persistence" in line and ".files" in line)
    assert '"/etc/new\\nline"' in nix and '"/etc/\\${builtins.abort \\"x\\"}"' in nix
    # pasted back as --data tabula_vars, the paths are the report's, and nothing is left
    fixed = zephyrus(persist_files=json.loads(suggested.removeprefix("    persist_files: ")))
    assert gaps.uncovered(entries, fixed) == []
