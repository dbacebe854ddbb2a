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


def test_operation_command_runs_for_both_key_types(monkeypatch, tmp_path):
    """The op's own command line, run by a real shell: an empty bits argument must stay in place."""
    from operations import persist
    from tests.unit.pyinfra_fake import run_op

    directory = tmp_path / "persist" / "etc" / "ssh"
    for key_type, bits in (("ed25519", None), ("rsa", 1024)):
        commands, _, _ = run_op(monkeypatch, persist, persist.ssh_host_key, {persist.PathExists: False},
                                directory=str(directory), key_type=key_type, bits=bits, comment="root@test")
        (command,) = commands
        result = subprocess.run(command, shell=True, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (directory / f"ssh_host_{key_type}_key.pub").read_text().startswith(f"ssh-{key_type} ")
