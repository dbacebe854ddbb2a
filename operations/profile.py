"""
Storage profiles: a layout as a tree of data, validated before any command runs.

A profile is a YAML file (``profiles/<name>.yaml``) describing disks -> GPT partitions -> content,
where content is a filesystem, a LUKS container (holding more content), swap, or a ZFS pool
member; ZFS pools with their datasets, tmpfs and bind mounts hang in the same tree. Each layer
module in ``operations/`` knows how to create, mount and render into NixOS config the nodes it owns.

Profiles declare ``vars`` with defaults (``~`` for "none"; ``REQUIRED`` when inventory data must
supply the value, as ``tabula_vars``).
Any string in the profile may reference ``${var}``; a string that is exactly ``${var}`` takes the
var's value with its type (so ``pbkdf_iterations: ${luks_pbkdf_iterations}`` stays an int or null).
Derived vars: ``hash`` (first 8 hex chars of sha256 of the host name) and ``host_id``.

    from operations.profile import load_profile
    profile = load_profile("zephyrus-btrfs", {"disk": "/dev/disk/by-id/nvme-...", "hostname": "g16"})
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from operations.errors import TabulaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"

_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:iB|B)?\s*$", re.IGNORECASE)
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_AUTHORIZED_KEY_RE = re.compile(r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
                                r" [A-Za-z0-9+/]{20,}={0,3}( [^\n]*)?")
_HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PARTLABEL_RE = re.compile(r"^[A-Za-z0-9._+-]{1,36}$")  # GPT names hold 36 UTF-16 units
_SUBVOL_RE = re.compile(r"^[^/\0]+$")
_ZFS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_MAPPER_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")


# sgdisk type codes -> GPT partition type GUIDs (as blkid PART_ENTRY_TYPE and lsblk PARTTYPE show them).
GPT_TYPE_GUIDS = {
    "EF00": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",  # EFI system partition
    "EF02": "21686148-6449-6E6F-744E-656564454649",  # BIOS boot partition
    "8200": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",  # Linux swap
    "8300": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux filesystem
    "8302": "933AC7E1-2EB4-4F13-B844-0E14E2AEF915",  # Linux /home
    "8304": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",  # Linux x86-64 root (/)
    "8309": "CA7D7CCB-63ED-4C53-861C-1742536059CC",  # Linux LUKS
    "8E00": "E6D6D379-F507-44C2-A23C-238F2A3DF928",  # Linux LVM
    "FD00": "A19D880F-05FC-4D3B-A006-743F0F84911E",  # Linux RAID
    "BF00": "6A85CF4D-1DD2-11B2-99A6-080020736631",  # Solaris root (ZFS)
    "BF01": "6A898CC3-1DD2-11B2-99A6-080020736631",  # Solaris /usr & Mac ZFS
    "0700": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # Microsoft basic data
}

# A var declared with this value has no default: inventory data must supply it.
REQUIRED = "REQUIRED"


class ProfileError(TabulaError, ValueError):
    """A profile or its inventory data is invalid; the message names the field."""


def parse_size(value: str | int) -> int:
    """'1GiB', '512M', '2G', '4096' -> bytes (binary units, as sgdisk and cryptsetup read them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"bad size {value!r}: use a number with K, M, G or T (binary units), e.g. 512M or 1GiB")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.upper()])


def host_hash(hostname: str) -> str:
    """First 8 hex chars of sha256(host name): the partlabel suffix of the temproot layouts."""
    return hashlib.sha256(hostname.encode()).hexdigest()[:8]


class _Node(BaseModel):
    # extra="forbid": a misspelled key is an error naming it, not a silently ignored setting
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- leaves ---------------------------------------------------------------------------------


class Swapfile(_Node):
    size: str

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v

    @property
    def size_bytes(self) -> int:
        return parse_size(self.size)


