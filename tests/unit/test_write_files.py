"""nixos.write_files_command run by a real shell: every file lands with its mode, in its folder,
over older content, with quotes and spaces in names and text kept as they are."""
import os
import subprocess

from operations.target import write_files_command


def test_files_land_whole_with_their_mode(tmp_path):
    target = tmp_path / "etc" / "nixos"
    target.mkdir(parents=True)
    (target / "flake.nix").write_text("old")
    files = {"flake.nix": "{ }\n", "modules/b c.nix": "x'y \"z\" $HOME\n", "empty.nix": ""}
    command = write_files_command(str(target), files, mode="644")
    stdin = "".join(line + "\n" for line in command.connector_arguments["_stdin"])
    run = subprocess.run(command.get_raw_value(), shell=True, input=stdin, text=True, capture_output=True)
    assert run.returncode == 0, run.stderr
    for name, text in files.items():
        assert (target / name).read_text() == text
        assert oct(os.stat(target / name).st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in target.iterdir()) == ["empty.nix", "flake.nix", "modules"]   # no staging left
    assert "{ }" not in command.get_raw_value()           # contents travel on stdin only
