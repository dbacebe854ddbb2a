"""adopt.py in the live VM (#22): a machine's disks read back into a profile.

- Each profile installed by Tabula, then adopted (read only: every disk byte-identical, no secret
  given), gives back a profile that loads to the same layout as the original: the loaded models
  are compared (disks by stable id, partitions, containers, filesystems, subvolumes and their
  blank snapshots, swapfiles, pools with topology, properties and datasets, mounts), not the text.
  A deploy with the adopted profile plans no change to any disk layer: no wipe, no format, no
  re-creation, nothing mounted again.
- What no profile can express is described with its device and refused, no file written; with
  ``tabula_adopt_partial=true`` the profile is written without it, saying so (a root nothing rolls
  back: tests/e2e/test_bad_input.py).
"""
from __future__ import annotations

import re
import shlex

import pytest

from operations.mounts import option_problems
from operations.profile import Filesystem, Luks, Swap, ZfsMember, load_profile
from operations.zfs.common import canonical
from tests import profile_cases
from tests.e2e.faults import dry_plan, disk_checksums, strip_ansi
from tests.e2e.test_faults import SERIALS

# The steps of the disk layers in a plan: none may plan a change on an adopted machine.
DISK_STEPS = ("Wipe ", "GPT ", "LUKS ", "Filesystems", "ZFS ", "Btrfs ", "Mounts")


def adopt(livevm, run_pyinfra, destination, *data: str):
    before = disk_checksums(livevm, SERIALS)
    result = run_pyinfra(["-v", "--data", f"tabula_adopt_profile={destination}", *data, "adopt.py"],
                         env={"TABULA_LUKS_PASSPHRASE": None, "TABULA_ZFS_KEY": None})
    assert disk_checksums(livevm, SERIALS) == before, "adopt.py changed a disk"
    return result, strip_ansi(result.stdout + result.stderr)


def content_of(profile, node) -> tuple:
    if isinstance(node, Luks):
        return ("luks", node.mapper, node.luks_type, node.pbkdf, node.pbkdf_iterations, node.allow_discards,
                node.bypass_workqueues, node.tpm2_unlock, tuple(node.tpm2_pcrs) if node.tpm2_unlock else (),
                content_of(profile, node.content))
    if isinstance(node, Filesystem):
        subvolumes = {s.path: (s.mountpoint, s.blank_snapshot, s.swapfile.size_bytes if s.swapfile else None)
                      for s in node.subvolumes}
        return ("filesystem", node.format, node.fs_label, node.mountpoint, subvolumes)
    if isinstance(node, Swap):
        return ("swap", node.random_encryption)
    if isinstance(node, ZfsMember):
        return ("zfs", profile.pools[node.pool].name)
    return (None,)


def layout(profile) -> dict:
    """What the disks hold, as the loaded model says it (keys and spellings a profile may choose
    freely left out: disk keys, pool keys)."""
    disks = {disk.device: [(p.label, p.type, p.size_bytes, content_of(profile, p.content) if p.content else None)
                           for p in disk.partitions] for disk in profile.disks.values()}
    pools = {}
    for pool in profile.pools.values():
        pools[pool.name] = {
            "vdevs": [(v.mode, v.members) for v in pool.vdevs], "log": pool.log, "cache": pool.cache,
            "ashift": pool.options.get("ashift"),
            "root": {k: canonical(k, v) for k, v in pool.root_properties.items()},
            "datasets": {d.name: ({k: canonical(k, v) for k, v in d.properties.items()}, d.mountpoint,
                                  d.empty_snapshot, (d.encryption.keyformat, d.encryption.keylocation)
                                  if d.encryption else None) for d in pool.datasets},
        }
    mounts = sorted((m.mountpoint, m.fstype, m.device if m.fstype in ("none", "zfs") else "") for m in profile.all_mounts())
    return {"disks": disks, "pools": pools, "mounts": mounts}