class Subvolume(_Node):
    """A top-level btrfs subvolume, e.g. ``@home`` mounted at ``/home``."""

    path: str
    mountpoint: str | None = None
    mount_options: list[str] = []
    needed_for_boot: bool = False
    # Name of a read-only snapshot taken right after this subvolume is created empty: the state
    # the root is rolled back to at every boot (the guide's @root-blank).
    blank_snapshot: str | None = None
    swapfile: Swapfile | None = None

    @field_validator("path", "blank_snapshot")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not _SUBVOL_RE.match(v) or v in (".", "..")):
            raise ValueError(f"invalid subvolume name {v!r}: a top-level name without '/'")
        return v

    @property
    def swapfile_path(self) -> str | None:
        """Where the swapfile lives in the installed system (in this subvolume's mount)."""
        return f"{self.mountpoint.rstrip('/')}/swapfile" if self.swapfile and self.mountpoint else None


class Filesystem(_Node):
    type: Literal["filesystem"] = "filesystem"
    format: Literal["vfat", "btrfs", "f2fs", "ext4"]
    fs_label: str | None = None
    mkfs_options: list[str] = []
    mountpoint: str | None = None
    mount_options: list[str] = []
    needed_for_boot: bool = False
    subvolumes: list[Subvolume] = []

    @model_validator(mode="after")
    def _subvolumes_only_on_btrfs(self) -> "Filesystem":
        if self.subvolumes and self.format != "btrfs":
            raise ValueError(f"subvolumes need format btrfs, not {self.format}")
        names = [s.path for s in self.subvolumes] + [s.blank_snapshot for s in self.subvolumes if s.blank_snapshot]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"subvolume names used twice: {sorted(dupes)}")
        return self

    # What a partition holding this may already carry (blkid TYPE), whether its UUID goes into
    # the NixOS configuration, and the mounts it brings on ``device``.
    @property
    def signatures(self) -> set[str]:
        return {self.format}

    needs_ids: ClassVar[bool] = True

    def mounts(self, device: str) -> list["Mount"]:
        found = []
        if self.mountpoint:
            found.append(Mount(mountpoint=self.mountpoint, device=device, fstype=self.format,
                               options=tuple(self.mount_options), needed_for_boot=self.needed_for_boot))
        for sub in self.subvolumes:
            if sub.mountpoint:
                found.append(Mount(mountpoint=sub.mountpoint, device=device, fstype="btrfs",
                                   options=(f"subvol={sub.path}", *sub.mount_options),
                                   needed_for_boot=sub.needed_for_boot))
        return found


class Swap(_Node):
    type: Literal["swap"] = "swap"
    # Encrypted with a fresh random key at every boot (NixOS swapDevices.*.randomEncryption):
    # swap holds no state worth keeping across boots, so no key has to be stored anywhere.
    random_encryption: bool = False

    @property
    def signatures(self) -> set[str]:
        # re-keyed at every boot: a LUKS header from an earlier boot is as good as a swap signature
        return {"swap", "crypto_LUKS"} if self.random_encryption else {"swap"}

    needs_ids: ClassVar[bool] = True        # by UUID, or by PARTUUID with random encryption (no signature then)

    def mounts(self, device: str) -> list["Mount"]:
        return []


class ZfsMember(_Node):
    type: Literal["zfs"] = "zfs"
    pool: str  # key of the pool in Profile.pools

    signatures: ClassVar[frozenset[str]] = frozenset({"zfs_member"})
    needs_ids: ClassVar[bool] = False       # the pool finds its members by partlabel

    def mounts(self, device: str) -> list["Mount"]:
        return []           # the pool's datasets bring the mounts (Dataset.mount)


class Luks(_Node):
    type: Literal["luks"] = "luks"
    mapper: str
    luks_type: Literal["luks2", "luks1"] = "luks2"
    cipher: str | None = None
    key_size: int | None = None
    # Key derivation. The default (argon2id with cryptsetup's own cost) is what a real install
    # should use; tests choose pbkdf2 with few iterations through profile vars.
    pbkdf: Literal["argon2id", "argon2i", "pbkdf2"] = "argon2id"
    pbkdf_iterations: int | None = None
    pbkdf_memory: int | None = None
    allow_discards: bool = False
    bypass_workqueues: bool = False
    content: Annotated[Union[Filesystem, Swap, ZfsMember], Field(discriminator="type")]

    signatures: ClassVar[frozenset[str]] = frozenset({"crypto_LUKS"})
    needs_ids: ClassVar[bool] = True

    @property
    def device(self) -> str:
        """The opened mapping: where the content lives."""
        return f"/dev/mapper/{self.mapper}"

    def mounts(self, device: str) -> list["Mount"]:
        return []           # its content's, on the mapping (Profile.walk goes inside)

    @field_validator("mapper")
    @classmethod
    def _mapper(cls, v: str) -> str:
        if not _MAPPER_RE.match(v):
            raise ValueError(f"invalid device-mapper name {v!r}")
        return v

    @field_validator("pbkdf_iterations")
    @classmethod
    def _iterations(cls, v: int | None) -> int | None:
        if v is not None and v < 1000:
            raise ValueError("pbkdf_iterations below 1000 is refused by cryptsetup")
        return v


