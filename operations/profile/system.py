"""
The system nodes of a profile: what persists (the impermanence module's view) and the NixOS
settings (host, user, SSH access, remote unlock).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import field_validator, model_validator

from operations.profile.common import _Node

_AUTHORIZED_KEY_RE = re.compile(r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
                                r" [A-Za-z0-9+/]{20,}={0,3}( [^\n]*)?")
_HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class Persistence(_Node):
    """The impermanence module's view: where state persists, and what is kept there.

    An entry may be a list (a var such as ``${persist_directories}``): its items are added in
    its place, so inventory data can add paths without editing the profile."""

    root: str = "/persist"
    """The persistent root: where state persists (impermanence's ``environment.persistence`` key)."""
    directories: list[str] = []
    """Directories kept there (a list var such as ``${persist_directories}`` adds its items)."""
    files: list[str] = []
    """Files kept there (a list var such as ``${persist_files}`` adds its items)."""

    @field_validator("directories", "files", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        flat: list = []
        for item in v:
            flat.extend(item if isinstance(item, list) else [item])
        return list(dict.fromkeys(flat))        # once each, in order

    @field_validator("root", "directories", "files")
    @classmethod
    def _absolute(cls, v: Any) -> Any:
        for path in v if isinstance(v, list) else [v]:
            if not isinstance(path, str) or not path.startswith("/") or (path != "/" and path.endswith("/")):
                raise ValueError(f"{path!r} is not an absolute path without a trailing '/'")
        return v


class NixosSettings(_Node):
    hostname: str
    """The host name (also: the host hash of the temproot profiles' labels and ``networking.hostId``)."""
    user: str
    """The login user (not root)."""
    timezone: str = "UTC"
    """``time.timeZone``."""
    locale: str = "en_US.UTF-8"
    """``i18n.defaultLocale``."""
    state_version: str = "24.11"
    """``system.stateVersion``."""
    system: str = "x86_64-linux"
    """The flake's system."""
    hardware_module: str | None = None
    """nixos-hardware module name, e.g. ``asus-zephyrus-gu605my``; none: none; ``auto``: chosen from DMI."""
    user_groups: list[str] = ["wheel"]
    """The user's groups."""
    extra_config: str | None = None
    """Name of a template under ``templates/`` (or a path) with host extras, imported by configuration.nix."""
    unfree_packages: list[str] = []
    """Unfree packages the configuration may install, by name (``lib.getName``): nixpkgs refuses to evaluate any
    other unfree package, so nothing unfree comes in unnoticed."""

    authorized_keys: list[str] = []
    """Public keys (one ``type base64 [comment]`` line each) that may log in over SSH as the user."""
    root_authorized_keys: list[str] = []
    """Public keys that may log in as root (by key only)."""
    ssh_password_login: bool = False
    """sshd's ``PasswordAuthentication``."""
    headless: bool = False
    """A machine without a console (a server): SSH is the only way in, so it needs a key or password login."""
    remote_unlock: bool = False
    """Unlock the encrypted storage over SSH in the initrd (systemd stage 1), with a host key of its own and the
    authorized keys above."""
    remote_unlock_port: int = 2222
    """The port of the initrd's sshd."""
    remote_unlock_modules: list[str] = []
    """The network card's driver (``lspci -k``), for the initrd."""
    hibernate: bool = False
    """Hibernate to the profile's swap and resume from it at boot: ``boot.resumeDevice`` (a btrfs swapfile's
    filesystem with its ``resume_offset``, or a swap partition by partlabel), ZFS's hibernation allowed with no
    forced import; the root is rolled back only after the initrd has tried to resume."""

    @field_validator("authorized_keys", "root_authorized_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for key in v:
            if not isinstance(key, str) or not _AUTHORIZED_KEY_RE.fullmatch(key.strip()):
                raise ValueError(f"not an SSH public key line: {str(key)[:40]!r} (want e.g. 'ssh-ed25519 AAAA... user@host')")
        return [key.strip() for key in v]

    @model_validator(mode="after")
    def _someone_can_log_in(self) -> "NixosSettings":
        keys = self.authorized_keys or self.root_authorized_keys
        if self.headless and not keys and not self.ssh_password_login:
            raise ValueError("nobody could log in to this headless machine after the install: no SSH key and SSH "
                             "password login is off. Give the user's public keys in tabula_vars['authorized_keys'] "
                             "(or tabula_vars['ssh_password_login']=true)")
        if self.remote_unlock and not keys:
            raise ValueError("remote_unlock needs an SSH key to unlock with: set tabula_vars['authorized_keys']")
        return self

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not _HOSTNAME_RE.match(v):
            raise ValueError(f"invalid host name {v!r}: 1-63 lower-case letters, digits and '-', no leading/trailing '-'")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v) or v == "root":
            raise ValueError(f"invalid user name {v!r}: a lower-case login name other than root")
        return v
