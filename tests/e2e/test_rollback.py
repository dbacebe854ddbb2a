"""The initrd's root rollback, and the rescue of a root that no longer boots (rescue.py), run on
the real btrfs-on-LUKS disk of the live VM: each test starts from zephyrus-btrfs as Tabula installed
it (its installed state, tests/e2e/states.py), whatever the test before it did.

The script is taken from the rendered impermanence.nix (evaluated with nix-instantiate on the
controller, the guest has no Nix): exactly the text the initrd service will run, run the way
NixOS runs a service script (bash -e).
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from operations import btrfs
from tests.e2e.faults import dry_plan
from tests.e2e.helpers import assert_no_changes, operation_commands, run_with_secrets

TOP = "/run/tabula-test-top"


@pytest.fixture
def btrfs_installed(installed):
    """zephyrus-btrfs installed (nixos-install: the stand-in), as its state left it, for each test."""
    return installed("zephyrus-btrfs")


def run(run_pyinfra, state, args, *flags):
    return run_with_secrets(run_pyinfra, args, state.secrets, *flags)


def deploy_args(state) -> list[str]:
    return state.args()


def rescue_args(state) -> list[str]:
    return state.args(deploy="rescue.py")


def rollback_script_from_config(livevm, tmp_path) -> str:
    text = livevm.run("cat /mnt/etc/nixos/impermanence.nix").stdout
    (tmp_path / "impermanence.nix").write_text(text)
    expr = ('(import ./impermanence.nix { config = {}; lib = {}; pkgs = {}; })'
            '.boot.initrd.systemd.services.rollback.script')
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def subvolumes(livevm) -> dict[str, str]:
    livevm.run(f"mkdir -p {TOP} && (mountpoint -q {TOP} || mount -o subvol=/ /dev/mapper/cryptroot {TOP})")
    lines = livevm.run(f"btrfs subvolume list {TOP}").stdout.splitlines()
    found = {line.split(" path ", 1)[1]: line.split()[1] for line in lines if " path " in line}
    livevm.run(f"umount {TOP}")
    return found


def test_rollback_empties_root_and_keeps_home_and_persist(btrfs_installed, livevm, tmp_path):
    script = rollback_script_from_config(livevm, tmp_path)
    assert "btrfs subvolume snapshot" in script and "/dev/mapper/cryptroot" in script

    # State a running system leaves: files in /, nested subvolumes (systemd creates some), data.
    livevm.run("set -e; echo junk > /mnt/junk-file; mkdir -p /mnt/var/lib /mnt/srv/deep; "
               "echo more > /mnt/srv/deep/file; "
               "btrfs subvolume create /mnt/var/lib/machines; echo m > /mnt/var/lib/machines/inside; "
               "btrfs subvolume create /mnt/var/lib/machines/nested-again; "
               "echo home > /mnt/home/kept; echo persist > /mnt/persist/kept; sync")
    before = subvolumes(livevm)
    assert "@root/var/lib/machines" in before and "@root/var/lib/machines/nested-again" in before
    root_id_before = before["@root"]

    # The initrd runs before anything is mounted: unmount the target tree first.
    livevm.run("swapoff /mnt/swap/swapfile 2>/dev/null; umount -R /mnt; "
               "for m in $(findmnt -rn -S /dev/mapper/cryptroot -o TARGET | sort -r); do umount $m; done")
    ran = livevm.run(["bash", "-e", "-c", script], check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "deleting nested subvolume @root/var/lib/machines/nested-again" in ran.stdout

    after = subvolumes(livevm)
    assert not [name for name in after if name.startswith("@root/")]
    assert after["@root"] != root_id_before                       # a new @root from the snapshot
    assert {"@root-blank", "@home", "@persist", "@nix", "@log", "@swap"} <= set(after)
    livevm.run(f"mkdir -p {TOP} && mount -o subvol=/ /dev/mapper/cryptroot {TOP}")
    try:
        assert livevm.run(f"ls -A {TOP}/@root").stdout == ""
        assert livevm.run(f"btrfs property get -ts {TOP}/@root ro").stdout.strip() == "ro=false"
        assert livevm.run(f"btrfs property get -ts {TOP}/@root-blank ro").stdout.strip() == "ro=true"
        assert livevm.run(f"cat {TOP}/@home/kept").stdout == "home\n"
        assert livevm.run(f"cat {TOP}/@persist/kept").stdout == "persist\n"
        assert livevm.run(f"ls {TOP}/@persist/etc/ssh").stdout.split()  # seeded keys survive too
    finally:
        livevm.run(f"umount {TOP}")

    # Run twice (a second boot): still empty, still fine.
    again = livevm.run(["bash", "-e", "-c", script], check=False)
    assert again.returncode == 0, again.stderr
    assert not [name for name in subvolumes(livevm) if name.startswith("@root/")]


# --- rescue (rescue.py) ---------------------------------------------------------------------------
# The installed state: the root broken as a running system breaks it (files, a nested subvolume,
# @root deleted), the live system booted afresh (nothing mounted, the container closed), then rescued.

TABULA_TOP = "/run/tabula/btrfs/nixos"
FOOTPRINT = {"boot", "etc", "etc/nixos", "home", "nix", "persist", "swap", "var", "var/log"}


def in_top_level(livevm, state, script: str) -> str:
    """Run ``script`` in the guest with the top level of the btrfs mounted at $TOP (the container
    opened first if it is closed, the passphrase on stdin), unmounted after: one round trip. (The
    guard refuses a disk with mounts it does not know, so nothing of the test's stays mounted.)"""
    wrapper = ("set -e; cryptsetup status cryptroot >/dev/null || "
               "cryptsetup open /dev/disk/by-partlabel/cryptroot cryptroot; "
               f"TOP={TOP}; mkdir -p $TOP; mountpoint -q $TOP || mount -o subvol=/ /dev/mapper/cryptroot $TOP; "
               "trap 'cd /; umount $TOP' EXIT; ")
    return livevm.run(["bash", "-c", wrapper + script], input=state.secrets["TABULA_LUKS_PASSPHRASE"] + "\n").stdout


STATE_SCRIPT = r"""
echo '## subvolumes'; btrfs subvolume list -p -u -q $TOP
echo '## ro'; for s in @root @root-blank; do [ -d $TOP/$s ] && echo "$s $(btrfs property get -ts $TOP/$s ro)"; done
echo '## root'; [ -d $TOP/@root ] && (cd $TOP/@root && find . -mindepth 1 -printf '%P
' | LC_ALL=C sort)
echo '## config'; [ -d $TOP/@root/etc/nixos ] && (cd $TOP/@root/etc/nixos && sha256sum * && stat -c '%n %a %U' *)
echo '## persisted config'; cd $TOP/@persist/etc/nixos && sha256sum * && stat -c '%n %a %U' *
echo '## kept'
for s in @persist @home; do
  cd $TOP/$s && echo "== $s" && find . -printf '%p %y %m %U %s
' | LC_ALL=C sort
  find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum
done
cd /
"""


def btrfs_state(livevm, state) -> dict:
    """The btrfs as the tests compare it, read in one round trip: subvolumes (btrfs subvolume
    list), their ro flags, what @root holds, its etc/nixos and the persisted copy (checksums,
    modes, owners), and every file, folder and link of @persist and @home (kept: path, type,
    mode, owner, size, sha256)."""
    sections, current = {}, None
    for line in in_top_level(livevm, state, STATE_SCRIPT).splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], [])
        elif current is not None:
            current.append(line)
    sections["subvolumes"] = btrfs.parse_subvolume_list(sections["subvolumes"])
    return sections


