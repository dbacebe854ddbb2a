"""
Loading a profile: the YAML file, its vars substituted (``${var}``; a string that is exactly
``${var}`` takes the var's value with its type), validated, errors naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from operations.profile.common import ProfileError, host_hash
from operations.profile.model import Profile

PROFILE_DIR = Path(__file__).resolve().parent.parent.parent / "profiles"
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A var declared with this value has no default: inventory data must supply it.
REQUIRED = "REQUIRED"


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