def assert_options_kept(original, adopted) -> None:
    """Every option the original mounts with, the adopted one mounts with too (kernel spellings:
    compress=zstd shows as zstd:3)."""
    have = {m.mountpoint: m for m in adopted.all_mounts()}
    for mount in original.all_mounts():
        assert option_problems(mount.options, list(have[mount.mountpoint].options)) == [], (mount, have[mount.mountpoint])


@pytest.mark.parametrize("profile_name", profile_cases.profile_names())
def test_an_installed_profile_adopted_gives_back_its_layout_and_a_deploy_with_it_changes_no_disk(
        profile_name, installed, livevm, run_pyinfra, tmp_path):
    state = installed(profile_name)
    destination = tmp_path / "adopted.yaml"
    result, output = adopt(livevm, run_pyinfra, destination)
    assert result.returncode == 0, output[-6000:]
    assert f"adopt: the profile of the system at /mnt is in {destination}" in output, output[-3000:]
    text = destination.read_text()
    assert text.startswith("# adopted-install-target: a Tabula profile read from the disks"), text[:400]
    assert "${" not in text and "REQUIRED" not in text          # no vars needed
    adopted = load_profile(str(destination), {})
    original = load_profile(profile_name, state.variables)
    assert layout(adopted) == layout(original)
    assert_options_kept(original, adopted)
    assert (adopted.nixos.hostname, adopted.nixos.user) == (original.nixos.hostname, original.nixos.user)
    assert adopted.persistence.root == original.persistence.root
    assert set(original.persistence.directories) <= set(adopted.persistence.directories)

    # a deploy with it: no disk layer plans anything (the NixOS files are the adopted profile's)
    plan, rows = dry_plan(livevm, state.args("-vv", tabula_profile=str(destination), tabula_vars={},
                                             tabula_install=False), SERIALS, env=state.env())
    disk_rows = {name: changed for name, changed in rows.items() if name.startswith(DISK_STEPS)}
    assert disk_rows and not any(disk_rows.values()), rows


def test_what_no_profile_can_express_is_refused_and_a_partial_profile_says_what_it_left_out(
        installed, livevm, run_pyinfra, tmp_path):
    state = installed("zephyrus-btrfs")
    # a disk beside the install with an ext2 filesystem (not one a profile describes)
    disk = livevm.disk_by_serial("TABULA-RZ1")
    livevm.run(f"sgdisk -n 1:0:+64M -t 1:8300 -c 1:scratch {disk} && udevadm settle && mkfs.ext2 -q /dev/disk/by-partlabel/scratch")
    part = livevm.run("readlink -f /dev/disk/by-partlabel/scratch").stdout.strip()
    destination = tmp_path / "adopted.yaml"
    result, output = adopt(livevm, run_pyinfra, destination)
    assert result.returncode != 0
    assert not destination.exists()
    assert "the target holds what no Tabula profile can express, so no profile was written" in output, output[-3000:]
    assert f"{part}: ext2: not a filesystem a profile describes (btrfs, ext4, f2fs, vfat, swap, LUKS, ZFS)" in output

    result, output = adopt(livevm, run_pyinfra, destination, "--data", "tabula_adopt_partial=true")
    assert result.returncode == 0, output[-4000:]
    text = destination.read_text()
    assert f"#   - {part}: ext2: not a filesystem a profile describes" in text
    adopted = load_profile(str(destination), {})
    scratch = adopted.partition("scratch")
    assert scratch.content is None and scratch.size == "64MiB"
    original = load_profile("zephyrus-btrfs", state.variables)
    assert {k: v for k, v in layout(adopted)["disks"].items() if k != livevm.stable_path("TABULA-RZ1")} == \
        layout(original)["disks"]