def boot_live_system(livevm) -> None:
    """What a fresh boot of the live system sees: nothing of the target mounted, the container closed."""
    livevm.run(f"swapoff -a; umount -R /mnt 2>/dev/null; for m in {TABULA_TOP} {TOP}; do "
               "if mountpoint -q $m; then umount $m; fi; done; "
               "if cryptsetup status cryptroot >/dev/null; then cryptsetup close cryptroot; fi")


def assert_root_as_the_install_left_it(state: dict, kept: list[str]) -> None:
    """@root a fresh copy of @root-blank, holding only what the install puts there: the mount
    points, and /etc/nixos equal to the persisted copy; @persist and @home as they were."""
    table = state["subvolumes"]
    assert not [name for name in table if name.startswith("@root/")], table
    assert table["@root"]["parent_uuid"] == table["@root-blank"]["uuid"]      # a snapshot of the blank
    listing = set(state["root"])
    config = {name for name in listing if name.startswith("etc/nixos/")}
    assert listing - config == FOOTPRINT, sorted(listing)
    assert "etc/nixos/flake.lock" in config and "etc/nixos/configuration.nix" in config
    assert state["config"] == state["persisted config"]
    assert state["ro"] == ["@root ro=false", "@root-blank ro=true"]
    assert state["kept"] == kept