Content = Annotated[Union[Filesystem, Luks, Swap, ZfsMember], Field(discriminator="type")]


class Partition(_Node):
    label: str
    type: str = "8300"  # sgdisk type code
    size: str  # a size, or "rest" for the remainder of the disk (last partition only)
    content: Content | None = None

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if not _PARTLABEL_RE.match(v):
            raise ValueError(f"invalid partlabel {v!r}: 1-36 characters of A-Z a-z 0-9 . _ + -")
        return v

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f]{4}", v):
            raise ValueError(f"invalid GPT type code {v!r}: four hex digits as sgdisk takes them, e.g. ef00")
        if v.upper() not in GPT_TYPE_GUIDS:
            raise ValueError(f"GPT type code {v!r} is not one Tabula knows the GUID of (known: "
                             f"{', '.join(sorted(c.lower() for c in GPT_TYPE_GUIDS))}); add it to GPT_TYPE_GUIDS "
                             "in operations/profile.py (sgdisk -L lists the codes)")
        return v.upper()

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        if v != "rest":
            parse_size(v)
        return v

    @property
    def size_bytes(self) -> int | None:
        return None if self.size == "rest" else parse_size(self.size)

    @property
    def device(self) -> str:
        return f"/dev/disk/by-partlabel/{self.label}"


class Disk(_Node):
    # A stable path: /dev/disk/by-id/... (or by-path). Never /dev/sdX: those move between boots.
    device: str
    serial: str | None = None
    size: str | None = None  # declared size: the real disk may be larger, never smaller
    partitions: list[Partition]

    @field_validator("device")
    @classmethod
    def _stable(cls, v: str) -> str:
        if not re.match(r"^/dev/disk/by-(id|path)/[^/]+$", v):
            raise ValueError(
                f"{v!r} is not a stable disk path: give /dev/disk/by-id/... (ls -l /dev/disk/by-id on the target)"
            )
        return v

    @model_validator(mode="after")
    def _rest_last(self) -> "Disk":
        for part in self.partitions[:-1]:
            if part.size == "rest":
                raise ValueError(f"partition {part.label}: size 'rest' is only allowed for the last partition")
        if self.size is not None:
            declared = parse_size(self.size)
            fixed = sum(p.size_bytes or 0 for p in self.partitions)
            if fixed > declared:
                raise ValueError(f"partitions need {fixed} bytes but the disk is declared as {self.size}")
        return self

    @property
    def size_bytes(self) -> int | None:
        return None if self.size is None else parse_size(self.size)


class Vdev(_Node):
    mode: Literal["raidz1", "raidz2", "raidz3", "mirror", "stripe"] = "stripe"
    members: list[str]  # partlabels

    @model_validator(mode="after")
    def _enough_members(self) -> "Vdev":
        need = {"raidz1": 3, "raidz2": 4, "raidz3": 5, "mirror": 2, "stripe": 1}[self.mode]
        if len(self.members) < need:
            raise ValueError(f"{self.mode} needs at least {need} members, got {len(self.members)}: {self.members}")
        return self


class DatasetEncryption(_Node):
    # The key comes from the controller like the LUKS passphrase (stdin, never argv); the installed
    # system reads it from keylocation at boot.
    keyformat: Literal["passphrase", "hex", "raw"] = "passphrase"
    keylocation: str = "prompt"
    encryption: str = "aes-256-gcm"


