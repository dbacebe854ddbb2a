"""
What every part of the profile model shares: its error, sizes, the host hash and the base of
every node (a misspelled key is an error naming it, not a silently ignored setting).
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict

from operations.errors import TabulaError

_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:iB|B)?\s*$", re.IGNORECASE)


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
    # extra="forbid": a misspelled key is an error naming it, not a silently ignored setting; a
    # field's docstring is its description (docs/profiles.md is generated from the schema)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
