"""tools/livevm.py reads the VM's snapshots from QEMU's own listing (captured from QEMU 7.2): every
snapshot by name, also when the disks number it differently (ID "--")."""
from tools.livevm import LiveVM

LISTING = ("List of snapshots present on all disks:\r\n"
           "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\r\n"
           "--        installed-light-tmpfs-f2fs-bf7c4dca8c5b  576 MiB 2026-12-04 18:33:32 00:41:43.968           \r\n"
           "--        blank-9baeb28bce22  570 MiB 2026-12-04 18:43:31 00:51:28.432           \r\n"
           "1         base              432 MiB 2026-12-04 16:43:45 00:01:37.112           \r\n")


class FakeQMP:
    def __init__(self, listing):
        self.listing = listing

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def hmp(self, line):
        assert line == "info snapshots"
        return self.listing


def test_every_snapshot_is_listed_by_name(monkeypatch):
    monkeypatch.setattr("tools.livevm.QMP", FakeQMP(LISTING))
    assert LiveVM("unit").states() == ["installed-light-tmpfs-f2fs-bf7c4dca8c5b", "blank-9baeb28bce22", "base"]


def test_no_snapshot_is_an_empty_list(monkeypatch):
    monkeypatch.setattr("tools.livevm.QMP", FakeQMP("There is no snapshot available.\r\n"))
    assert LiveVM("unit").states() == []
