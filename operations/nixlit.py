"""
Nix text for the layers' fragments: literals (strings, attribute names, lists, ''-strings),
systemd unit-name escaping, the device path the installed system uses, and ``NixFragments``,
what a layer adds to each generated file. Pure functions; no layer imports here.

    from operations.nixlit import NixFragments, nix_string, nix_list, stable_device
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from operations.errors import TabulaError


def nix_string(value: object) -> str:
    """A Nix double-quoted string literal."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    # (a line break as \n: the literal would be the same string, spread over lines)
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{text}"'


def nix_attr(value: str) -> str:
    """An attribute name: bare when it is an identifier, quoted otherwise."""
    return value if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'-]*", value) else nix_string(value)


def nix_indented_string(text: str, indent: str = "      ") -> str:
    """A Nix ''-string holding ``text`` verbatim (``''`` and ``${`` escaped)."""
    escaped = text.replace("''", "'''").replace("${", "''${")
    body = "".join(f"{indent}{line}\n" if line else "\n" for line in escaped.splitlines())
    return f"''\n{body}{indent[:-2]}''"


def nix_list(items) -> str:
    return "[ " + "".join(f"{nix_string(i)} " for i in items) + "]"


def systemd_escape(value: str, path: bool = False) -> str:
    """systemd-escape [--path]: the unit name part for an instance or a path."""
    if path:
        value = value.strip("/") or "-"
        if value == "-":
            return value
    out = []
    for i, ch in enumerate(value):
        if ch == "/" and path:
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode()))
    return "".join(out)


@dataclass(frozen=True)
class NixFragments:
    """Bindings (two-space indented) a layer adds to the generated files.

    + hardware: to hardware-configuration.nix, in place of what nixos-generate-config detected
      (the initrd's LUKS devices, fileSystems, swapDevices)
    + configuration: to configuration.nix (initrd modules, pool import, maintenance)
    + impermanence: to impermanence.nix (the initrd service that empties the root)
    + files: (file name, module text) written beside them and imported by configuration.nix
    """

    hardware: str = ""
    configuration: str = ""
    impermanence: str = ""
    files: tuple[tuple[str, str], ...] = ()  # (file name, module text): written and imported


# The initrd's resume from hibernation (systemd stage 1): what empties the root at boot is
# ordered after it (the unit runs only where a resume device is set; an order on it costs nothing).
HIBERNATE_RESUME = "systemd-hibernate-resume.service"


def device_units(device: str) -> list[str]:
    """Units that must be up before the device can be mounted in the initrd."""
    units = []
    if device.startswith("/dev/mapper/"):
        units.append(f"systemd-cryptsetup@{systemd_escape(device.removeprefix('/dev/mapper/'))}.service")
    units.append(f"{systemd_escape(device, path=True)}.device")
    return units


class MissingDeviceIds(TabulaError):
    """A device the configuration names by UUID does not exist (yet)."""


def _lookup(ids: dict | None, device: str, key: str, placeholder: bool) -> str:
    value = (ids or {}).get(device, {}).get(key)
    if value:
        return value
    if placeholder:
        return ""
    raise MissingDeviceIds(f"{device}: no {key} yet (the device does not exist or has no signature)")


def stable_device(device: str, ids: dict | None, key: str = "UUID", placeholder: bool = False) -> str:
    """The path the installed system uses: by-uuid (or by-partuuid) for partitions.

    With ``placeholder`` (review without disks) a partition without known ids keeps its
    by-partlabel path, which is just as stable; the installed config always gets the UUID.
    """
    if not device.startswith("/dev/disk/by-partlabel/"):
        return device  # /dev/mapper/<name>, a ZFS dataset, tmpfs "none" or a bind source
    value = _lookup(ids, device, key, placeholder)
    if not value:
        return device
    folder = "by-uuid" if key == "UUID" else "by-partuuid"
    return f"/dev/disk/{folder}/{value}"


@dataclass(frozen=True)
class DeviceIds:
    """Where the generated configuration takes the devices' ids from: blkid's view of the
    target (``BlockDeviceIds``), or none yet (``placeholder``: a partition keeps its by-partlabel
    path, for review without disks and the evaluation before the install).

    + ids: ``{device: {"UUID": ..., "PARTUUID": ...}}``
    + placeholder: partitions without ids keep their by-partlabel paths
    + facts: what the layers' ``nix_reads`` read, by their keys (e.g. a swapfile's resume offset)
    """

    ids: dict | None = None
    placeholder: bool = False
    facts: dict | None = None

    def path(self, device: str, key: str = "UUID") -> str:
        """The path the installed system uses for ``device`` (``stable_device``)."""
        return stable_device(device, self.ids, key, self.placeholder)

    def fact(self, key: str, missing: str):
        """The value a layer's ``nix_reads`` read under ``key``. None when nothing was read
        (rendering without a target: the review, the evaluation before the install) or, with
        ``placeholder``, when the read found nothing; a read of the target that found nothing
        otherwise stops the rendering (``missing`` says what is not there yet)."""
        facts = self.facts or {}
        if key not in facts or facts[key] is not None or self.placeholder:
            return facts.get(key)
        raise MissingDeviceIds(missing)
