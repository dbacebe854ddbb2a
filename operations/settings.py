"""
What a run is asked to do, from pyinfra host data (group_data/, inventory.py, ``--data``): a
pydantic model whose fields are the inventory keys, validated before any command runs; errors
name the key at fault. ``docs/profiles.md`` lists them (``tools/profile_reference.py``).

    settings = load_settings(host.data)
    settings.profile                # the loaded Profile (tabula_profile with tabula_vars)
    settings.tabula_install         # ...and every inventory key as given, or its default
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from operations.errors import TabulaError
from operations.profile import Profile, load_profile


def true_or_false(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


class Settings(BaseModel):
    """The inventory keys of a run (each one optional but ``tabula_profile``)."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    tabula_profile: str = Field(description="the profile: a name of profiles/ (e.g. zephyrus-btrfs) or a path to "
                                            "a YAML file")
    tabula_vars: dict[str, Any] = Field({}, description="values for the profile's vars, e.g. "
                                                        '{"disk": "/dev/disk/by-id/nvme-..."}')
    tabula_confirm_wipe: tuple[str, ...] = Field((), description="stable ids (by-id paths or serials) of the disks "
                                                                 "you allow Tabula to wipe although they hold data "
                                                                 "the profile does not describe")
    tabula_install: bool = Field(True, description="run nixos-install at the end")
    tabula_export_pools: bool = Field(True, description="export the ZFS pools at the end, ready for the first "
                                                        "boot; false keeps them imported and mounted under /mnt")
    tabula_nix_check: Literal["auto", "target", "controller", False] = Field(
        "auto", description="evaluate the NixOS configuration before any disk is touched: auto (on the controller "
                            "when tabula_nix_inputs is given, else on the target when it has nix, else skipped and "
                            "said so), target, controller, or false (offline installs)")
    tabula_nix_inputs: dict[str, str] = Field({}, description="flake input name -> folder on the controller to "
                                                              "evaluate with (--override-input)")
    tabula_root: Literal["auto", "/", "/mnt"] = Field("auto", description="where the installed system is, for the "
                                                                          "day-two tools: auto (/mnt when something "
                                                                          "is mounted there, else /), / or /mnt")
    # Not an inventory key: the profile tabula_profile names, loaded with tabula_vars (load_settings).
    profile: Profile | None = Field(None, exclude=True)

    @field_validator("tabula_profile", mode="before")
    @classmethod
    def _profile_name(cls, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("no profile selected: set it in group_data/all.py, inventory.py or "
                             "--data tabula_profile=NAME")
        return value

    @field_validator("tabula_vars", mode="before")
    @classmethod
    def _vars(cls, value: Any) -> dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping of variable names to values, got {type(value).__name__}")
        return value

    @field_validator("tabula_confirm_wipe", mode="before")
    @classmethod
    def _confirm(cls, value: Any) -> tuple[str, ...]:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
            raise ValueError("must be a list of disk ids (by-id paths or serials)")
        return tuple(value)

    _booleans = field_validator("tabula_install", "tabula_export_pools", mode="before")(true_or_false)

    @field_validator("tabula_nix_check", mode="before")
    @classmethod
    def _nix_check(cls, value: Any) -> Any:
        value = "auto" if value is True else value
        if value not in ("auto", "target", "controller", False):
            raise ValueError(f"must be \"auto\", \"target\", \"controller\" or false, got {value!r}")
        return value

    @field_validator("tabula_nix_inputs", mode="before")
    @classmethod
    def _nix_inputs(cls, value: Any) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError("must be a mapping of flake input names to folders on the controller")
        for input_name, folder in value.items():
            if not Path(folder).is_dir():
                raise ValueError(f"[{input_name!r}]: {folder} is not a folder on this controller")
        return dict(value)

    @field_validator("tabula_root", mode="before")
    @classmethod
    def _root(cls, value: Any) -> Any:
        if value not in ("auto", "/", "/mnt"):
            raise ValueError(f"must be \"auto\", \"/\" or \"/mnt\", got {value!r}")
        return value

    @classmethod
    def inventory_keys(cls) -> list[str]:
        return [name for name in cls.model_fields if name.startswith("tabula_")]

    @classmethod
    def of(cls, profile: Profile, **data: Any) -> "Settings":
        """Settings for a profile already loaded (tests, tools): the other keys as given."""
        return cls(tabula_profile=profile.name, profile=profile, **data)


def load_settings(host_data: Any) -> Settings:
    """The settings of ``host_data`` (pyinfra's host data, or a mapping); a value that is not set
    (None) takes the key's default. Raises TabulaError naming the first bad key."""
    def get(key: str) -> Any:
        return host_data.get(key) if hasattr(host_data, "get") else getattr(host_data, key, None)

    given = {key: value for key in Settings.inventory_keys() if (value := get(key)) is not None}
    given.setdefault("tabula_profile", None)
    try:
        settings = Settings(**given)
    except ValidationError as error:
        first = error.errors()[0]       # the keys are checked in the order above: the first is named
        key = str(first["loc"][0])
        message = first["msg"].removeprefix("Value error, ")
        raise TabulaError(f"{key}{'' if message.startswith('[') else ': '}{message}") from None
    return settings.model_copy(update={"profile": load_profile(settings.tabula_profile, settings.tabula_vars)})