class Dataset(_Node):
    name: str  # relative to the pool, e.g. "temp/root"
    properties: dict[str, str] = {}
    mountpoint: str | None = None  # mounted with mountpoint=legacy under /mnt
    mount_options: list[str] = []
    needed_for_boot: bool = False
    empty_snapshot: bool = False  # take @empty right after creation (temp datasets)
    encryption: DatasetEncryption | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not all(_ZFS_NAME_RE.match(part) for part in v.split("/")):
            raise ValueError(f"invalid dataset name {v!r}: components of A-Z a-z 0-9 _ . : - separated by /")
        return v

    @property
    def parent(self) -> str | None:
        return self.name.rsplit("/", 1)[0] if "/" in self.name else None

    def mount(self, pool_name: str) -> "Mount | None":
        if not self.mountpoint:
            return None
        return Mount(mountpoint=self.mountpoint, device=f"{pool_name}/{self.name}", fstype="zfs",
                     options=tuple(self.mount_options), needed_for_boot=self.needed_for_boot)


class Pool(_Node):
    name: str
    vdevs: list[Vdev]
    log: list[str] = []
    cache: list[str] = []
    options: dict[str, str] = {"ashift": "12"}
    root_properties: dict[str, str] = {}
    datasets: list[Dataset] = []

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _ZFS_NAME_RE.match(v):
            raise ValueError(f"invalid pool name {v!r}")
        return v

    @property
    def members(self) -> list[str]:
        return [m for vdev in self.vdevs for m in vdev.members] + self.log + self.cache

    @model_validator(mode="after")
    def _parents_declared(self) -> "Pool":
        names = {d.name for d in self.datasets}
        for ds in self.datasets:
            if ds.parent and ds.parent not in names:
                raise ValueError(f"dataset {ds.name!r} needs its parent {ds.parent!r} declared in datasets")
        return self


class Tmpfs(_Node):
    type: Literal["tmpfs"] = "tmpfs"
    mountpoint: str
    options: list[str] = []
    needed_for_boot: bool = False

    def mount(self) -> "Mount":
        return Mount(mountpoint=self.mountpoint, device="none", fstype="tmpfs",
                     options=tuple(self.options), needed_for_boot=self.needed_for_boot)


class Bind(_Node):
    type: Literal["bind"] = "bind"
    source: str  # path on the installed system, e.g. /.local/nix
    mountpoint: str
    options: list[str] = []
    needed_for_boot: bool = False

    def mount(self) -> "Mount":
        return Mount(mountpoint=self.mountpoint, device=self.source, fstype="none",
                     options=("bind", *self.options), needed_for_boot=self.needed_for_boot)


ExtraMount = Annotated[Union[Tmpfs, Bind], Field(discriminator="type")]


class Persistence(_Node):
    """The impermanence module's view: where state persists, and what is kept there.

    An entry may be a list (a var such as ``${persist_directories}``): its items are added in
    its place, so inventory data can add paths without editing the profile."""

    root: str = "/persist"
    directories: list[str] = []
    files: list[str] = []

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
    user: str
    timezone: str = "UTC"
    locale: str = "en_US.UTF-8"
    state_version: str = "24.11"
    system: str = "x86_64-linux"
    # nixos-hardware module name, e.g. asus-zephyrus-gu605my; null: none, or chosen from DMI
    hardware_module: str | None = None
    user_groups: list[str] = ["wheel"]
    extra_config: str | None = None  # name of a template under templates/ (or a path) with host extras
    # Unfree packages the configuration may install, by name (lib.getName): nixpkgs refuses to
    # evaluate any other unfree package, so nothing unfree comes in unnoticed.
    unfree_packages: list[str] = []

    # Who may log in over SSH: public keys (one "type base64 [comment]" line each) for the user
    # and, only if given, for root (by key only).
    authorized_keys: list[str] = []
    root_authorized_keys: list[str] = []
    ssh_password_login: bool = False       # PasswordAuthentication of sshd
    # A machine without a console (a server): SSH is the only way in once it is installed.
    headless: bool = False
    # Unlock the encrypted storage over SSH in the initrd (systemd stage 1), with a host key of
    # its own and the authorized keys above; port of that initrd sshd.
    remote_unlock: bool = False
    remote_unlock_port: int = 2222
    remote_unlock_modules: list[str] = []  # the network card's driver (lspci -k), for the initrd

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


