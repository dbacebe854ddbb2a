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


class HangingQMP(FakeQMP):
    """A QEMU whose savevm never answers: the socket read times out."""

    def __init__(self, **kwargs):
        self.timeout = kwargs.get("timeout")

    def hmp(self, line):
        assert line.startswith("savevm ") and self.timeout is not None
        raise TimeoutError("timed out")


def test_a_savevm_that_never_ends_kills_qemu_and_boots_the_vm_afresh(monkeypatch):
    import pytest

    from tools import livevm

    done = []
    monkeypatch.setattr(livevm, "QMP", lambda path, timeout=900: HangingQMP(timeout=timeout))
    vm = LiveVM("unit")
    for step in ("run", "unplug_nvme", "close_connections", "plug_nvme"):
        monkeypatch.setattr(vm, step, lambda *a, step=step, **k: done.append(step))
    monkeypatch.setattr(vm, "kill", lambda: done.append("kill"))
    monkeypatch.setattr(vm, "ensure_up", lambda: done.append("ensure_up"))
    with pytest.raises(livevm.SavevmHung):
        vm.save_state("blank-x")
    assert done[-2:] == ["kill", "ensure_up"]


def test_a_state_whose_save_hung_is_made_again_on_the_fresh_vm():
    from tests.e2e import states
    from tools.livevm import SavevmHung

    class VM:
        saves = 0

        def states(self):
            return []

        def save_state(self, name):
            self.saves += 1
            if self.saves == 1:
                raise SavevmHung("hung")

    made = []
    vm = VM()
    states.restore_or_make(vm, "blank-x", lambda: made.append(True))
    assert made == [True, True] and vm.saves == 2
