"""Round trips: a fact is read once until an operation yields a command; one step, one command."""
import subprocess

import pytest
from pyinfra.api import FactBase, QuoteString, StringCommand

from operations import roundtrips
from tests.unit.pyinfra_fake import FakeState, new_run_state, use_fake_host


class Counted(FactBase):
    def command(self, path):
        return f"stat {path}"


class CountingHost:
    name = "install-target"
    state = FakeState()

    def __init__(self):
        self.reads = []

    def get_fact(self, fact, **kwargs):
        self.reads.append((fact.__name__, kwargs))
        return len(self.reads)

    def noop(self, message):
        pass


@pytest.fixture
def counting(monkeypatch):
    fake = CountingHost()
    monkeypatch.setattr(roundtrips, "host", fake)
    new_run_state(monkeypatch)
    return fake


def test_a_fact_is_read_once_until_a_command_is_yielded(counting):
    @roundtrips.operation()
    def step(path):
        first = roundtrips.read(Counted, path=path)
        assert roundtrips.read(Counted, path=path) == first          # kept: no second round trip
        yield StringCommand("touch", path)
        assert roundtrips.read(Counted, path=path) != first          # the command may change it: read again

    assert roundtrips.read(Counted, path="/b") == 1
    list(step._inner("/a"))
    assert [kwargs["path"] for _, kwargs in counting.reads] == ["/b", "/a", "/a"]
    roundtrips.read(Counted, path="/b")                              # forgotten at the yield
    assert len(counting.reads) == 4


def test_an_operation_without_commands_keeps_the_facts(counting):
    @roundtrips.operation()
    def nothing_to_do(path):
        roundtrips.read(Counted, path=path)
        return
        yield

    list(nothing_to_do._inner("/a"))
    list(nothing_to_do._inner("/a"))
    assert len(counting.reads) == 1


def test_list_arguments_are_keys_too(counting):
    roundtrips.read(Counted, path=["/a", "/b"])
    roundtrips.read(Counted, path=["/a", "/b"])
    roundtrips.read(Counted, path=["/a"])
    assert len(counting.reads) == 2


def test_one_command_runs_in_order_and_stops_at_the_first_failure(tmp_path):
    marker = tmp_path / "a b"
    command = roundtrips.one_command(StringCommand("touch", QuoteString(str(marker))), StringCommand("false"),
                                     StringCommand("rm", QuoteString(str(marker))))
    assert str(command).startswith("sh -c ")
    assert subprocess.run(command.get_raw_value(), shell=True).returncode != 0
    assert marker.exists()


def test_one_command_keeps_stdin_and_refuses_two_different_ones():
    single = roundtrips.one_command(StringCommand("true"), StringCommand("cat", _stdin="x"))
    assert single.connector_arguments["_stdin"] == "x"
    with pytest.raises(ValueError, match="_stdin"):
        roundtrips.one_command(StringCommand("cat", _stdin="x"), StringCommand("cat", _stdin="y"))


def test_one_part_is_left_as_it_is():
    part = StringCommand("mkswap", "/dev/x")
    assert roundtrips.one_command(part) is part


def test_fake_host_reads_through_roundtrips(monkeypatch):
    from operations import mounts
    fake = use_fake_host(monkeypatch, mounts, {mounts.Mounts: {"/mnt": {}}})
    assert roundtrips.read(mounts.Mounts) == {"/mnt": {}}
    assert fake.noops == []


def test_a_batch_gives_each_fact_what_it_would_read_alone(tmp_path):
    """The batch command run by a real shell: each part's output goes to its own fact."""
    from operations.mounts import Mounts
    from operations.target import FileText, PathsState

    class NeedsAbsentProgram(Mounts):
        def requires_command(self):
            return "tabula-no-such-program"

    (tmp_path / "a.nix").write_text("{ }\n")
    requests = [(NeedsAbsentProgram, {}), (Mounts, {}), (PathsState, {"paths": [str(tmp_path / "a.nix"), str(tmp_path / "none")]}),
                (FileText, {"path": str(tmp_path / "a.nix")}),
                (FileText, {"path": str(tmp_path / "none")})]          # absent: the fact's default
    batch = roundtrips.FactBatch().command(commands=[roundtrips._fact_command(f, k) for f, k in requests])
    out = subprocess.run(["sh", "-c", batch], capture_output=True, text=True).stdout.splitlines()
    sections = roundtrips.FactBatch().process(out)
    assert [status for status, _ in sections] == [0, 0, 0, 0, 0]
    values = [roundtrips._processed(f, k, lines) for (f, k), (_, lines) in zip(requests, sections)]
    assert values[0] == {}                                           # its program is missing: the default
    values, requests = values[1:], requests[1:]
    alone = []
    for fact, kwargs in requests:
        command = fact().command(**kwargs)
        command = command if isinstance(command, str) else command.get_raw_value()
        lines = subprocess.run(["sh", "-c", command], capture_output=True, text=True).stdout.splitlines()
        alone.append(fact().process(lines) if lines else fact().default())
    assert values == alone
    assert values[2] == "{ }\n" and values[3] is None and list(values[1]) == [str(tmp_path / "a.nix")]
    assert "/proc" in values[0]