class Mount(BaseModel):
    """One mount of the installed system, as the layers derive it (not written in profiles)."""

    model_config = ConfigDict(frozen=True)
    mountpoint: str
    device: str
    fstype: str
    options: tuple[str, ...] = ()
    needed_for_boot: bool = False


class Profile(_Node):
    name: str
    description: str = ""
    nixos: NixosSettings
    disks: dict[str, Disk]
    pools: dict[str, Pool] = {}
    mounts: list[ExtraMount] = []
    persistence: Persistence = Persistence()
    vars: dict[str, Any] = {}  # the resolved vars, kept for reference

    # --- walking the tree -------------------------------------------------------------------

    def partitions(self) -> list[tuple[str, Disk, Partition]]:
        return [(key, disk, part) for key, disk in self.disks.items() for part in disk.partitions]

    def partition(self, label: str) -> Partition:
        for _, _, part in self.partitions():
            if part.label == label:
                return part
        raise KeyError(label)

    def walk(self) -> list[tuple[Partition, "Content", str]]:
        """Every content node with the block device it sits on, in disk order: a partition's
        content on the partition, and a LUKS container's content on its opened mapping."""
        found = []
        for _, _, part in self.partitions():
            content, device = part.content, part.device
            while content is not None:
                found.append((part, content, device))
                content, device = (content.content, content.device) if isinstance(content, Luks) else (None, "")
        return found

    def luks_devices(self) -> list[tuple[Partition, Luks]]:
        return [(part, node) for part, node, _ in self.walk() if isinstance(node, Luks)]

    def filesystems(self) -> list[tuple[str, Filesystem]]:
        """(block device, filesystem) for every filesystem, inside LUKS or directly on a partition."""
        return [(device, node) for _, node, device in self.walk() if isinstance(node, Filesystem)]

    def swaps(self) -> list[tuple[str, Swap]]:
        return [(device, node) for _, node, device in self.walk() if isinstance(node, Swap)]

    def pool_members(self, pool_key: str) -> list[tuple[str, Partition]]:
        """(device to hand to zpool, partition) of every partition that belongs to a pool."""
        return [(device, part) for part, node, device in self.walk()
                if isinstance(node, ZfsMember) and node.pool == pool_key]

    def id_devices(self) -> list[str]:
        """Partitions whose UUID (or PARTUUID) the NixOS configuration names."""
        return [part.device for _, _, part in self.partitions() if part.content is not None and part.content.needs_ids]

    def all_mounts(self) -> list[Mount]:
        """Every mount of the installed system, parents before children."""
        mounts = [mount for _, node, device in self.walk() for mount in node.mounts(device)]
        mounts += [mount for pool in self.pools.values() for ds in pool.datasets
                   if (mount := ds.mount(pool.name)) is not None]
        mounts += [extra.mount() for extra in self.mounts]
        return sorted(mounts, key=lambda m: (m.mountpoint != "/", m.mountpoint.count("/"), m.mountpoint))

    @property
    def hash(self) -> str:
        return host_hash(self.nixos.hostname)

    @property
    def initrd_host_key(self) -> str:
        """The initrd sshd's host key (remote unlock), on the persistent root, in a 0700 folder."""
        return f"{self.persistence.root}/etc/secrets/initrd/ssh_host_ed25519_key"

    @property
    def secrets_dir(self) -> str:
        """Where the persist stage seeds the password hashes (on the installed system)."""
        return f"{self.persistence.root}/secrets"

    @property
    def password_files(self) -> dict[str, str]:
        """{user name: the hashedPasswordFile NixOS reads at boot}, seeded by the persist stage."""
        return {"root": f"{self.secrets_dir}/root-password",
                self.nixos.user: f"{self.secrets_dir}/{self.nixos.user}-password"}

    @property
    def host_id(self) -> str:
        # networking.hostId: 8 hex digits, stable per host name (ZFS refuses to import a pool
        # last used by another hostId without -f, so it must not change between installs).
        return self.hash

    # --- checks across the tree ---------------------------------------------------------------

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        labels = [p.label for _, _, p in self.partitions()]
        dupes = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
        if dupes:
            raise ValueError(f"partition labels used twice: {dupes}")
        devices = [d.device for d in self.disks.values()]
        if len(set(devices)) != len(devices):
            raise ValueError(f"two disks name the same device: {devices}")
        mappers = [luks.mapper for _, luks in self.luks_devices()]
        if len(set(mappers)) != len(mappers):
            raise ValueError(f"LUKS mapper names used twice: {mappers}")

        for key, pool in self.pools.items():
            members = {part.label for _, part in self.pool_members(key)}
            for label in pool.members:
                if label not in labels:
                    raise ValueError(f"pools.{key}: member {label!r} is not a partition label of this profile")
                if label not in members:
                    raise ValueError(f"pools.{key}: partition {label!r} has no content 'type: zfs, pool: {key}'")
            unused = members - set(pool.members)
            if unused:
                raise ValueError(f"pools.{key}: partitions {sorted(unused)} say they belong to this pool but no vdev uses them")
            names = [d.name for d in pool.datasets]
            if len(set(names)) != len(names):
                raise ValueError(f"pools.{key}: dataset names used twice")
        for part, node, _ in self.walk():
            if isinstance(node, ZfsMember) and node.pool not in self.pools:
                raise ValueError(f"partition {part.label}: pool {node.pool!r} is not declared under pools")

        mountpoints = [m.mountpoint for m in self.all_mounts()]
        for mp in mountpoints:
            if not mp.startswith("/") or (mp != "/" and mp.endswith("/")) or "//" in mp or "/../" in f"{mp}/":
                raise ValueError(f"mount point {mp!r} must be an absolute path without trailing '/' or '..'")
        dupes = sorted({mp for mp in mountpoints if mountpoints.count(mp) > 1})
        if dupes:
            raise ValueError(f"mount points used twice (overlapping mounts): {dupes}")
        if "/" not in mountpoints:
            raise ValueError("no file system is mounted at '/'")
        return self


