# Data for every host. Per-host values (the target disk above all) belong in inventory.py or --data.

# The storage layout: a file in profiles/ (zephyrus-btrfs, zfs-raidz1, light-tmpfs-f2fs) or a path.
tabula_profile = "zephyrus-btrfs"

# Values for the profile's vars (see the profile's "vars:"), e.g. the disk by its stable id:
#   tabula_vars = {"disk": "/dev/disk/by-id/nvme-Samsung_SSD_990_PRO_4TB_S7KGNU0X123456"}
tabula_vars = {}

# Disks (by-id path or serial) that may be wiped although they hold data. Empty: blank disks only.
tabula_confirm_wipe = []

# Run nixos-install at the end.
tabula_install = True
