"""
What the luks layer reads: a LUKS header (``cryptsetup luksDump``), its tokens (the header's JSON
metadata), an open mapping (``cryptsetup status``) and the target's TPM 2.0 devices. Parsers are
tested on output captured in the VM.
"""

from __future__ import annotations

import json
import re
import shlex

from pyinfra.api import FactBase

from operations.factbatch import SETTLE


class LuksHeader(FactBase):
    """
    The LUKS header of a device from ``cryptsetup luksDump`` (None: no header, or no device).

    .. code:: python

        {"version": 2, "uuid": "0b6c...", "cipher": "aes-xts-plain64", "keyslots": {"0": {"pbkdf": "pbkdf2"}}}
    """

    def command(self, device: str) -> str:
        quoted = shlex.quote(device)
        return SETTLE + f"if [ -b {quoted} ]; then cryptsetup luksDump {quoted} 2>/dev/null || true; fi"

    def requires_command(self, device: str) -> str:
        return "cryptsetup"

    def process(self, output):
        return parse_luks_dump(output)


def parse_luks_dump(lines) -> dict | None:
    lines = list(lines)
    if not lines or not lines[0].startswith("LUKS header information"):
        return None
    header: dict = {"keyslots": {}, "flags": []}
    section, slot = None, None
    for raw in lines[1:]:
        if not raw.strip():
            continue
        if not raw.startswith((" ", "\t")):
            key, _, value = raw.partition(":")
            key, value = key.strip(), value.strip()
            if value:
                if key == "Version":
                    header["version"] = int(value)
                elif key == "UUID":
                    header["uuid"] = value
                elif key == "Label":
                    header["label"] = None if value == "(no label)" else value
                elif key == "Flags":
                    header["flags"] = [] if value == "(no flags)" else value.split()
                elif key == "Cipher name":          # LUKS1
                    header["cipher"] = value
                elif key == "Hash spec":             # LUKS1
                    header["hash"] = value
                section = None
            else:
                section = key
            continue
        text = raw.strip()
        if section == "Keyslots":
            match = re.match(r"^(\d+): (\S+)", text)
            if match and not raw.startswith("\t\t"):
                slot = match.group(1)
                header["keyslots"][slot] = {"type": match.group(2)}
                continue
            key, _, value = text.partition(":")
            if slot is not None and value:
                header["keyslots"][slot][key.strip().lower().replace(" ", "_")] = value.strip()
        elif section == "Data segments":
            key, _, value = text.partition(":")
            if key.strip() == "cipher":
                header["cipher"] = value.strip()
        elif section is None and text.startswith("Key Slot "):   # LUKS1: "Key Slot 0: ENABLED"
            match = re.match(r"Key Slot (\d+): ENABLED", text)
            if match:
                header["keyslots"][match.group(1)] = {"type": "luks1"}
    return header


class LuksMapping(FactBase):
    """
    An open device-mapper crypt mapping from ``cryptsetup status`` (None when not active).

    .. code:: python

        {"type": "LUKS2", "device": "/dev/nvme0n1p2", "flags": ["discards", "no_read_workqueue"]}
    """

    def command(self, mapper: str) -> str:
        return f"cryptsetup status {shlex.quote(mapper)} 2>/dev/null || true"

    def requires_command(self, mapper: str) -> str:
        return "cryptsetup"

    def process(self, output):
        return parse_cryptsetup_status(output)


def parse_cryptsetup_status(lines) -> dict | None:
    lines = list(lines)
    if not lines or " is active" not in lines[0]:
        return None
    status: dict = {"flags": []}
    for line in lines[1:]:
        key, _, value = line.strip().partition(":")
        key, value = key.strip(), value.strip()
        if key == "flags":
            status["flags"] = value.split()
        elif key in ("type", "cipher", "device", "keysize", "mode"):
            status[key] = value
    return status


class LuksTokens(FactBase):
    """
    The tokens of a LUKS2 header by id, from its JSON metadata (``cryptsetup luksDump
    --dump-json-metadata``); None: no LUKS2 header, or no device.

    .. code:: python

        {"0": {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [7], ...}}
    """

    def command(self, device: str) -> str:
        quoted = shlex.quote(device)
        return (SETTLE + f"if [ -b {quoted} ] && cryptsetup isLuks --type luks2 {quoted}; then "
                f"cryptsetup luksDump --dump-json-metadata {quoted}; fi")

    def requires_command(self, device: str) -> str:
        return "cryptsetup"

    def process(self, output):
        text = "\n".join(output).strip()
        return json.loads(text).get("tokens", {}) if text else None


class Tpm2Devices(FactBase):
    """
    The TPM 2.0 devices of the target: the kernel makes a resource manager device
    (``/dev/tpmrm<N>``) for TPM 2.0 chips only, and ``systemd-cryptenroll --tpm2-device=auto``
    uses it.

    .. code:: python

        ["/dev/tpmrm0"]
    """

    def command(self) -> str:
        return "for d in /dev/tpmrm*; do [ -c \"$d\" ] && echo \"$d\"; done; true"

    def process(self, output):
        return [line.strip() for line in output if line.strip()]
