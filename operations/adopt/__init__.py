"""
adopt.py: a profile read from the disks of a machine Tabula did not install (by the guide's
commands, with disko, by hand), so verify, gaps, the rescue and in-place changes work on it.

    run = Run(host, None, LAYERS)
    found = survey(run, root)                    # operations/adopt/survey.py: read only
    draft = Draft(found, "adopted-laptop", host="laptop")
    for layer in LAYERS:
        layer.adopt(found, draft)                # each layer describes its own nodes (the contract)
    text = draft.yaml()                          # the profile, with what was inferred in comments

Each layer adds what it owns: gpt the disks and partitions, luks the containers, filesystems the
filesystems and swap, zfs the pools, btrfs the subvolumes and swapfiles, mounts the tmpfs and
bind mounts, nixos the host, persist what persists. What no profile can express (LVM, mdraid,
a root nothing rolls back...) is ``refuse``d with the device and why: no profile is written
then, unless partial adoption is asked for, which leaves those parts out and says so.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pyinfra import logger

from operations.adopt.survey import Found, MountInfo, survey
from operations.adoptlit import NOT_NEEDED_FOR_BOOT
from operations.errors import TabulaError
from operations.profile import Profile
from operations.profile.load import PROFILE_DIR
from operations.run import Run
from operations.settings import true_or_false
from operations.target import system_root

__all__ = ["AdoptError", "AdoptSettings", "Draft", "Found", "adopt", "load_adopt_settings", "survey", "write_profile"]


class AdoptError(TabulaError):
    """The target holds what no profile can express (and partial adoption was not asked for)."""


class Draft:
    """The profile under construction: the layers add their nodes, the draft assembles the tree."""

    def __init__(self, found: Found, name: str, host: str, partial: bool = False):
        self.found = found
        self.name = name
        self.host = host
        self.partial = partial
        self.disks: dict[str, dict] = {}            # disk key -> {device, serial, partitions}
        self.contents: dict[str, dict] = {}         # block device (kernel name) -> its content node
        self.pools: dict[str, dict] = {}
        self.mounts: list[dict] = []
        self.nixos: dict = {}
        self.persistence: dict = {}
        self.inferred: list[str] = []
        self.refused: list[str] = []

    # --- what the layers say ------------------------------------------------------------------

    def infer(self, text: str) -> None:
        """Something the disks do not say, and how it was chosen: a comment of the profile."""
        self.inferred.append(text)

    def refuse(self, device: str, why: str) -> None:
        """Something no profile can express: named in the refusal (or, partial, left out)."""
        self.refused.append(f"{device}: {why}")

    def content(self, device: str, node: dict) -> None:
        self.contents[device] = node

    def gpt_code(self, device: str) -> str | None:
        """The GPT type code of a described partition (by its kernel name), or None."""
        return next((part["type"].upper() for disk in self.disks.values() for part in disk["partitions"]
                     if part["kernel_name"] == device), None)

    def has_resume_swap(self) -> bool:
        """A swap a hibernated system can resume from: a swapfile, or swap with a stored key."""
        nodes = list(self.contents.values())
        return (any(n.get("type") == "swap" and not n.get("random_encryption") for n in nodes)
                or any(sub.get("swapfile") for n in nodes for sub in n.get("subvolumes", [])))

    def adopted_devices(self) -> list[str]:
        """The block devices the profile describes: its partitions, and the opened mappings of
        its LUKS containers (a device of a disk left out is not the profile's business)."""
        parts = [part["kernel_name"] for disk in self.disks.values() for part in disk["partitions"]]
        return parts + [self.contents[p]["mapping"] for p in parts if self.contents.get(p, {}).get("type") == "luks"]

    def all_mounts(self) -> list[dict]:
        found = []
        for node in list(self.contents.values()) + self.mounts:
            if node.get("mountpoint"):
                found.append(node)
            found += [sub for sub in node.get("subvolumes", []) if sub.get("mountpoint")]
        for pool in self.pools.values():
            found += [ds for ds in pool["datasets"] if ds.get("mountpoint")]
        return found

    # --- the profile --------------------------------------------------------------------------

    def tree(self) -> dict:
        """The profile as a profile YAML holds it: each partition with its content, a LUKS
        container's content on its mapping."""
        disks = {}
        for key, disk in self.disks.items():
            partitions = []
            for part in disk["partitions"]:
                node = {k: v for k, v in part.items() if k != "kernel_name"}
                content = self.contents.get(part["kernel_name"])
                if content is not None:
                    content = dict(content)
                    if content.get("type") == "luks":
                        inner = self.contents.get(content.pop("mapping"))
                        if inner is None:
                            content = None
                        else:
                            content["content"] = inner
                    if content is not None:
                        node["content"] = content
                partitions.append(node)
            disks[key] = {k: v for k, v in disk.items() if k != "partitions"} | {"partitions": partitions}
        profile = {"name": self.name, "description": f"adopted from the disks of {self.found.root} on "
                                                     f"{date.today().isoformat()}",
                   "nixos": self.nixos, "disks": disks}
        if self.pools:
            profile["pools"] = self.pools
        if self.mounts:
            profile["mounts"] = self.mounts
        if self.persistence:
            profile["persistence"] = self.persistence
        return profile

    def profile(self) -> Profile:
        """The tree loaded as any profile is (the model's checks): what it would install."""
        try:
            return Profile.model_validate(self.tree())
        except ValueError as error:
            raise AdoptError(f"the profile read from the disks does not load: {error}") from error

    def yaml(self) -> str:
        if self.refused and not self.partial:
            raise AdoptError("the target holds what no Tabula profile can express, so no profile was written "
                             "(tabula_adopt_partial=true writes one without these parts):\n  "
                             + "\n  ".join(self.refused))
        try:
            self.profile()
        except AdoptError as error:
            raise AdoptError(f"{error}" + ("\n(what was left out: no profile can express it)\n  "
                                           + "\n  ".join(self.refused) if self.refused else "")) from None
        lines = [f"# {self.name}: a Tabula profile read from the disks of a machine it did not install",
                 "# (adopt.py). Its disks are named by their stable ids; it needs no vars.", "#"]
        if self.inferred:
            lines.append("# Inferred, not read from the disks (check these):")
            lines += [f"#   - {text}" for text in self.inferred]
        if self.refused:
            lines.append("# Left out, no profile can express them (tabula_adopt_partial=true):")
            lines += [f"#   - {text}" for text in self.refused]
        return "\n".join(lines) + "\n" + yaml.safe_dump(self.tree(), sort_keys=False, width=120)


def write_profile(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class AdoptSettings(BaseModel):
    """The inventory keys of adopt.py (none required)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    tabula_adopt_profile: str | None = Field(None, description="where adopt.py writes the profile it reads from "
                                                               "the disks (default profiles/adopted-<host>.yaml)")
    tabula_adopt_partial: bool = Field(False, description="adopt.py: write a profile without the parts no profile can "
                                                          "express (LVM, mdraid...), saying so in it, instead of "
                                                          "refusing")
    tabula_root: Literal["auto", "/", "/mnt"] = Field("auto", description="where the installed system is")

    _boolean = field_validator("tabula_adopt_partial", mode="before")(true_or_false)

    @field_validator("tabula_adopt_profile", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value.endswith((".yaml", ".yml"))):
            raise ValueError(f"must be a path ending in .yaml, got {value!r}")
        return value

    def destination(self, host_name: str) -> Path:
        if self.tabula_adopt_profile:
            return Path(self.tabula_adopt_profile)
        return PROFILE_DIR / f"adopted-{safe_name(host_name)}.yaml"


def safe_name(host_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", host_name).strip("-.") or "host"


def load_adopt_settings(host_data: Any) -> AdoptSettings:
    get = host_data.get if hasattr(host_data, "get") else lambda key: getattr(host_data, key, None)
    given = {key: value for key in AdoptSettings.model_fields if (value := get(key)) is not None}
    try:
        return AdoptSettings(**given)
    except ValidationError as error:
        first = error.errors()[0]
        raise TabulaError(f"{first['loc'][0]}: {first['msg'].removeprefix('Value error, ')}") from None


def adopt(run: Run, settings: AdoptSettings) -> Path:
    """Read the target (nothing changed), let every layer describe its nodes, write the profile."""
    host_name = getattr(run.host, "name", "host")
    mounts = {path: {} for path in run.read(MountInfo)}
    root = system_root(settings.tabula_root, mounts)
    found = survey(run, root)
    draft = Draft(found, f"adopted-{safe_name(host_name)}", host_name, partial=settings.tabula_adopt_partial)
    for layer in run.layers:
        layer.adopt(found, draft)
    if any(node.get("needed_for_boot") for node in draft.all_mounts()):
        draft.infer(f"needed_for_boot: every mount but {', '.join(NOT_NEEDED_FOR_BOOT)} (mounted in the initrd, as "
                    "persisted state may live there)")
    text = draft.yaml()
    destination = settings.destination(host_name)
    write_profile(text, destination)
    logger.info(f"{run.prefix}adopt: the profile of the system at {root} is in {destination}"
                + (f" ({len(draft.refused)} part(s) left out, said in it)" if draft.refused else ""))
    return destination