def test_rescue_restores_a_broken_root_and_the_install_converges(btrfs_installed, livevm, run_pyinfra):
    state = btrfs_installed
    kept = btrfs_state(livevm, state)["kept"]
    in_top_level(livevm, state, "cd $TOP/@root; echo junk > junk-file; mkdir -p srv/deep var/lib etc/nixos; "
                         "echo more > srv/deep/file; echo broken > etc/nixos/configuration.nix; "
                         "btrfs subvolume create var/lib/machines; echo m > var/lib/machines/inside; "
                         "btrfs subvolume create var/lib/machines/nested-again; sync")
    broken = btrfs_state(livevm, state)["subvolumes"]
    assert {"@root/var/lib/machines", "@root/var/lib/machines/nested-again"} <= set(broken)
    boot_live_system(livevm)

    # --dry: the plan, nothing run, the disk byte-identical, the container still closed
    output, rows = dry_plan(livevm, ["-vv", *rescue_args(state)], ("TABULA-SSD",), env=state.env())
    for step in ("LUKS open cryptroot", "Btrfs top level nixos", "Btrfs restore @root from @root-blank",
                 "Mounts under /mnt", "Persist configuration restore"):
        found = [name for name in rows if name.startswith(step)]
        assert found and rows[found[0]], (step, rows)
    assert "@root on /dev/mapper/cryptroot: read once /dev/mapper/cryptroot is open" in output
    assert livevm.run("cryptsetup status cryptroot", check=False).returncode != 0

    result, output = run(run_pyinfra, state, rescue_args(state), "-v")
    assert result.returncode == 0, output[-8000:]
    assert ("@root on /dev/mapper/cryptroot: nested subvolumes @root/var/lib/machines, "
            "@root/var/lib/machines/nested-again; @root holds ") in output
    rescued = btrfs_state(livevm, state)
    assert_root_as_the_install_left_it(rescued, kept)
    assert rescued["subvolumes"]["@root"]["id"] != broken["@root"]["id"]

    # @root deleted (from a live system where the container is open and /mnt mounted)
    livevm.run("umount -R /mnt")
    in_top_level(livevm, state, "btrfs subvolume delete $TOP/@root")
    result, output = run(run_pyinfra, state, rescue_args(state), "-v")
    assert result.returncode == 0, output[-8000:]
    assert "@root on /dev/mapper/cryptroot: @root is missing: restoring it from @root-blank" in output
    assert_root_as_the_install_left_it(btrfs_state(livevm, state), kept)

    # a second rescue finds nothing to do, and so does the install deploy (nothing installed again)
    again, output = run(run_pyinfra, state, rescue_args(state), "-vv")
    assert again.returncode == 0, output[-8000:]
    assert_no_changes(output)
    assert "@root holds no nested subvolume and nothing but the install's mount points and etc/nixos" in output
    install, output = run(run_pyinfra, state, deploy_args(state), "-vv")
    assert install.returncode == 0, output[-8000:]
    assert_no_changes(output)


