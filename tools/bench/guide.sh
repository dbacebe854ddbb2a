#!/bin/sh
# The btrfs guide's sequence up to nixos-install (zephyrus-btrfs-impermanence-guide.md), as one
# plain shell script: the baseline tools/benchmark.py times Tabula against. Install steps 1-5 plus
# the swapfile, step 6 (nixos-generate-config), the NixOS files written into /mnt/etc/nixos, and
# the guide's post-installation seeding of /persist (password files, SSH host keys, the copy of
# /etc/nixos), which Tabula does before the first boot, plus the machine-id Tabula also seeds.
# Same commands and settings as the zephyrus-btrfs profile with the test variables (LUKS2 with
# pbkdf2 at 1000 iterations, discards, no workqueues; swapfile NOCOW, preallocated). Runs in the
# live VM, everything on stdin: the passphrase, the two password hashes, then the NixOS files as a
# base64 tar (the guide's user pastes them):
#
#     sh guide.sh /dev/disk/by-id/nvme-... SWAP_SIZE < stdin
#
# It prints "disk stages done" after step 5 + swapfile, for the benchmark's first ratio, and marks
# the host identity (SSH host keys, machine-id): the RSA 4096 key's prime search alone takes from
# 2 to 30 s under TCG, on either side, so the benchmark also gives the ratio without it.
# No checks, no idempotence: it assumes blank disks, like the guide.
set -eu
DISK=$1
SWAP_SIZE=$2
IFS= read -r PASS
IFS= read -r ROOT_HASH
IFS= read -r USER_HASH
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
echo "disk stages done"

# 6. Generate the hardware configuration, then the NixOS files (flake, configuration,
#    impermanence, the patched hardware configuration, the model's extra module)
nixos-generate-config --root /mnt
base64 -d | tar -x -C /mnt/etc/nixos

# Post-installation: password files, SSH host keys, machine-id, a copy of /etc/nixos on /persist
mkdir -p /mnt/persist/secrets
chmod 700 /mnt/persist/secrets
printf '%s\n' "$USER_HASH" > /mnt/persist/secrets/sean-password
printf '%s\n' "$ROOT_HASH" > /mnt/persist/secrets/root-password
chmod 600 /mnt/persist/secrets/*
echo "host identity start"
mkdir -p /mnt/persist/etc/ssh
ssh-keygen -q -t ed25519 -f /mnt/persist/etc/ssh/ssh_host_ed25519_key -N ""
ssh-keygen -q -t rsa -b 4096 -f /mnt/persist/etc/ssh/ssh_host_rsa_key -N ""
tr -d - < /proc/sys/kernel/random/uuid > /mnt/persist/etc/machine-id
echo "host identity done"
cp -r /mnt/etc/nixos /mnt/persist/etc/
