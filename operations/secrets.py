"""
Secrets from the controller: read from an environment variable or a file outside the repo,
handed to commands on stdin only (pyinfra's ``_stdin``), never put in argv, logs or files.

    TABULA_LUKS_PASSPHRASE / TABULA_LUKS_PASSPHRASE_FILE      LUKS passphrase
    TABULA_ZFS_KEY / TABULA_ZFS_KEY_FILE                      ZFS native encryption passphrase
    TABULA_ROOT_PASSWORD_HASH / ..._FILE                      root's password hash (mkpasswd -m sha-512)
    TABULA_USER_PASSWORD_HASH / ..._FILE                      the user's password hash
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from operations.errors import TabulaError

REPO_ROOT = Path(__file__).resolve().parent.parent


class SecretError(TabulaError, ValueError):
    pass


class Secret:
    """A value that does not print itself: repr/str show the source, never the content."""

    def __init__(self, value: str, source: str):
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"<secret from {self.source}>"

    __str__ = __repr__


def read_secret(name: str, required: bool = True) -> Secret | None:
    """Read TABULA_<name> or the file named by TABULA_<name>_FILE (a 0600/0400 file outside the repo)."""
    env, env_file = f"TABULA_{name}", f"TABULA_{name}_FILE"
    if os.environ.get(env):
        return Secret(os.environ[env], f"${env}")
    path_text = os.environ.get(env_file)
    if path_text:
        path = Path(path_text).expanduser()
        try:
            mode = path.stat().st_mode
            value = path.read_text()
        except OSError as exc:
            raise SecretError(f"{env_file}={path}: cannot read the file ({exc.strerror}); check the path and its permissions") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"{env_file}={path}: the file is readable by others (mode {stat.S_IMODE(mode):o}); run chmod 600 {path}")
        if path.resolve().is_relative_to(REPO_ROOT):
            raise SecretError(f"{env_file}={path}: keep secret files outside the repository")
        value = value.rstrip("\n")
        if not value:
            raise SecretError(f"{env_file}={path}: the file is empty")
        return Secret(value, f"${env_file}")
    if required:
        raise SecretError(f"no {name.lower().replace('_', ' ')}: set {env} or {env_file} on the controller")
    return None


def read_secrets(wanted: dict[str, bool]) -> Mapping[str, Secret | None]:
    """Every secret a run needs, read once, in order: ``{name: required}`` -> ``{name: Secret or
    None}`` (None: not set, and not required). The stages read them before the first step that
    uses one and hand them to the layers in the run; nothing else reads the environment."""
    return MappingProxyType({name: read_secret(name, required=required) for name, required in wanted.items()})