# --- loading --------------------------------------------------------------------------------


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, variables, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, f"{where}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def lookup(var: str) -> Any:
        if var not in variables:
            raise ProfileError(f"{where}: unknown variable ${{{var}}} (known: {', '.join(sorted(variables))})")
        if variables[var] == REQUIRED:
            raise ProfileError(f"{where}: variable {var!r} has no value: set it in inventory data tabula_vars['{var}']")
        return variables[var]

    whole = _VAR_RE.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    def embed(match: re.Match) -> str:
        found = lookup(match.group(1))
        if found is None:
            raise ProfileError(f"{where}: variable {match.group(1)!r} is empty but used inside {value!r}")
        return str(found)

    return _VAR_RE.sub(embed, value)


def profile_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return path
    return PROFILE_DIR / f"{name_or_path}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _format_validation_error(profile_name: str, error: ValidationError) -> str:
    lines = [f"profile {profile_name!r} is invalid:"]
    for err in error.errors():
        # drop pydantic's union-tag segments ("filesystem", "luks", ...) that name no real field
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelled?)"
        lines.append(f"  {loc or '(top)'}: {msg}")
    return "\n".join(lines)


def load_profile(name_or_path: str, overrides: dict[str, Any] | None = None) -> Profile:
    """Load, substitute vars and validate a profile. Raises ProfileError naming the bad field."""
    path = profile_path(name_or_path)
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {name_or_path!r} (inventory data tabula_profile): "
            f"available: {', '.join(available_profiles())}"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path}: top level must be a mapping")

    declared = raw.pop("vars", {}) or {}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ProfileError(
            f"tabula_vars: unknown variable(s) {unknown} for profile {path.stem!r} (known: {', '.join(sorted(declared))})"
        )
    variables = {**declared, **overrides}
    hostname = variables.get("hostname")
    if isinstance(hostname, str) and hostname != REQUIRED:
        variables.setdefault("hash", host_hash(hostname))
    resolved = _substitute(raw, variables, "")
    resolved["vars"] = variables
    try:
        return Profile.model_validate(resolved)
    except ValidationError as exc:
        raise ProfileError(_format_validation_error(path.stem, exc)) from None
