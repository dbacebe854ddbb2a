# Hosts Tabula can install. Run one with:   pyinfra inventory.py deploy.py --limit <host>
# or name the host directly:                pyinfra install-target deploy.py
# ("install-target" is an SSH alias for the live system booted on the machine to install; the
# live VM tool writes one for the test VM: see README.)

# The live system of the machine being installed, with the default profile from group_data/all.py.
install_target = [
    ("install-target", {}),
]

# Examples of named hosts with their own data: copy one and put in your disk ids.
laptops = [
    ("zephyrus-live", {
        "ssh_hostname": "nixos.local",
        "ssh_user": "root",
        "tabula_profile": "zephyrus-btrfs",
        "tabula_vars": {
            "disk": "/dev/disk/by-id/nvme-Samsung_SSD_990_PRO_4TB_S7KGNU0X123456",
            "disk_serial": "S7KGNU0X123456",
            "hostname": "zephyrus",
            "user": "sean",
            "swap_size": "32GiB",
            # SSH public keys that may log in as the user (optional on a laptop: its console works)
            "authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExam sean@desk"],
        },
    }),
]

servers = [
    ("nas-live", {
        "ssh_hostname": "192.0.2.10",
        "ssh_user": "root",
        "tabula_profile": "zfs-raidz1",
        "tabula_vars": {
            "hostname": "nas",
            "ssd": "/dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T000001",
            "rz1": "/dev/disk/by-id/ata-WDC_WD40EFPX-68C6CN0_WD-WX12D1234561",
            "rz2": "/dev/disk/by-id/ata-WDC_WD40EFPX-68C6CN0_WD-WX12D1234562",
            "rz3": "/dev/disk/by-id/ata-WDC_WD40EFPX-68C6CN0_WD-WX12D1234563",
            "ssd_size": "1T",
            "data_disk_size": "4T",
            # A server has no console: without a key (or ssh_password_login) nobody could log in,
            # and the profile refuses. The same keys unlock /remote over SSH in the initrd.
            "authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExam admin@desk"],
            "remote_unlock_modules": ["igb"],     # the NIC's driver (lspci -k), for the initrd's network
        },
    }),
]
