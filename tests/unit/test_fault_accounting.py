"""The fault suite's accounting of what a command created: it must see creations inside joined,
nested ``sh -c`` scripts (one_command), or a second mkfs/luksFormat would go unnoticed."""
from pyinfra.api import QuoteString, StringCommand

from operations.filesystems import mkfs_command
from operations.luks import format_command
from operations.profile import Filesystem, load_profile
from operations.run import one_command
from operations.secrets import Secret
from tests.e2e.faults import created, duplicated_creations


def as_echoed(command: StringCommand) -> str:
    """How pyinfra -vv echoes a command: inside one more sh -c."""
    return StringCommand("sh", "-c", QuoteString(command.get_raw_value())).get_raw_value()


def test_joined_mkfs_and_mkswap_are_each_counted():
    joined = one_command(mkfs_command("/dev/disk/by-partlabel/EFI", Filesystem(format="vfat", fs_label="EFI")),
                         mkfs_command("/dev/mapper/cryptroot", Filesystem(format="btrfs", fs_label="nixos")),
                         StringCommand("mkswap", "/dev/sw"))
    assert created([as_echoed(joined)]) == ["mkfs /dev/disk/by-partlabel/EFI", "mkfs /dev/mapper/cryptroot",
                                            "mkfs /dev/sw"]


def test_luks_format_inside_its_guard_script_is_counted_and_a_second_is_a_duplicate():
    part, luks = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/x"}).luks_devices()[0]
    echoed = as_echoed(format_command(part.device, luks, Secret("not-in-argv", "test")))
    assert created([echoed]) == [f"luksFormat {part.device}"]
    assert duplicated_creations([echoed, echoed]) == [f"luksFormat {part.device}"]


def test_partitions_subvolumes_pools_and_facts():
    assert created(["sh -c 'sgdisk --clear -n 1:0:+1G -t 1:EF00 -c 1:EFI -n 2:0:0 -t 2:8300 -c 2:root /dev/x'"]) == [
        "partition /dev/x#1", "partition /dev/x#2"]
    assert created(["sh -c 'btrfs subvolume create /t/@root && btrfs subvolume snapshot -r /t/@root /t/@blank'"]) == [
        "subvolume /t/@root", "subvolume /t/@blank"]
    assert created(["sh -c 'zpool create -o ashift=12 -O mountpoint=none rpool raidz1 /a /b /c && "
                    "zfs create -o mountpoint=legacy rpool/temp && zfs snapshot rpool/temp@empty'"]) == [
        "pool rpool", "dataset rpool/temp", "snapshot rpool/temp@empty"]
    # a fact that merely names a program creates nothing
    assert created(["sh -c 'if command -v btrfs >/dev/null 2>&1; then ( btrfs subvolume list /x ); fi'"]) == []