def test_a_machine_made_by_the_guides_commands_is_adopted_and_deployed_over(
        clean_disks, livevm, run_pyinfra, tmp_path):
    """The guide's own commands (tools/bench/guide.sh: its steps 1-6 and the post-install seeding,
    on the NVMe) made the machine; adopted, its profile deploys with no destructive step, every
    byte of the LUKS header and of @home and @persist kept, converges, and verify passes."""
    from tests.e2e.helpers import assert_no_changes, operation_commands, run_verification, run_with_secrets
    from tests.e2e.states import new_secrets, secrets_env
    from tools.benchmark import GUIDE, nixos_files_tar

    disk = livevm.stable_path("TABULA-NVME0")
    variables = {"disk": disk, "swap_size": "256M", "luks_pbkdf": "pbkdf2", "luks_pbkdf_iterations": 1000}
    values = new_secrets()
    stdin = "\n".join([values["TABULA_LUKS_PASSPHRASE"], values["TABULA_ROOT_PASSWORD_HASH"],
                       values["TABULA_USER_PASSWORD_HASH"], nixos_files_tar(variables)]) + "\n"
    livevm.run(f"sh -c {shlex.quote(GUIDE.read_text())} guide {disk} 256M", input=stdin, timeout=900)
    livevm.run("echo kept > /mnt/home/marker && echo kept > /mnt/persist/marker && sync")
    # every file of @home and @persist as the guide left it (but the copy of /etc/nixos, which a
    # deploy replaces with its profile's files), and the LUKS header
    livevm.run("cd /mnt && find home persist -type f ! -path 'persist/etc/nixos/*' -print0 | sort -z > /root/kept")
    kept = ("cryptsetup luksDump /dev/disk/by-partlabel/cryptroot | sha256sum; "
            "head -c 16M /dev/disk/by-partlabel/cryptroot | sha256sum; cd /mnt && xargs -0 sha256sum < /root/kept")
    before = livevm.run(kept).stdout
    assert "home/marker" in before and "persist/marker" in before

    destination = tmp_path / "guide.yaml"
    result, output = adopt(livevm, run_pyinfra, destination)
    assert result.returncode == 0, output[-6000:]
    adopted = load_profile(str(destination), {})
    assert layout(adopted) == layout(load_profile("zephyrus-btrfs", variables))
    assert (adopted.nixos.hostname, adopted.nixos.user, adopted.persistence.root) == ("zephyrus", "sean", "/persist")

    data = ["--data", f"tabula_profile={destination}", "--data", "tabula_vars={}", "deploy.py"]
    first, output = run_with_secrets(run_pyinfra, data, values, "-vv")
    assert first.returncode == 0, output[-6000:]
    destructive = [c for c in operation_commands(output)
                   if re.search(r"\b(luksFormat|mkfs\S*|wipefs|sgdisk|subvolume (create|delete|snapshot)|mkswap)\b", c)]
    assert destructive == [], destructive
    assert livevm.run(kept).stdout == before
    second, output = run_with_secrets(run_pyinfra, data, values, "-vv")
    assert second.returncode == 0, output[-6000:]
    assert_no_changes(output)
    verified, said = run_verification(livevm, {"tabula_profile": str(destination), "tabula_vars": {}})
    assert verified.returncode == 0 and "matches the profile" in said, said[-4000:]
    # the day-two tools take it as any profile: the gap report and the rescue's plan
    gaps = run_pyinfra(["--data", f"tabula_profile={destination}", "--data", "tabula_vars={}", "gaps.py"])
    said = gaps.stdout + gaps.stderr
    assert gaps.returncode == 0 and "gaps: what the ephemeral root of the system at /mnt holds since the last boot " \
        "(btrfs @root against @root-blank on /dev/mapper/cryptroot)" in said, said[-4000:]
    plan, rows = dry_plan(livevm, ["-vv", "--data", f"tabula_profile={destination}", "--data", "tabula_vars={}",
                                   "rescue.py"], SERIALS, env=secrets_env(values))
    assert "Btrfs restore @root from @root-blank" in rows, rows