def test_rescue_refuses_a_writable_or_missing_blank(btrfs_installed, livevm, run_pyinfra):
    state = btrfs_installed
    in_top_level(livevm, state, "echo junk > $TOP/@root/junk-file")
    before = btrfs_state(livevm, state)

    # writable, met by a live system booted afresh: refused once the container is open
    in_top_level(livevm, state, "btrfs property set -ts $TOP/@root-blank ro false")
    boot_live_system(livevm)
    result, output = run(run_pyinfra, state, rescue_args(state), "-vv")
    assert result.returncode != 0
    assert "refusing to restore @root on /dev/mapper/cryptroot: its blank snapshot @root-blank is writable" in output
    assert not [c for c in operation_commands(output) if "subvolume delete" in c or "subvolume snapshot" in c]
    after = btrfs_state(livevm, state)
    assert after["ro"] == ["@root ro=false", "@root-blank ro=false"]
    assert {k: v for k, v in after.items() if k != "ro"} == {k: v for k, v in before.items() if k != "ro"}

    # missing, met with the container open and the top level mounted: refused from the facts,
    # no command run at all
    blank, away = f"{TABULA_TOP}/@root-blank", f"{TABULA_TOP}/@root-blank-away"
    livevm.run(f"mountpoint -q {TABULA_TOP} && btrfs property set -ts {blank} ro true && mv {blank} {away}")
    try:
        result, output = run(run_pyinfra, state, rescue_args(state), "-vv")
        assert result.returncode != 0
        assert "refusing to restore @root on /dev/mapper/cryptroot: its blank snapshot @root-blank is missing" in output
        assert operation_commands(output) == []
    finally:
        livevm.run(f"mv {away} {blank}")
    assert btrfs_state(livevm, state) == before


CRYPTROOT = "/dev/disk/by-partlabel/cryptroot"
# what the initrd runs for a crypttab line "cryptroot <device> - tpm2-device=auto" (Debian's path);
# headless: it never asks for a passphrase, and none is anywhere (stdin /dev/null, no $PASSWORD)
TPM_ONLY_OPEN = (f"env -u PASSWORD /lib/systemd/systemd-cryptsetup attach cryptroot {CRYPTROOT} - "
                 "tpm2-device=auto,headless=true </dev/null")


def luks_tokens(livevm) -> tuple[dict, dict]:
    """(keyslots, tokens) of cryptroot's header, from its JSON metadata."""
    metadata = json.loads(livevm.run(f"cryptsetup luksDump --dump-json-metadata {CRYPTROOT}").stdout)
    return metadata["keyslots"], metadata["tokens"]


def test_the_tpm_alone_opens_the_container_and_the_verification_checks_its_token(btrfs_installed, livevm,
                                                                                   run_pyinfra):
    """tpm2_unlock (on in the VM's zephyrus data; the VM's TPM is swtpm): the install enrolled one
    TPM2 token sealed to PCR 7 beside the passphrase; the container closed, the TPM alone opens it;
    the rescue still opens it with the passphrase; without the token the verification names it and
    the TPM opens nothing."""
    from tests.e2e.helpers import assert_target_verified, run_verification

    state = btrfs_installed
    assert state.variables["tpm2_unlock"] is True
    keyslots, tokens = luks_tokens(livevm)
    tpm2 = [token for token in tokens.values() if token["type"] == "systemd-tpm2"]
    assert len(tpm2) == 1 and tpm2[0]["tpm2-pcrs"] == [7], tokens
    assert set(keyslots) - set(tpm2[0]["keyslots"]), "no passphrase keyslot left beside the token"

    boot_live_system(livevm)
    opened = livevm.run(TPM_ONLY_OPEN, check=False)
    assert opened.returncode == 0, opened.stderr
    assert livevm.run("cryptsetup status cryptroot").stdout.startswith("/dev/mapper/cryptroot is active")
    assert livevm.run("blkid -s LABEL -o value /dev/mapper/cryptroot").stdout.strip() == "nixos"

    # the rescue opens it with the passphrase on stdin, as the install does, and mounts it all back
    boot_live_system(livevm)
    result, output = run(run_pyinfra, state, rescue_args(state), "-v")
    assert result.returncode == 0, output[-8000:]
    assert f"open {CRYPTROOT} as /dev/mapper/cryptroot" in output
    assert_target_verified(livevm, state.data)

    # the token gone (the passphrase keyslot kept): the verification names it, the TPM opens nothing
    livevm.run(f"systemd-cryptenroll --wipe-slot=tpm2 {CRYPTROOT} </dev/null")
    result, output = run_verification(livevm, state.data)
    assert result.returncode != 0
    failed = sorted(re.findall(r"^FAILED tests/verify/test_target\.py::test_(\w+)\[", output, re.M))
    assert failed == ["luks"], output[-4000:]
    assert f"{CRYPTROOT}: no TPM2 token (tpm2_unlock), the profile wants one sealed to PCRs 7" in output
    boot_live_system(livevm)
    assert livevm.run(TPM_ONLY_OPEN, check=False).returncode != 0
