#!/bin/sh
# The btrfs guide's install steps 1-5 (zephyrus-btrfs-impermanence-guide.md) plus the swapfile, as
# one plain shell script: the baseline tools/benchmark.py times Tabula against. Same commands and
# settings as the zephyrus-btrfs profile with the test variables (LUKS2 with pbkdf2 at 1000
# iterations, discards, no workqueues; swapfile NOCOW, preallocated). Runs in the live VM:
#
#     sh guide.sh /dev/disk/by-id/nvme-... SWAP_SIZE < passphrase
#
# No checks, no idempotence: it assumes blank disks, like the guide.
set -eu
DISK=$1
SWAP_SIZE=$2
IFS= read -r PASS
OPTS="compress=zstd,noatime,discard=async"

# 1. Partition the disk
wipefs -a "$DISK"
sgdisk --zap-all "$DISK"
sgdisk --clear \
  --new=1:0:+1GiB --typecode=1:ef00 --change-name=1:EFI \
  --new=2:0:0 --typecode=2:8300 --change-name=2:cryptroot \
  "$DISK"
partx -u "$DISK" 2>/dev/null || true
udevadm settle
EFI=/dev/disk/by-partlabel/EFI
ROOT=/dev/disk/by-partlabel/cryptroot

# 2. LUKS (the passphrase on stdin, as typed)
printf '%s\n' "$PASS" | cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 \
  --pbkdf-force-iterations 1000 "$ROOT"
printf '%s\n' "$PASS" | cryptsetup open --allow-discards --perf-no_read_workqueue \
  --perf-no_write_workqueue "$ROOT" cryptroot

# 3. Filesystems
mkfs.fat -F 32 -n EFI "$EFI"
mkfs.btrfs -L nixos /dev/mapper/cryptroot

# 4. Subvolumes and the blank snapshot
mount -o "$OPTS" /dev/mapper/cryptroot /mnt
for sub in @root @nix @home @persist @log @swap; do btrfs subvolume create "/mnt/$sub"; done
btrfs subvolume snapshot -r /mnt/@root /mnt/@root-blank
umount /mnt

# 5. Mounts for the installation
mount -o "subvol=@root,$OPTS" /dev/mapper/cryptroot /mnt
mkdir -p /mnt/boot /mnt/nix /mnt/home /mnt/persist /mnt/var/log /mnt/swap
mount -o "subvol=@nix,$OPTS" /dev/mapper/cryptroot /mnt/nix
mount -o "subvol=@home,$OPTS" /dev/mapper/cryptroot /mnt/home
mount -o "subvol=@persist,$OPTS" /dev/mapper/cryptroot /mnt/persist
mount -o "subvol=@log,$OPTS" /dev/mapper/cryptroot /mnt/var/log
mount -o "subvol=@swap,noatime" /dev/mapper/cryptroot /mnt/swap
mount -o fmask=0022,dmask=0022 "$EFI" /mnt/boot

# Swapfile (btrfs: NOCOW before it gets blocks)
truncate -s 0 /mnt/swap/swapfile
chattr +C /mnt/swap/swapfile
fallocate -l "$SWAP_SIZE" /mnt/swap/swapfile
chmod 600 /mnt/swap/swapfile
mkswap /mnt/swap/swapfile
