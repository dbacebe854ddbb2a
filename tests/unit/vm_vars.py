"""Profile vars naming the live VM's disks by their by-id paths, shared by the unit tests."""

from tests.profile_cases import shared_test_key

# A public key for tests only (tests/profile_cases.yaml): profiles that must be reachable over SSH
# (zfs-raidz1 is headless) refuse to load without one.
TEST_AUTHORIZED_KEY = shared_test_key()
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
