"""
The persist layer: the persistent file system seeded at install time, so the guide's
post-install steps are done: password hashes in ``<persist>/secrets`` (0700, files 0600), SSH
host keys (ed25519 and rsa 4096) in ``<persist>/etc/ssh``, ``<persist>/etc/machine-id`` and a
copy of /etc/nixos. Where they live is this layer's (``paths``): the NixOS files name the same.

Nothing that exists is ever replaced: a re-run keeps every key, hash and machine-id. Password
hashes come from the controller (TABULA_ROOT_PASSWORD_HASH, TABULA_USER_PASSWORD_HASH) and go
to the target on stdin only.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass

from pyinfra import logger
from pyinfra.api import QuoteString, StringCommand

from operations.adoptlit import config_reads, config_texts, configured_persistence
from operations.contract import Layer, Target
from operations.errors import TabulaError
from operations.nixlit import DeviceIds, NixFragments
from operations.profile import Profile
from operations.run import FactRequest, Run, one_command, operation
from operations.secrets import Secret
from operations.target import CONFIG_DIR, INSTALL_ROOT, DirectoryDigest, PathsState, under

# crypt(5) hashes as mkpasswd and NixOS's hashedPassword accept them: yescrypt ($y$), sha-512
# ($6$), sha-256 ($5$), bcrypt ($2b$...), scrypt ($7$), gost-yescrypt ($gy$).
_CRYPT_RE = re.compile(r"^\$(y|gy|7|6|5|2[abxy]|1)\$[A-Za-z0-9./$=,+-]{8,}$")


@dataclass(frozen=True)
class PersistPaths:
    """Where the persist stage seeds what NixOS reads at boot, in the installed system.

    + root: the persistent root (``persistence.root``, e.g. /persist)
    + secrets_dir: the password hashes' folder (0700)
    + password_files: {user name: the hashedPasswordFile NixOS reads at boot}
    + etc: the persisted /etc (SSH host keys, machine-id, a copy of the NixOS configuration)
    + initrd_host_key: the initrd sshd's own host key (remote unlock), in a 0700 folder
    """

    root: str
    secrets_dir: str
    password_files: dict[str, str]
    etc: str
    initrd_host_key: str


def paths(profile: Profile) -> PersistPaths:
    root = profile.persistence.root
    secrets_dir = f"{root}/secrets"
    return PersistPaths(root=root, secrets_dir=secrets_dir,
                        password_files={"root": f"{secrets_dir}/root-password",
                                        profile.nixos.user: f"{secrets_dir}/{profile.nixos.user}-password"},
                        etc=f"{root}/etc", initrd_host_key=f"{root}/etc/secrets/initrd/ssh_host_ed25519_key")


# The password hashes the persist stage seeds, by the secret they come from (run.secrets).
PASSWORD_SECRETS = ("ROOT_PASSWORD_HASH", "USER_PASSWORD_HASH")
HOST_KEYS = [("ed25519", None), ("rsa", 4096)]


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
def secrets(run: Run, directory: str, files: dict[str, Secret | None]):
    """
    The secrets directory (mode 0700, root) and its files (mode 0600), in one round trip; the
    values go on stdin, one line each. An existing file is never replaced.

    + run: the run (facts, what it made)
    + directory: e.g. /mnt/persist/secrets
    + files: ``{file name: Secret}`` (a ``Secret`` is never put in argv or output); None: a file
      this run has no value for (looked at all the same: what a run reads does not depend on the
      secrets it was given)

    .. code:: python

        persist.secrets(run, "/mnt/persist/secrets", {"root-password": run.secrets["ROOT_PASSWORD_HASH"]})
    """
    # Below an empty filesystem this run just made and mounted, nothing is there to read.
    state = {} if run.is_fresh(directory) else run.read(PathsState, paths=[directory, *(f"{directory}/{n}" for n in files)])
    present = state.get(directory)
    if present and present["type"] != "directory":
        raise TabulaError(f"{directory} is a {present['type']}, not a directory: move it away and run again")
    given = {n: secret for n, secret in files.items() if secret is not None}
    missing = {n: secret for n, secret in given.items() if f"{directory}/{n}" not in state}
    if present and present["mode"] == "700" and present["user"] == "root" and not missing:
        kept = f"; {', '.join(given)} kept as they are" if given else ""
        run.noop(f"{directory} exists with mode 0700{kept}")
        return
    run.tell(f"{directory} (mode 0700)" + (f" with {', '.join(missing)} (mode 0600)" if missing else ""))
    run.record_fresh(directory, False)
    yield StringCommand("sh", "-c", QuoteString(SECRETS_SCRIPT), "secrets", QuoteString(directory),
                        *[QuoteString(n) for n in missing], _stdin=[s.reveal() for s in missing.values()])


# printf is the shell's own: a value read from stdin is never in any process's argv.
SECRETS_SCRIPT = (
    'set -e; d=$1; shift; install -d -m 0700 -o root -g root "$d"; chown root:root "$d"; chmod 0700 "$d"; '
    'umask 077; for n in "$@"; do IFS= read -r v; printf "%s\\n" "$v" > "$d/$n.tmp"; chmod 600 "$d/$n.tmp"; '
    'mv "$d/$n.tmp" "$d/$n"; done'
)


@operation()
def host_identity(run: Run, etc: str, keys: list[tuple[str, int | None]], comment: str = ""):
    """
    The installed host's identity, made on the target in one round trip: SSH host key pairs in
    ``<etc>/ssh`` and ``<etc>/machine-id``. Nothing that exists is ever replaced.

    + run: the run (facts, what it made)
    + etc: e.g. /mnt/persist/etc
    + keys: ``(type, bits)`` pairs, e.g. ``[("ed25519", None), ("rsa", 4096)]``
    + comment: the keys' comment, e.g. root@zephyrus

    .. code:: python

        persist.host_identity(run, "/mnt/persist/etc", [("ed25519", None), ("rsa", 4096)], comment="root@zephyrus")
    """
    ssh_dir, machine_id = f"{etc}/ssh", f"{etc}/machine-id"
    key_paths = {key_type: f"{ssh_dir}/ssh_host_{key_type}_key" for key_type, _bits in keys}
    wanted = [*key_paths.values(), machine_id]
    state = {} if all(run.is_fresh(path) for path in wanted) else run.read(PathsState, paths=wanted)
    commands = [StringCommand("sh", "-c", QuoteString(KEYGEN_SCRIPT), "keygen", QuoteString(ssh_dir),
                              QuoteString(key_paths[key_type]), QuoteString(key_type), QuoteString(str(bits or "")),
                              QuoteString(comment))
                for key_type, bits in keys if key_paths[key_type] not in state]
    if machine_id not in state:
        commands.append(StringCommand("sh", "-c", QuoteString(MACHINE_ID_SCRIPT), "machine-id", QuoteString(machine_id)))
    # Kept as they are, but for a mode other than the profile's (a machine-id written by hand, as
    # the guide does, is 0644): the content stays, the mode is set to what verify checks.
    modes = {**{path: "600" for path in key_paths.values()}, machine_id: "444"}
    loose = {path: mode for path, mode in modes.items() if state.get(path, {}).get("type") == "file"
             and state[path]["mode"] != mode}
    commands += [StringCommand("chmod", mode, QuoteString(path)) for path, mode in loose.items()]
    if not commands:
        run.noop(f"{', '.join([*key_paths.values(), machine_id])} already exist (kept as they are)")
        return
    made = [f"SSH host key {key_type}" + (f" {bits}" if bits else "") for key_type, bits in keys if key_paths[key_type] not in state]
    made += [f"{path} kept, its mode {state[path]['mode']} set to {mode}" for path, mode in loose.items()]
    run.tell(f"in {etc}: " + ", ".join(made + (["machine-id"] if machine_id not in state else [])))
    run.record_fresh(ssh_dir, False)
    run.record_fresh(machine_id, False)
    yield one_command(*commands)


# 32 lower-case hex digits, written beside its place and renamed into it.
MACHINE_ID_SCRIPT = ('mkdir -p "$(dirname "$1")" && umask 022 && '
                     'tr -d "-" < /proc/sys/kernel/random/uuid > "$1.tmp" && chmod 444 "$1.tmp" && mv "$1.tmp" "$1"')


# The key is generated in a private folder beside it and moved into place last, private key
# last: an interrupted run (a cut SSH link leaves ssh-keygen running) never leaves a half-written
# key under the real name, and a key that appeared meanwhile is kept, never overwritten.
KEYGEN_SCRIPT = (
    'set -e; install -d -m "${6:-0755}" "$1"; rm -rf "$1"/.keygen.*; '
    'tmp=$(mktemp -d "$1/.keygen.XXXXXX"); '
    'ssh-keygen -q -t "$3" ${4:+-b "$4"} -N "" -C "$5" -f "$tmp/key"; '
    'if [ ! -e "$2" ]; then mv "$tmp/key.pub" "$2.pub"; mv "$tmp/key" "$2"; fi; '
    'rm -rf "$tmp"'
)


@operation()
def initrd_host_key(run: Run, path: str, comment: str = ""):
    """
    The host key of the initrd's SSH server (remote unlock): an ed25519 pair made once, in a
    folder of mode 0700. Never the system's host key: the initrd carrying it lies unencrypted on
    /boot, so whoever reads /boot could pose as the initrd, not as the booted system.

    + run: the run (facts, what it made)
    + path: the private key, e.g. /mnt/remote/etc/secrets/initrd/ssh_host_ed25519_key
    + comment: the key's comment

    .. code:: python

        persist.initrd_host_key(run, "/mnt/remote/etc/secrets/initrd/ssh_host_ed25519_key", comment="initrd@nas")
    """
    folder = posixpath.dirname(path)
    state = {} if run.is_fresh(path) else run.read(PathsState, paths=[folder, path])
    if path in state and state.get(folder, {}).get("mode") == "700":
        run.noop(f"{path} already exists in a 0700 folder (kept as it is)")
        return
    run.tell(f"the initrd's SSH host key {path} (ed25519, folder 0700; remote unlock)")
    run.record_fresh(folder, False)
    yield StringCommand("sh", "-c", QuoteString(KEYGEN_SCRIPT), "keygen", QuoteString(folder), QuoteString(path),
                        "ed25519", QuoteString(""), QuoteString(comment), "0700")


@operation()
def config_copy(run: Run, source: str, dest: str):
    """
    A copy of the NixOS configuration (``cp -a``), refreshed when the source's files differ.

    + run: the run (facts, what it made)
    + source: e.g. /mnt/etc/nixos
    + dest: e.g. /mnt/persist/etc/nixos

    .. code:: python

        persist.config_copy(run, "/mnt/etc/nixos", "/mnt/persist/etc/nixos")
    """
    yield from _copied_unless_same(run, source, dest, StringCommand(
        "sh", "-c", QuoteString('rm -rf "$2" && mkdir -p "$(dirname "$2")" && cp -a "$1" "$2"'),
        "copy", QuoteString(source), QuoteString(dest)),
        plan=f"copy {source} to {dest} (with the flake.lock the install wrote)")


def _copied_unless_same(run: Run, source: str, dest: str, command: StringCommand, plan: str | None = None):
    """The body of config_copy and config_restored: nothing when ``dest`` holds the same files
    as ``source`` (by digest; not read below a root this run has just made), else ``command``."""
    if not run.is_fresh(dest):
        wanted, present = run.read_many([(DirectoryDigest, {"path": source}), (DirectoryDigest, {"path": dest})])
        if wanted and wanted == present:
            run.noop(f"{dest} already holds the same files as {source}")
            return
    if plan:
        run.tell(plan)
    run.record_fresh(dest, False)
    yield command


# --- rescue -------------------------------------------------------------------------------------


@operation()
def config_restored(run: Run, source: str, dest: str):
    """
    /etc/nixos of the install root put back from its copy on the persistent root (``cp -a``),
    after a rescue restored the root: the install wrote it there, and the files must be the
    same for the install deploy to find nothing to do. Refused inside the command when the copy
    is missing or empty.

    + run: the run (facts, what it made)
    + source: the persisted copy, e.g. /mnt/persist/etc/nixos
    + dest: e.g. /mnt/etc/nixos

    .. code:: python

        persist.config_restored(run, "/mnt/persist/etc/nixos", "/mnt/etc/nixos")
    """
    # (below a root this run has just restored, empty, and mounted there is nothing to compare)
    yield from _copied_unless_same(run, source, dest, StringCommand(
        "sh", "-c", QuoteString(RESTORE_CONFIG_SCRIPT), "restore", QuoteString(source), QuoteString(dest)))


RESTORE_CONFIG_SCRIPT = (
    'if [ ! -d "$1" ] || [ -z "$(ls -A "$1")" ]; then echo "tabula: $1 is missing or empty: nothing to put back '
    'into $2; run the install deploy (deploy.py) to write it again" >&2; exit 1; fi; '
    'rm -rf "$2" && mkdir -p "$(dirname "$2")" && cp -a "$1" "$2"'
)


def password_hashes(run: Run) -> dict[str, str | None]:
    """{file name in secrets/: hash or None} from the secrets the stages read, checked to be crypt
    hashes. An install needs both (``users.mutableUsers = false``: without them nobody can log
    in); a run that does not install may leave them out and seed them on the run that installs."""
    hashes = {}
    files = paths(run.profile).password_files
    for filename, secret_name in ((posixpath.basename(files["root"]), "ROOT_PASSWORD_HASH"),
                                  (posixpath.basename(files[run.profile.nixos.user]), "USER_PASSWORD_HASH")):
        secret = run.secrets.get(secret_name)
        if secret is None:
            logger.warning(f"TABULA_{secret_name} is not set: {filename} is not seeded (needed before installing)")
        hashes[filename] = None if secret is None else check_password_hash(secret)
    return hashes


def _host_identity_paths(etc: str, keys: list[tuple[str, int | None]]) -> tuple[dict[str, str], str]:
    return {key_type: f"{etc}/ssh/ssh_host_{key_type}_key" for key_type, _bits in keys}, f"{etc}/machine-id"


def _secret_files(run: Run) -> tuple[str, list[str]]:
    folder = f"{INSTALL_ROOT}{paths(run.profile).secrets_dir}"
    return folder, [posixpath.basename(path) for path in paths(run.profile).password_files.values()]


class PersistLayer(Layer):
    name = "persist"
    absent = "nothing to persist"

    def fill(self, run: Run) -> None:
        where = paths(run.profile)
        # Checked before anything runs: a plaintext value stops the run here.
        hashes = password_hashes(run)
        secrets(run, f"{INSTALL_ROOT}{where.secrets_dir}",
                {filename: None if value is None else Secret(value, filename) for filename, value in hashes.items()},
                name="Persist secrets")
        host_identity(run, f"{INSTALL_ROOT}{where.etc}", HOST_KEYS, comment=f"root@{run.profile.nixos.hostname}",
                      name="Persist host identity")
        if run.profile.nixos.remote_unlock:
            # Before nixos-install: it copies the key into the initrd it builds.
            initrd_host_key(run, f"{INSTALL_ROOT}{where.initrd_host_key}", comment=f"initrd@{run.profile.nixos.hostname}",
                            name="Persist initrd host key")

    def install(self, run: Run) -> None:
        """After nixos-install: the copy then holds the flake.lock the system was installed from, so
        the first rebuild after boot uses the same inputs, not newer ones."""
        config_copy(run, CONFIG_DIR, f"{INSTALL_ROOT}{paths(run.profile).etc}/nixos", name="Persist configuration copy")

    def rescue(self, run: Run) -> None:
        """After a rescue: /mnt/etc/nixos from <persist>/etc/nixos, as the install left it."""
        config_restored(run, f"{INSTALL_ROOT}{paths(run.profile).etc}/nixos", CONFIG_DIR,
                        name="Persist configuration restore")

    def adopt_reads(self, found) -> list[FactRequest]:
        return config_reads(found.root)

    def adopt(self, found, draft) -> None:
        """What persists and where, from the configuration's ``environment.persistence``; else
        a mount named persist (nothing listed in it, said so)."""
        configured = configured_persistence(config_texts(found))
        if configured:
            draft.persistence = configured
            draft.infer(f"persistence: read from environment.persistence.\"{configured['root']}\" in /etc/nixos")
            return
        named = sorted(m["mountpoint"] for m in draft.all_mounts() if m["mountpoint"] in ("/persist", "/nix/persist"))
        if named:
            draft.persistence = {"root": named[0], "directories": [], "files": []}
            draft.infer(f"persistence: {named[0]} by its name; nothing listed in it (no environment.persistence "
                        "in /etc/nixos): add what the gap report (gaps.py) finds")

    def applies(self, profile: Profile) -> bool:
        return True             # every profile persists the secrets, the host identity and the configuration

    def owns(self, node) -> bool:
        return False

    def tools(self, profile: Profile) -> dict[str, str]:
        return {}               # ssh-keygen, sha256sum and the like are every run's

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        return {} if rescue else {name: settings.tabula_install for name in PASSWORD_SECRETS}

    def observe(self, run: Run) -> list[FactRequest]:
        folder, names = _secret_files(run)
        keys, machine_id = _host_identity_paths(f"{INSTALL_ROOT}{paths(run.profile).etc}", HOST_KEYS)
        reads: list[FactRequest] = [(PathsState, {"paths": [folder, *(f"{folder}/{n}" for n in names)]}),
                                    (PathsState, {"paths": [*keys.values(), machine_id]})]
        if run.profile.nixos.remote_unlock:
            key = f"{INSTALL_ROOT}{paths(run.profile).initrd_host_key}"
            reads.append((PathsState, {"paths": [posixpath.dirname(key), key]}))
        copy = f"{INSTALL_ROOT}{paths(run.profile).etc}/nixos"
        return reads + [(DirectoryDigest, {"path": CONFIG_DIR}), (DirectoryDigest, {"path": copy})]

    def problems(self, target: Target) -> list[str]:
        """What the persist stage seeds, with its modes: ``<persist>/secrets`` (0700) with the
        password hashes (0600, crypt hashes: checked on the target, never read back; required
        when the run installs), the SSH host keys (ed25519, rsa 4096; private 0600, public 0644),
        the machine-id (0444, 32 hex digits), the initrd's own SSH host key with remote unlock
        (0600 in a 0700 folder, not one of the system's keys), and the copy of the NixOS
        configuration."""
        profile, root = target.settings.profile, target.root
        where = paths(profile)
        persist = under(root, where.root)
        secrets_dir = under(root, where.secrets_dir)
        hashes = [under(root, path) for path in where.password_files.values()]
        keys, machine_id = _host_identity_paths(under(root, where.etc), HOST_KEYS)
        initrd_key = under(root, where.initrd_host_key) if profile.nixos.remote_unlock else None
        wanted = {secrets_dir: ("directory", "700")}
        wanted.update({path: ("file", "600") for path in hashes})
        for path in keys.values():
            wanted.update({path: ("file", "600"), f"{path}.pub": ("file", "644")})
        wanted[machine_id] = ("file", "444")
        if initrd_key:
            wanted.update({posixpath.dirname(initrd_key): ("directory", "700"), initrd_key: ("file", "600")})
        state = target.read(PathsState, paths=list(wanted))

        failures = []
        for path, (kind, mode) in wanted.items():
            have = state.get(path)
            if have is None:
                if path in hashes and not target.settings.tabula_install:
                    continue        # a run that does not install may seed them later
                failures.append(f"{path}: missing")
            elif have["type"] != kind or have["mode"] != mode or have["user"] != "root":
                failures.append(f"{path}: {have['type']} {have['mode']} {have['user']}, "
                                f"the profile wants {kind} {mode} root")
        for path in hashes:
            # On the target, so the hash never travels back: a crypt hash, not a plaintext password.
            if path in state and target.run(f"grep -qE {shlex.quote(_CRYPT_RE.pattern)} {shlex.quote(path)}").rc != 0:
                failures.append(f"{path}: not a crypt password hash")
        for key_type, path in keys.items():
            if path in state:
                shown = target.run(f"ssh-keygen -lf {shlex.quote(path)}").stdout.split()
                want = ["4096", "(RSA)"] if key_type == "rsa" else ["(ED25519)"]
                if not shown or not all(word in shown for word in want):
                    failures.append(f"{path}: {' '.join(shown[:1] + shown[-1:]) or 'not a key'}, the profile wants "
                                    f"{key_type}{' 4096' if key_type == 'rsa' else ''}")
        if machine_id in state and not re.fullmatch(r"[0-9a-f]{32}",
                                                    target.run(f"cat {shlex.quote(machine_id)}").stdout.strip()):
            failures.append(f"{machine_id}: not 32 lower-case hex digits")
        if initrd_key and initrd_key in state:
            fingerprints = {path: target.run(f"ssh-keygen -lf {shlex.quote(path)}").stdout.split()[1:2]
                            for path in [initrd_key, *keys.values()] if path in state}
            initrd = fingerprints.pop(initrd_key)
            if not initrd:
                failures.append(f"{initrd_key}: not a key")
            elif initrd in fingerprints.values():
                failures.append(f"{initrd_key}: the initrd carries one of the system's host keys")
        config, copy = under(root, "/etc/nixos"), f"{persist}/etc/nixos"
        original, copied = target.read(DirectoryDigest, path=config), target.read(DirectoryDigest, path=copy)
        if not copied:
            failures.append(f"{copy}: missing (the copy of {config})")
        elif copied != original:
            failures.append(f"{copy}: differs from {config}")
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        return NixFragments()   # the NixOS files name its paths (``paths``) in their templates

    def gaps(self, run: Run, root: str) -> tuple[list, list[str]]:
        return [], []

    def disko(self, profile: Profile, context) -> dict:
        return {}

    def disko_node(self, node, device: str, part, context) -> dict | None:
        return None


LAYER = PersistLayer()
