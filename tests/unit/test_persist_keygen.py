"""SSH host keys: generated beside the target name and moved in last, an existing key never replaced."""

import subprocess

from operations.persist import KEYGEN_SCRIPT


def keygen(directory, key, key_type="ed25519", bits=""):
    return subprocess.run(["sh", "-c", KEYGEN_SCRIPT, "keygen", str(directory), str(key), key_type, bits, "root@test"],
                          capture_output=True, text=True)


def test_key_is_made_with_its_public_half_and_no_leftovers(tmp_path):
    directory = tmp_path / "etc" / "ssh"
    key = directory / "ssh_host_ed25519_key"
    assert keygen(directory, key).returncode == 0
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (directory / "ssh_host_ed25519_key.pub").read_text().startswith("ssh-ed25519 ")
    assert sorted(p.name for p in directory.iterdir()) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]


def test_existing_key_is_kept_and_stale_temp_folders_cleared(tmp_path):
    directory = tmp_path / "ssh"
    key = directory / "ssh_host_rsa_key"
    assert keygen(directory, key, "rsa", "1024").returncode == 0
    before = key.read_bytes()
    (directory / ".keygen.stale").mkdir()          # what a killed run leaves behind
    assert keygen(directory, key, "rsa", "1024").returncode == 0
    assert key.read_bytes() == before
    assert not list(directory.glob(".keygen.*"))


def test_operation_command_makes_both_key_types_in_one_round_trip(monkeypatch, tmp_path):
    """The op's one command, run by a real shell: an empty bits argument must stay in place."""
    from operations import persist
    from tests.unit.pyinfra_fake import run_op

    import re

    etc = tmp_path / "persist" / "etc"
    commands, _, _ = run_op(monkeypatch, persist, persist.host_identity, {},
                            etc=str(etc), keys=[("ed25519", None), ("rsa", 1024)], comment="root@test")
    (command,) = commands
    result = subprocess.run(command, shell=True, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for key_type in ("ed25519", "rsa"):
        assert (etc / "ssh" / f"ssh_host_{key_type}_key.pub").read_text().startswith(f"ssh-{key_type} ")
    assert re.fullmatch(r"[0-9a-f]{32}\n", (etc / "machine-id").read_text())
    assert (etc / "machine-id").stat().st_mode & 0o777 == 0o444


def test_only_missing_keys_are_made(monkeypatch, tmp_path):
    from operations import persist
    from tests.unit.pyinfra_fake import run_op

    file = {"type": "file", "mode": "600", "user": "root", "sha256": "x"}
    present = {f"{tmp_path}/ssh/ssh_host_ed25519_key": file, f"{tmp_path}/machine-id": {**file, "mode": "444"}}
    commands, _, _ = run_op(monkeypatch, persist, persist.host_identity, {persist.PathsState: present},
                            etc=str(tmp_path), keys=[("ed25519", None), ("rsa", 1024)])
    (command,) = commands
    assert "rsa" in command and "ed25519" not in command and "machine-id" not in command
    present[f"{tmp_path}/ssh/ssh_host_rsa_key"] = file
    commands, _, fake = run_op(monkeypatch, persist, persist.host_identity, {persist.PathsState: present},
                               etc=str(tmp_path), keys=[("ed25519", None), ("rsa", 1024)])
    assert commands == [] and "already exist" in fake.noops[0]


def test_secrets_written_from_stdin_private_and_never_replaced(monkeypatch, tmp_path):
    """The secrets op's command run by a real shell: values only on stdin, files 0600 in a 0700 dir."""
    import os

    from operations import persist
    from operations.secrets import Secret
    from tests.unit.pyinfra_fake import run_op

    directory = tmp_path / "persist" / "secrets"
    values = {"root-password": Secret("$6$salt$rootvalue", "root"), "sean-password": Secret("$6$salt$userval", "user")}
    commands, stdins, _ = run_op(monkeypatch, persist, persist.secrets, {}, directory=str(directory), files=values)
    (command,), (stdin,) = commands, stdins
    assert "rootvalue" not in command and "userval" not in command
    result = subprocess.run(command, shell=True, input="".join(line + "\n" for line in stdin),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (directory / "root-password").read_text() == "$6$salt$rootvalue\n"
    assert (directory / "sean-password").read_text() == "$6$salt$userval\n"
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert {os.stat(f).st_mode & 0o777 for f in directory.iterdir()} == {0o600}
    assert sorted(p.name for p in directory.iterdir()) == ["root-password", "sean-password"]

    # A present file is kept: only the missing one is written.
    state = {str(directory): {"type": "directory", "mode": "700", "user": "root", "sha256": ""},
             f"{directory}/root-password": {"type": "file", "mode": "600", "user": "root", "sha256": "x"}}
    commands, stdins, _ = run_op(monkeypatch, persist, persist.secrets, {persist.PathsState: state},
                                 directory=str(directory), files=values)
    assert stdins == [["$6$salt$userval"]] and "root-password" not in commands[0]


def test_initrd_key_op_makes_a_private_folder_and_is_kept_on_rerun(monkeypatch, tmp_path):
    """The initrd host key, by the op's own command in a real shell: folder 0700, key 0600; with
    the key in place the op has nothing to do."""
    from operations import persist, target
    from tests.unit.pyinfra_fake import run_op

    key = tmp_path / "remote" / "etc" / "secrets" / "initrd" / "ssh_host_ed25519_key"
    commands, _, _ = run_op(monkeypatch, persist, persist.initrd_host_key, {target.PathsState: {}},
                            path=str(key), comment="initrd@test")
    assert len(commands) == 1
    assert subprocess.run(commands[0], shell=True, capture_output=True, text=True).returncode == 0
    assert (key.parent.stat().st_mode & 0o777) == 0o700
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (key.parent / "ssh_host_ed25519_key.pub").read_text().split()[2] == "initrd@test"
    present = {str(key.parent): {"type": "directory", "mode": "700", "user": "root", "sha256": ""},
               str(key): {"type": "file", "mode": "600", "user": "root", "sha256": "x"}}
    commands, _, noop = run_op(monkeypatch, persist, persist.initrd_host_key, {target.PathsState: present},
                               path=str(key), comment="initrd@test")
    assert commands == [] and "already exists in a 0700 folder" in noop.noops[-1]


def test_a_machine_id_made_by_hand_is_kept_and_its_mode_set(monkeypatch, tmp_path):
    """The guide writes /persist/etc/machine-id with a shell redirect (0644): an adopted machine's
    deploy keeps its content and sets 0444, which verify wants (seen on a guide-made machine)."""
    from operations import persist
    from tests.unit.pyinfra_fake import run_op

    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tmp_path / "machine-id").chmod(0o644)
    key = {"type": "file", "mode": "600", "user": "root", "sha256": "x"}
    present = {f"{tmp_path}/ssh/ssh_host_ed25519_key": key,
               f"{tmp_path}/machine-id": {"type": "file", "mode": "644", "user": "root", "sha256": "y"}}
    commands, _, _ = run_op(monkeypatch, persist, persist.host_identity, {persist.PathsState: present},
                            etc=str(tmp_path), keys=[("ed25519", None)])
    (command,) = commands
    assert subprocess.run(command, shell=True).returncode == 0
    assert (tmp_path / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert (tmp_path / "machine-id").stat().st_mode & 0o777 == 0o444
