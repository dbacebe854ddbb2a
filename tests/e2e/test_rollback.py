"""The initrd's root rollback, run on the real btrfs-on-LUKS disk of the live VM.

The script is taken from the rendered impermanence.nix (evaluated with nix-instantiate on the
controller, the guest has no Nix): exactly the text the initrd service will run, run the way
NixOS runs a service script (bash -e).
"""
from __future__ import annotations

import json
import subprocess

from tests.e2e.test_nixos_install import HOST, deploy_args, run, secrets_env  # noqa: F401 (fixture)

TOP = "/run/tabula-test-top"


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


def test_rollback_empties_root_and_keeps_home_and_persist(clean_disks, livevm, target, secrets_env, run_pyinfra, tmp_path):
    result, output = run(run_pyinfra, deploy_args(livevm, install=False))
    assert result.returncode == 0, output[-8000:]
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
