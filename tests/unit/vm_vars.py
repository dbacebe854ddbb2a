"""Profile vars naming the live VM's disks by their by-id paths, shared by the unit tests."""

NVME = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_TABULA-NVME0"
ZFS_VARS = {
    "hostname": "tabula-zfs",
    "ssd": "/dev/disk/by-id/virtio-TABULA-SSD",
    "rz1": "/dev/disk/by-id/virtio-TABULA-RZ1",
    "rz2": "/dev/disk/by-id/virtio-TABULA-RZ2",
    "rz3": "/dev/disk/by-id/virtio-TABULA-RZ3",
}
LIGHT_VARS = {"hostname": "tabula-light", "disk": "/dev/disk/by-id/virtio-TABULA-SSD"}
