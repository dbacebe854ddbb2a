"""
Seed the persistent file system at install time, so the guide's post-install steps are done:
password hashes in ``<persist>/secrets`` (0700, files 0600), SSH host keys (ed25519 and rsa 4096)
in ``<persist>/etc/ssh``, ``<persist>/etc/machine-id`` and a copy of /etc/nixos.

    from operations import persist
    persist.apply(profile, settings)

Nothing that exists is ever replaced: a re-run keeps every key, hash and machine-id. Password
hashes come from the controller (TABULA_ROOT_PASSWORD_HASH, TABULA_USER_PASSWORD_HASH) and go
to the target on stdin only.
"""

from __future__ import annotations

import re

from pyinfra import host, logger
from pyinfra.api import QuoteString, StringCommand, operation
from pyinfra.facts.files import Directory

from operations.errors import TabulaError
from operations.nixos import CONFIG_DIR, ROOT, DirectoryDigest, PathExists
from operations.profile import Profile
from operations.secrets import Secret, read_secret

# crypt(5) hashes as mkpasswd and NixOS's hashedPassword accept them: yescrypt ($y$), sha-512
# ($6$), sha-256 ($5$), bcrypt ($2b$...), scrypt ($7$), gost-yescrypt ($gy$).
_CRYPT_RE = re.compile(r"^\$(y|gy|7|6|5|2[abxy]|1)\$[A-Za-z0-9./$=,+-]{8,}$")


def check_password_hash(secret: Secret) -> str:
    """The hash, or TabulaError when the value is not a crypt hash (never echoing the value)."""
    value = secret.reveal().strip()
    if not _CRYPT_RE.match(value):
        raise TabulaError(
            f"{secret.source}: not a password hash. Give a crypt hash (mkpasswd -m sha-512 or "
            "mkpasswd -m yescrypt), never the plaintext password"
        )
    return value


@operation()
def secrets_directory(path: str):
    """
    The secrets directory, mode 0700 root:root (created only if missing; the mode is enforced).

    + path: e.g. /mnt/persist/secrets

    .. code:: python

        persist.secrets_directory("/mnt/persist/secrets")
    """
    info = host.get_fact(Directory, path=path)
    if info and str(info.get("mode")) == "700" and info.get("user") == "root":
        host.noop(f"{path} exists with mode 0700")
        return
    yield StringCommand("install", "-d", "-m", "0700", "-o", "root", "-g", "root", QuoteString(path))


@operation()
def secret_file(path: str, secret: Secret):
    """
    A file of mode 0600 holding a secret, written from stdin. An existing file is never replaced.

    + path: where the secret goes, e.g. /mnt/persist/secrets/root-password
    + secret: the value (a ``Secret``; it is never put in argv or output)

    .. code:: python

        persist.secret_file("/mnt/persist/secrets/root-password", read_secret("ROOT_PASSWORD_HASH"))
    """
    if host.get_fact(PathExists, path=path):
        host.noop(f"{path} already exists (kept as it is)")
        return
    script = 'umask 077 && cat > "$1.tmp" && chmod 600 "$1.tmp" && mv "$1.tmp" "$1"'
    yield StringCommand("sh", "-c", QuoteString(script), "secret", QuoteString(path),
                        _stdin=secret.reveal() + "\n")


@operation()
def ssh_host_key(directory: str, key_type: str, bits: int | None = None, comment: str = ""):
    """
    An SSH host key pair generated on the target; an existing key is never replaced.

    + directory: e.g. /mnt/persist/etc/ssh
    + key_type: ed25519 or rsa
    + bits: key size (rsa)
    + comment: the key's comment, e.g. root@zephyrus

    .. code:: python

        persist.ssh_host_key("/mnt/persist/etc/ssh", "rsa", bits=4096)
    """
    key = f"{directory}/ssh_host_{key_type}_key"
    if host.get_fact(PathExists, path=key):
        host.noop(f"{key} already exists (kept as it is)")
        return
    yield StringCommand("sh", "-c", QuoteString(KEYGEN_SCRIPT), "keygen", QuoteString(directory), QuoteString(key),
                        QuoteString(key_type), QuoteString(str(bits or "")), QuoteString(comment))


