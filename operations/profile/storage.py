"""
The storage nodes of a profile: partitions and what they hold (filesystems with btrfs
subvolumes and swapfiles, LUKS containers, swap, ZFS pool members), disks, ZFS pools with their
datasets, tmpfs and bind mounts, and the mounts of the installed system they bring. Each node
says what a partition holding it may already carry (the guard's "is this foreign?"), which
mounts it brings and whether its UUID goes into the NixOS configuration.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from operations.gpt.types import GPT_TYPE_GUIDS
from operations.profile.common import _Node, parse_size

_PARTLABEL_RE = re.compile(r"^[A-Za-z0-9._+-]{1,36}$")  # GPT names hold 36 UTF-16 units
_SUBVOL_RE = re.compile(r"^[^/\0]+$")
_ZFS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_MAPPER_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")


class Swapfile(_Node):
    size: str
    """Its size (a size string: 512M, 32GiB...)."""

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
    """Its name at the top level, e.g. ``@home`` (no ``/``)."""
    mountpoint: str | None = None
    """Where the installed system mounts it, e.g. ``/home``; none: not mounted."""
    mount_options: list[str] = []
    """Its mount options (``subvol=`` is added)."""
    needed_for_boot: bool = False
    """Mounted in the initrd (NixOS ``neededForBoot``)."""
    blank_snapshot: str | None = None
    """Name of a read-only snapshot taken right after this subvolume is created empty: the state the root is
    rolled back to at every boot (the guide's ``@root-blank``)."""
    swapfile: Swapfile | None = None
    """A swapfile in this subvolume (at ``<mountpoint>/swapfile``)."""

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
    """``filesystem``."""
    format: Literal["vfat", "btrfs", "f2fs", "ext4"]
    """The filesystem made on the device."""
    fs_label: str | None = None
    """Its label (mkfs ``-L``/``-n``/``-l``)."""
    mkfs_options: list[str] = []
    """More mkfs arguments."""
    mountpoint: str | None = None
    """Where the installed system mounts it; none: not mounted (a btrfs whose subvolumes are)."""
    mount_options: list[str] = []
    """Its mount options."""
    needed_for_boot: bool = False
    """Mounted in the initrd (NixOS ``neededForBoot``)."""
    subvolumes: list[Subvolume] = []
    """btrfs only: its top-level subvolumes."""

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
    """``swap``."""
    random_encryption: bool = False
    """Encrypted with a fresh random key at every boot (NixOS ``swapDevices.*.randomEncryption``): swap holds no
    state worth keeping across boots, so no key is stored anywhere."""

    @property
    def signatures(self) -> set[str]:
        # re-keyed at every boot: a LUKS header from an earlier boot is as good as a swap signature
        return {"swap", "crypto_LUKS"} if self.random_encryption else {"swap"}

    needs_ids: ClassVar[bool] = True        # by UUID, or by PARTUUID with random encryption (no signature then)

    def mounts(self, device: str) -> list["Mount"]:
        return []


class ZfsMember(_Node):
    type: Literal["zfs"] = "zfs"
    """``zfs``."""
    pool: str
    """The key of its pool under ``pools``."""

    signatures: ClassVar[frozenset[str]] = frozenset({"zfs_member"})
    needs_ids: ClassVar[bool] = False       # the pool finds its members by partlabel

    def mounts(self, device: str) -> list["Mount"]:
        return []           # the pool's datasets bring the mounts (Dataset.mount)


class Luks(_Node):
    type: Literal["luks"] = "luks"
    """``luks``."""
    mapper: str
    """The device-mapper name: the container opens as ``/dev/mapper/<mapper>``."""
    luks_type: Literal["luks2", "luks1"] = "luks2"
    """The header version."""
    cipher: str | None = None
    """luksFormat ``--cipher``; none: cryptsetup's default."""
    key_size: int | None = None
    """luksFormat ``--key-size``; none: cryptsetup's default."""
    pbkdf: Literal["argon2id", "argon2i", "pbkdf2"] = "argon2id"
    """Key derivation. The default (argon2id with cryptsetup's own cost) is what a real install should use; tests
    choose pbkdf2 with few iterations through profile vars."""
    pbkdf_iterations: int | None = None
    """luksFormat ``--pbkdf-force-iterations`` (at least 1000)."""
    pbkdf_memory: int | None = None
    """luksFormat ``--pbkdf-memory`` (KiB)."""
    allow_discards: bool = False
    """Open it with ``--allow-discards`` (and ``allowDiscards`` in the initrd)."""
    bypass_workqueues: bool = False
    """Open it without the read and write workqueues (``bypassWorkqueues``)."""
    tpm2_unlock: bool = False
    """Enroll a TPM2 token (``systemd-cryptenroll``) beside the passphrase, which stays for recovery,
    and unlock with it at boot (``crypttabExtraOpts = [ "tpm2-device=auto" ]``). LUKS2 only."""
    tpm2_pcrs: list[int] = [7]
    """The PCRs the token is sealed to (7: the Secure Boot state); [] seals it to the TPM alone."""
    content: Annotated[Union[Filesystem, Swap, ZfsMember], Field(discriminator="type")]
    """What the container holds, on its mapping."""

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

    @field_validator("tpm2_pcrs")
    @classmethod
    def _pcrs(cls, v: list[int]) -> list[int]:
        wrong = [pcr for pcr in v if not 0 <= pcr <= 23]
        if wrong:
            raise ValueError(f"PCRs {wrong} do not exist: a TPM 2.0 has PCRs 0 to 23")
        if len(set(v)) != len(v):
            raise ValueError(f"PCRs named twice: {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _tpm2_needs_luks2(self) -> "Luks":
        if self.tpm2_unlock and self.luks_type != "luks2":
            raise ValueError(f"tpm2_unlock (tabula_vars['tpm2_unlock']) needs a LUKS2 container, this one is "
                             f"{self.luks_type}: systemd-cryptenroll keeps its token in the LUKS2 header")
        return self


Content = Annotated[Union[Filesystem, Luks, Swap, ZfsMember], Field(discriminator="type")]


class Partition(_Node):
    label: str
    """Its GPT partlabel: how every step and the installed system find it (1-36 of A-Z a-z 0-9 . _ + -)."""
    type: str = "8300"
    """Its sgdisk type code, e.g. ``ef00``, ``8300`` (one of ``operations/gpt/types.py``)."""
    size: str
    """A size, or ``rest`` for the remainder of the disk (last partition only)."""
    content: Content | None = None
    """What it holds: a filesystem, a LUKS container, swap or a ZFS pool member; none: left empty."""

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
                             "in operations/gpt/types.py (sgdisk -L lists the codes)")
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
    device: str
    """A stable path: ``/dev/disk/by-id/...`` (or by-path). Never ``/dev/sdX``: those move between boots."""
    serial: str | None = None
    """Its serial, checked against the disk found."""
    size: str | None = None
    """Its declared size: the real disk may be larger, never smaller."""
    partitions: list[Partition]
    """Its GPT partitions, in order."""

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
    """The vdev's redundancy (``stripe``: single devices)."""
    members: list[str]
    """Its members, by partlabel."""

    @model_validator(mode="after")
    def _enough_members(self) -> "Vdev":
        need = {"raidz1": 3, "raidz2": 4, "raidz3": 5, "mirror": 2, "stripe": 1}[self.mode]
        if len(self.members) < need:
            raise ValueError(f"{self.mode} needs at least {need} members, got {len(self.members)}: {self.members}")
        return self


class DatasetEncryption(_Node):
    keyformat: Literal["passphrase", "hex", "raw"] = "passphrase"
    """``zfs create -o keyformat``; the key comes from the controller like the LUKS passphrase (stdin, never
    argv)."""
    keylocation: str = "prompt"
    """Where the installed system reads the key at boot (``prompt``: asked for)."""
    encryption: str = "aes-256-gcm"
    """The cipher."""


class Dataset(_Node):
    name: str
    """Its name relative to the pool, e.g. ``temp/root`` (its parent declared too)."""
    properties: dict[str, str] = {}
    """Properties it is created with and kept at (one-time properties only checked)."""
    mountpoint: str | None = None
    """Where the installed system mounts it (with ``mountpoint=legacy``); none: not mounted."""
    mount_options: list[str] = []
    """Its mount options."""
    needed_for_boot: bool = False
    """Mounted in the initrd (NixOS ``neededForBoot``)."""
    empty_snapshot: bool = False
    """Take ``@empty`` right after creation and roll back to it at every boot (temp datasets)."""
    encryption: DatasetEncryption | None = None
    """Native encryption: this dataset is an encryption root."""

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
    """The pool's name (the temproot profiles end it with the host hash)."""
    vdevs: list[Vdev]
    """Its data vdevs: the exact topology a found pool must have."""
    log: list[str] = []
    """Its log (SLOG) members, by partlabel."""
    cache: list[str] = []
    """Its cache (L2ARC) members, by partlabel."""
    options: dict[str, str] = {"ashift": "12"}
    """Pool options (``zpool create -o``)."""
    root_properties: dict[str, str] = {}
    """Properties of its root dataset (``zpool create -O``)."""
    datasets: list[Dataset] = []
    """Its datasets."""

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
    """``tmpfs``."""
    mountpoint: str
    """Where the installed system mounts it."""
    options: list[str] = []
    """Its mount options (``size=`` bounds it)."""
    needed_for_boot: bool = False
    """Mounted in the initrd (NixOS ``neededForBoot``)."""

    def mount(self) -> "Mount":
        return Mount(mountpoint=self.mountpoint, device="none", fstype="tmpfs",
                     options=tuple(self.options), needed_for_boot=self.needed_for_boot)


class Bind(_Node):
    type: Literal["bind"] = "bind"
    """``bind``."""
    source: str
    """A path of the installed system, e.g. ``/.local/nix``."""
    mountpoint: str
    """Where the installed system mounts it."""
    options: list[str] = []
    """Its mount options (after ``bind``)."""
    needed_for_boot: bool = False
    """Mounted in the initrd (NixOS ``neededForBoot``)."""

    def mount(self) -> "Mount":
        return Mount(mountpoint=self.mountpoint, device=self.source, fstype="none",
                     options=("bind", *self.options), needed_for_boot=self.needed_for_boot)


ExtraMount = Annotated[Union[Tmpfs, Bind], Field(discriminator="type")]


class Mount(BaseModel):
    """One mount of the installed system, as the layers derive it (not written in profiles)."""

    model_config = ConfigDict(frozen=True)
    mountpoint: str
    device: str
    fstype: str
    options: tuple[str, ...] = ()
    needed_for_boot: bool = False
