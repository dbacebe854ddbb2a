"""The run (operations.run): a fact is read once until an operation yields a command; one step,
one command; facts read together in one round trip."""
import subprocess

import pytest
from pyinfra.api import FactBase, QuoteString, StringCommand

from operations import factbatch
from operations import run as runs
from operations.run import Run
from tests.unit.pyinfra_fake import FakeState, fake_run


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
def counting():
    return Run(CountingHost())


def test_a_fact_is_read_once_until_a_command_is_yielded(counting):
    @runs.operation()
    def step(run, path):
        first = run.read(Counted, path=path)
        assert run.read(Counted, path=path) == first          # kept: no second round trip
        yield StringCommand("touch", path)
        assert run.read(Counted, path=path) != first          # the command may change it: read again

    assert counting.read(Counted, path="/b") == 1
    list(step._inner(counting, "/a"))
    assert [kwargs["path"] for _, kwargs in counting.host.reads] == ["/b", "/a", "/a"]
    counting.read(Counted, path="/b")                         # forgotten at the yield
    assert len(counting.host.reads) == 4


def test_an_operation_without_commands_keeps_the_facts(counting):
    @runs.operation()
    def nothing_to_do(run, path):
        run.read(Counted, path=path)
        return
        yield

    list(nothing_to_do._inner(counting, "/a"))
    list(nothing_to_do._inner(counting, "/a"))
    assert len(counting.host.reads) == 1


def test_list_arguments_are_keys_too(counting):
    counting.read(Counted, path=["/a", "/b"])
    counting.read(Counted, path=["/a", "/b"])
    counting.read(Counted, path=["/a"])
    assert len(counting.host.reads) == 2


def test_two_runs_keep_nothing_in_common():
    # two hosts of one pyinfra run: the same fact read on each is each host's own
    first, second = fake_run({Counted: "first host"}), fake_run({Counted: "second host"})
    assert first.read(Counted, path="/a") == "first host" and second.read(Counted, path="/a") == "second host"
    first.record_fresh("/mnt", True)
    assert first.is_fresh("/mnt/x") and not second.is_fresh("/mnt/x")


def test_one_command_runs_in_order_and_stops_at_the_first_failure(tmp_path):
    marker = tmp_path / "a b"
    command = runs.one_command(StringCommand("touch", QuoteString(str(marker))), StringCommand("false"),
                                     StringCommand("rm", QuoteString(str(marker))))
    assert not str(command).startswith("sh -c ")        # pyinfra's own shell runs it: no second one
    assert subprocess.run(["sh", "-c", command.get_raw_value()]).returncode != 0
    assert marker.exists()


def test_one_command_keeps_stdin_and_refuses_two_different_ones():
    single = runs.one_command(StringCommand("true"), StringCommand("cat", _stdin="x"))
    assert single.connector_arguments["_stdin"] == "x"
    with pytest.raises(ValueError, match="_stdin"):
        runs.one_command(StringCommand("cat", _stdin="x"), StringCommand("cat", _stdin="y"))


def test_one_part_is_left_as_it_is():
    part = StringCommand("mkswap", "/dev/x")
    assert runs.one_command(part) is part


def test_fake_host_reads_through_the_run():
    from operations import mounts
    run = fake_run({mounts.Mounts: {"/mnt": {}}})
    assert run.read(mounts.Mounts) == {"/mnt": {}}
    assert run.host.noops == []


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
    batch = runs.FactBatch()
    out = subprocess.run(["sh", "-c", batch.command(requests=requests)], capture_output=True, text=True).stdout.splitlines()
    assert [status for status, _ in factbatch.split_sections(out)] == [0, 0, 0, 0, 0]
    values = batch.process(out)
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


class Shell(FactBase):
    """A fact that runs the given shell text (for the batch's own tests)."""

    def command(self, text):
        return text

    def process(self, output):
        return list(output)


def test_a_failing_part_is_read_again_alone(monkeypatch):
    class Host:
        name = "install-target"
        state = FakeState()
        reads = []

        def get_fact(self, fact, **kwargs):
            self.reads.append(fact.__name__)
            if fact is runs.FactBatch:
                return ["x", runs.FAILED]
            return "alone"

    run = Run(Host())
    assert run.read_many([(Counted, {"path": "/a"}), (Counted, {"path": "/b"})]) == ["x", "alone"]
    assert Host.reads == ["FactBatch", "Counted"]


def test_a_failing_part_of_a_batch_in_a_real_shell():
    class Fails(FactBase):
        def command(self):
            return "echo partial; false"

    batch = runs.FactBatch()
    out = subprocess.run(["sh", "-c", batch.command(requests=[(Fails, {}), (Shell, {"text": "echo ok"})])],
                         capture_output=True, text=True).stdout.splitlines()
    assert batch.process(out) == [runs.FAILED, ["ok"]]


def batch_sections(texts: list[str], cwd: str | None = None) -> list[tuple[int, list[str]]]:
    command = runs.FactBatch().command(requests=[(Shell, {"text": text}) for text in texts])
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=cwd).stdout.splitlines()
    return factbatch.split_sections(out)


def test_output_without_a_final_newline_keeps_its_last_line():
    assert batch_sections(["printf 'a\\nb'", "echo c"]) == [(0, ["a", "b"]), (0, ["c"])]


def test_parts_run_in_the_batch_shell_unless_they_may_exit_or_change_it():
    # No subshell (a process each, ~30 ms on a slow target) for a plain part; a part that exits,
    # cd's or sets shell options gets its own, so the parts after it still run as before.
    assert factbatch.group("cat /proc/swaps") == "{ cat /proc/swaps\n}"
    assert factbatch.group("udevadm settle; exit 1").startswith("( ")
    parts = ["echo $$", "cd / && exit 3", "set -e; false; echo same shell", "echo $$; pwd", "x=1; echo ends;"]
    sections = batch_sections(parts, cwd="/tmp")
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

    seen, reads = [], []

    @runs.operation()
    def look(run, path, label):
        seen.append((label, bool(context_host.state.is_executing), run.read(FileText, path=path)))
        yield from ()

    path = tmp_path / "file"
    path.write_text("one\n")
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    local = state.inventory.get_host("@local")
    get_fact = local.get_fact
    monkeypatch.setattr(local, "get_fact", lambda fact, **kw: reads.append(fact.__name__) or get_fact(fact, **kw))
    run = Run(local)
    add_op(state, look, run, path=str(path), label="before")
    add_op(state, server.shell, commands=[f"echo two > {path}"])
    add_op(state, look, run, path=str(path), label="after")
    run_ops(state)
    assert seen == [("before", False, "one\n"), ("after", False, "one\n"),
                    ("before", True, "one\n"), ("after", True, "two\n")]
    # planning: read, thrown away after the stock op's planned change, read again; execution:
    # the first read is still true (nothing ran yet), the second follows the stock op's command
    assert reads == ["FileText", "FileText", "FileText"]