# The key is generated in a private folder beside it and moved into place last, private key
# last: an interrupted run (a cut SSH link leaves ssh-keygen running) never leaves a half-written
# key under the real name, and a key that appeared meanwhile is kept, never overwritten.
KEYGEN_SCRIPT = (
    'set -e; install -d -m 0755 "$1"; rm -rf "$1"/.keygen.*; '
    'tmp=$(mktemp -d "$1/.keygen.XXXXXX"); '
    'ssh-keygen -q -t "$3" ${4:+-b "$4"} -N "" -C "$5" -f "$tmp/key"; '
    'if [ ! -e "$2" ]; then mv "$tmp/key.pub" "$2.pub"; mv "$tmp/key" "$2"; fi; '
    'rm -rf "$tmp"'
)


@operation()
def machine_id(path: str):
    """
    A machine-id (32 lower-case hex digits), created once and never replaced.

    + path: e.g. /mnt/persist/etc/machine-id

    .. code:: python

        persist.machine_id("/mnt/persist/etc/machine-id")
    """
    if host.get_fact(PathExists, path=path):
        host.noop(f"{path} already exists (kept as it is)")
        return
    script = ('mkdir -p "$(dirname "$1")" && umask 022 && '
              'tr -d "-" < /proc/sys/kernel/random/uuid > "$1.tmp" && chmod 444 "$1.tmp" && mv "$1.tmp" "$1"')
    yield StringCommand("sh", "-c", QuoteString(script), "machine-id", QuoteString(path))


@operation()
def config_copy(source: str, dest: str):
    """
    A copy of the NixOS configuration (``cp -a``), refreshed when the source's files differ.

    + source: e.g. /mnt/etc/nixos
    + dest: e.g. /mnt/persist/etc/nixos

    .. code:: python

        persist.config_copy("/mnt/etc/nixos", "/mnt/persist/etc/nixos")
    """
    wanted = host.get_fact(DirectoryDigest, path=source)
    present = host.get_fact(DirectoryDigest, path=dest)
    if wanted and wanted == present:
        host.noop(f"{dest} already holds the same files as {source}")
        return
    yield StringCommand("sh", "-c", QuoteString('rm -rf "$2" && mkdir -p "$(dirname "$2")" && cp -a "$1" "$2"'),
                        "copy", QuoteString(source), QuoteString(dest))


def password_hashes(profile: Profile, required: bool) -> dict[str, str]:
    """{file name in secrets/: hash} from the controller, checked to be crypt hashes.

    An install needs both (``users.mutableUsers = false``: without them nobody can log in); a run
    that does not install may leave them out and seed them on the run that installs.
    """
    hashes = {}
    for filename, secret_name in (("root-password", "ROOT_PASSWORD_HASH"),
                                  (f"{profile.nixos.user}-password", "USER_PASSWORD_HASH")):
        secret = read_secret(secret_name, required=required)
        if secret is None:
            logger.warning(f"TABULA_{secret_name} is not set: {filename} is not seeded (needed before installing)")
            continue
        hashes[filename] = check_password_hash(secret)
    return hashes


def apply(profile: Profile, settings=None) -> None:
    persist = f"{ROOT}{profile.persistence.root}"
    # Read and checked before anything runs: a plaintext value (or a missing one when this run
    # installs) stops the run here.
    hashes = password_hashes(profile, required=getattr(settings, "install", True))
    secrets_directory(f"{persist}/secrets", name=f"{persist}/secrets (0700)")
    for filename, value in hashes.items():
        secret_file(f"{persist}/secrets/{filename}", Secret(value, filename),
                    name=f"{persist}/secrets/{filename} (0600)")
    ssh_dir = f"{persist}/etc/ssh"
    comment = f"root@{profile.nixos.hostname}"
    ssh_host_key(ssh_dir, "ed25519", comment=comment, name=f"{ssh_dir}/ssh_host_ed25519_key")
    ssh_host_key(ssh_dir, "rsa", bits=4096, comment=comment, name=f"{ssh_dir}/ssh_host_rsa_key")
    machine_id(f"{persist}/etc/machine-id", name=f"{persist}/etc/machine-id")
    config_copy(CONFIG_DIR, f"{persist}/etc/nixos", name=f"{persist}/etc/nixos (copy of {CONFIG_DIR})")