def test_a_failing_part_is_read_again_alone(monkeypatch):
    class Host:
        name = "install-target"
        state = FakeState()
        reads = []

        def get_fact(self, fact, **kwargs):
            self.reads.append(fact.__name__)
            if fact is roundtrips.FactBatch:
                return [(0, ["x"]), (2, [])]
            return "alone"

    monkeypatch.setattr(roundtrips, "host", Host())
    new_run_state(monkeypatch)
    assert roundtrips.read_many([(Counted, {"path": "/a"}), (Counted, {"path": "/b"})]) == ["x", "alone"]
    assert Host.reads == ["FactBatch", "Counted"]


def test_output_without_a_final_newline_keeps_its_last_line():
    batch = roundtrips.FactBatch().command(commands=["printf 'a\\nb'", "echo c"])
    out = subprocess.run(["sh", "-c", batch], capture_output=True, text=True).stdout.splitlines()
    assert roundtrips.FactBatch().process(out) == [(0, ["a", "b"]), (0, ["c"])]


def test_parts_run_in_the_batch_shell_unless_they_may_exit_or_change_it():
    # No subshell (a process each, ~30 ms on a slow target) for a plain part; a part that exits,
    # cd's or sets shell options gets its own, so the parts after it still run as before.
    assert roundtrips.group("cat /proc/swaps") == "{ cat /proc/swaps\n}"
    assert roundtrips.group("udevadm settle; exit 1").startswith("( ")
    parts = ["echo $$", "cd / && exit 3", "set -e; false; echo same shell", "echo $$; pwd", "x=1; echo ends;"]
    batch = roundtrips.FactBatch().command(commands=parts)
    out = subprocess.run(["sh", "-c", batch], capture_output=True, text=True, cwd="/tmp").stdout.splitlines()
    sections = roundtrips.FactBatch().process(out)
    assert [status for status, _ in sections] == [0, 3, 1, 0, 0]
    assert sections[0][1][0] == sections[3][1][0]          # the same process: no fork for plain parts
    assert sections[3][1][1] == "/tmp"                      # the cd stayed in its subshell
    assert sections[4][1] == ["ends"]                       # a trailing ";" is fine in a group


def test_a_stock_pyinfra_operation_invalidates_the_kept_facts(tmp_path, monkeypatch):
    """A real pyinfra run on @local: a Tabula operation reads a file, a stock ``server.shell``
    changes it, the next Tabula operation must see the change. At planning the stock operation's
    planned change throws the facts away too (the file is read again, still unchanged)."""
    from pyinfra import host as context_host
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api.connect import connect_all
    from pyinfra.api.operation import add_op
    from pyinfra.api.operations import run_ops
    from pyinfra.operations import server
    from operations.target import FileText

    monkeypatch.setattr(roundtrips, "host", context_host)
    new_run_state(monkeypatch)
    seen, reads = [], []

    @roundtrips.operation()
    def look(path, label):
        seen.append((label, bool(context_host.state.is_executing), roundtrips.read(FileText, path=path)))
        yield from ()

    path = tmp_path / "file"
    path.write_text("one\n")
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    local = state.inventory.get_host("@local")
    get_fact = local.get_fact
    monkeypatch.setattr(local, "get_fact", lambda fact, **kw: reads.append(fact.__name__) or get_fact(fact, **kw))
    add_op(state, look, path=str(path), label="before")
    add_op(state, server.shell, commands=[f"echo two > {path}"])
    add_op(state, look, path=str(path), label="after")
    run_ops(state)
    assert seen == [("before", False, "one\n"), ("after", False, "one\n"),
                    ("before", True, "one\n"), ("after", True, "two\n")]
    # planning: read, thrown away after the stock op's planned change, read again; execution:
    # the first read is still true (nothing ran yet), the second follows the stock op's command
    assert reads == ["FileText", "FileText", "FileText"]
