#!/bin/sh
# Runs in the live VM: wipe the disks with the given serials back to blank, whatever an
# earlier install left on them (mounts, swap, ZFS pools, LUKS mappings, signatures).
# Safe to repeat and on blank disks. Usage: sh reset-disks.sh SERIAL...
set -u

disk_for_serial() {
    for link in /dev/disk/by-id/*[-_]"$1"; do
        [ -e "$link" ] && readlink -f "$link"
    done | sort -u
}

root_disk=$(lsblk -ndo PKNAME "$(findmnt -no SOURCE /)" 2>/dev/null)
disks=""
for serial in "$@"; do
    disk=$(disk_for_serial "$serial")
    case "$disk" in
        /dev/*) ;;
        *) echo "no single disk with serial $serial: '$disk'" >&2; exit 1 ;;
    esac
    if [ "$disk" = "/dev/$root_disk" ]; then
        echo "refusing to wipe $disk: it holds the live system" >&2; exit 1
    fi
    disks="$disks $disk"
done

# Every block device on the target disks: the disks, partitions and stacked mappings.
tree() { lsblk -lnpo NAME $disks 2>/dev/null | sort -u; }
partitions() { lsblk -lnpo NAME,TYPE $disks 2>/dev/null | awk '$2 == "part" {print $1}'; }

# Mounts: everything under /mnt, then anything else mounted from the disks.
findmnt -rno TARGET | grep -E '^/mnt(/|$)' | sort -r | while read -r target; do
    umount -R "$target" 2>/dev/null
done
for dev in $(tree); do
    findmnt -rno TARGET -S "$dev" | sort -r | while read -r target; do umount -R "$target"; done
done

for dev in $(tree); do
    swapon --show=NAME --noheadings | grep -qx "$dev" && swapoff "$dev"
done

# ZFS pools with a vdev on the disks (only if ZFS is loaded: otherwise none is imported).
if [ -e /sys/module/zfs ]; then
    for pool in $(zpool list -Ho name 2>/dev/null); do
        vdevs=$(zpool status -PL "$pool" | awk '$1 ~ "^/dev/" {print $1}')
        for dev in $(tree); do
            if echo "$vdevs" | grep -qx "$dev"; then
                zpool destroy -f "$pool" || zpool export -f "$pool"
                break
            fi
        done
    done
fi

# LUKS/dm mappings, deepest first.
lsblk -lnpo NAME,TYPE $disks | awk '$2 == "crypt" || $2 == "dm" {print $1}' | tac |
    while read -r mapping; do cryptsetup close "$mapping" || dmsetup remove "$mapping"; done

for dev in $(partitions) $disks; do
    command -v zpool >/dev/null && zpool labelclear -f "$dev" >/dev/null 2>&1
    wipefs -af "$dev" >/dev/null
done
for disk in $disks; do
    sgdisk --zap-all "$disk" >/dev/null 2>&1
    wipefs -af "$disk" >/dev/null      # sgdisk leaves a protective MBR signature behind
    blkdiscard -f "$disk" 2>/dev/null || true
    blockdev --rereadpt "$disk" 2>/dev/null
done
udevadm settle

# Verify: no partitions and no signatures left.
leftover=$(lsblk -lnpo NAME,TYPE,FSTYPE $disks | awk '$2 != "disk" || $3 != ""')
if [ -n "$leftover" ]; then
    echo "target disks not blank:" >&2; echo "$leftover" >&2; exit 1
fi
