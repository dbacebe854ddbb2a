"""Profile vars naming the live VM's disks by their by-id paths, shared by the unit tests."""

# A public key for tests only (its private half was thrown away): profiles that must be reachable
# over SSH (zfs-raidz1 is headless) refuse to load without one.
TEST_AUTHORIZED_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINx8ygNPVZ0wvdj2Gcy/kg6QT470MgFm35C3mjFXD3LO tabula-test-only"
NVME = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"
ZFS_VARS = {
    "hostname": "tabula-zfs",
    "ssd": "/dev/disk/by-id/virtio-TABULA-SSD",
    "rz1": "/dev/disk/by-id/virtio-TABULA-RZ1",
    "rz2": "/dev/disk/by-id/virtio-TABULA-RZ2",
    "rz3": "/dev/disk/by-id/virtio-TABULA-RZ3",
    "authorized_keys": [TEST_AUTHORIZED_KEY],
}
LIGHT_VARS = {"hostname": "tabula-light", "disk": "/dev/disk/by-id/virtio-TABULA-SSD"}
