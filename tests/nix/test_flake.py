"""The project's flake (flake.nix, nix/): the package, the dev shell and the installer image
evaluate against the offline kit, and the Python it pins is what pyproject.toml asks for.

One ``nix eval`` (tests/nix/flake_eval.py) reads everything; the pinned wheels are checked
against the files pip installs (``pip download`` of exactly the pinned file, cached under
~/.cache/tabula/wheels). Not proven here: that anything builds (nothing can be built offline).
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from operations import disks
from operations.profile import available_profiles, load_profile
from tests import profile_cases
from tests.nix.flake_eval import PINS, PROJECT, evaluate_flake

WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tabula" / "wheels"
# The installer's package (by its Nix name) that brings each command the guard asks the target for
# (operations/disks.py required_tools and the layers'); a new tool fails the test until named here.
TOOL_PACKAGES = {
    "sgdisk": "gptfdisk", "wipefs": "util-linux", "blkid": "util-linux", "lsblk": "util-linux",
    "blockdev": "util-linux", "mount": "util-linux", "umount": "util-linux", "mountpoint": "util-linux",
    "mkswap": "util-linux", "swapon": "util-linux", "udevadm": "systemd", "base64": "coreutils-full",
    "sha256sum": "coreutils-full", "tar": "gnutar", "ssh-keygen": "openssh", "chattr": "e2fsprogs",
    "nixos-generate-config": "nixos-generate-config", "nixos-install": "nixos-install",
    "cryptsetup": "cryptsetup", "btrfs": "btrfs-progs", "mkfs.btrfs": "btrfs-progs", "mkfs.vfat": "dosfstools",
    "mkfs.f2fs": "f2fs-tools", "mkfs.ext4": "e2fsprogs", "zpool": "zfs", "zfs": "zfs",
}


@pytest.fixture(scope="module")
def flake() -> dict:
    values, seconds = evaluate_flake()
    print(f"\nnix eval of the flake: {seconds:.1f} s")
    return values


@pytest.fixture(scope="module")
def modules(flake) -> dict:
    """The package's Python closure as Nix evaluated it: canonical name -> module."""
    return {canonicalize_name(m["name"]): m for m in flake["modules"]}


def python_version(flake_modules: dict) -> str:
    return flake_modules["python3"]["version"]


def marker_environment(version: str) -> dict:
    return {"python_version": ".".join(version.split(".")[:2]), "python_full_version": version,
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_machine": "x86_64", "extra": ""}


def wheel_tags(file: str) -> tuple[str, str, str, str, str]:
    name, version, python, abi, platform = re.fullmatch(r"([^-]+)-([^-]+)-([^-]+)-([^-]+)-(.+)\.whl", file).groups()
    return name, version, python, abi, platform


def pinned_file(file: str) -> Path:
    """The pinned wheel as pip downloads it (cached): pip asked for exactly that name, version and tags."""
    path = WHEEL_CACHE / file
    if not path.is_file():
        name, version, python, abi, platform = wheel_tags(file)
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                "-d", str(WHEEL_CACHE), f"{name}=={version}"]
        if platform != "any":
            argv += ["--implementation", "cp", "--python-version", python.removeprefix("cp"), "--abi", abi,
                     *[arg for p in platform.split(".") for arg in ("--platform", p)]]
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, timeout=600)
    assert path.is_file(), f"pip downloaded another file than the pinned {file}: {sorted(os.listdir(WHEEL_CACHE))}"
    return path


def sri(path: Path) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()


def metadata(path: Path):
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(wheel.read(name).decode())


def pinned_module(modules: dict, attr: str) -> dict:
    """The pinned package as Nix evaluated it in the package's closure."""
    module = modules.get(canonicalize_name(attr))
    assert module is not None, f"{attr} is pinned in nix/pins.json but nothing in the package needs it"
    return module


def test_package_shell_and_installer_evaluate(flake):
    assert re.fullmatch(r"/nix/store/\w{32}-tabula-0\.1\.0\.drv", flake["package"])
    assert flake["app"].startswith("/nix/store/") and flake["app"].endswith("-tabula-0.1.0/bin/tabula")
    assert re.fullmatch(r"/nix/store/\w{32}-nix-shell\.drv", flake["shell"])
    assert re.fullmatch(r"/nix/store/\w{32}-nixos-system-nixos-24\.05[^/]*\.drv", flake["installer"])
    assert re.fullmatch(r"/nix/store/\w{32}-nixos-tabula-24\.05[^/]*-x86_64-linux\.iso\.drv", flake["iso"])


def test_pyproject_requirements_are_what_the_flake_pins(modules):
    """Every dependency of pyproject.toml (and its test extra, for `tabula verify`) is in the
    package at a version its specifier allows: pyinfra==3.10.* against the flake's pyinfra."""
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    wrong = []
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        requirement = Requirement(line)
        found = modules.get(canonicalize_name(requirement.name))
        if found is None or not requirement.specifier.contains(found["version"], prereleases=True):
            wrong.append(f"pyproject.toml wants {line}, the flake has {found and found['version']}")
    assert not wrong, "\n".join(wrong)


def test_pins_are_the_wheels_nix_fetches(modules):
    """What Nix evaluated for each pin: the URL fetchPypi made ends in the pinned file name, with
    its version, and the hash is pins.json's."""
    for attr, pin in PINS.items():
        module = pinned_module(modules, attr)
        assert module["url"].rsplit("/", 1)[1] == pin["file"], attr
        assert module["version"] == wheel_tags(pin["file"])[1], attr
        assert module["hash"] == pin["hash"], attr


@pytest.mark.parametrize("attr", sorted(PINS))
def test_pinned_hash_is_the_file_pip_installs(attr, modules):
    path = pinned_file(PINS[attr]["file"])
    assert sri(path) == pinned_module(modules, attr)["hash"], f"{path.name}: the flake's hash is not the file's"


@pytest.mark.parametrize("attr", sorted(PINS))
def test_pinned_wheel_gets_what_it_requires(attr, modules):
    """A wheel's Requires-Dist (for Python 3.11 on Linux) is met in the package's closure, by a
    dependency pins.json names, and its Requires-Python and tags fit the evaluated Python: what
    pip checks when it installs, and what nixpkgs' runtime-deps check does not do for wheels."""
    pin = PINS[attr]
    version = python_version(modules)
    environment = marker_environment(version)
    data = metadata(pinned_file(pin["file"]))
    problems = []
    if data["Requires-Python"] and not SpecifierSet(data["Requires-Python"]).contains(version):
        problems.append(f"Requires-Python {data['Requires-Python']}, Python is {version}")
    _, _, python, abi, _ = wheel_tags(pin["file"])
    ours = "cp" + "".join(version.split(".")[:2])
    if python.startswith("cp") and not (abi == "abi3" and int(python[2:]) <= int(ours[2:]) or python == abi == ours):
        problems.append(f"built for {python}-{abi}, Python is {version}")
    named = {canonicalize_name(d) for d in pin["dependencies"]}
    for line in data.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        found = modules.get(name)
        if name not in named:
            problems.append(f"requires {line}: not among its dependencies in pins.json")
        if found is None or not requirement.specifier.contains(found["version"], prereleases=True):
            problems.append(f"requires {line}, the package has {found and found['version']}")
    assert not problems, f"{pin['file']}:\n" + "\n".join(problems)


def test_one_version_of_each_python_package(flake):
    """Two versions of a package in one environment collide when it is built: nixpkgs' own
    packages must not bring a second copy of a pinned one."""
    names = [canonicalize_name(m["name"]) for m in flake["modules"]]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_installer_has_what_every_profile_needs(flake):
    """The installer image carries tabula (the flake's package) and, for every profile, each
    command the guard asks the target for, and ZFS (kernel module and tools)."""
    installed = {p["name"]: p["drv"] for p in flake["installerPackages"]}
    assert installed.get("tabula") == flake["package"]
    missing = []
    for name in available_profiles():
        profile = load_profile(name, profile_cases.render_vars(name))
        for tool, why in disks.required_tools(profile, install=True).items():
            if tool.endswith(" kernel module"):
                module = tool.removesuffix(" kernel module")
                if module not in flake["supportedFilesystems"] or module not in flake["kernelModulePackages"]:
                    missing.append(f"{name}: {tool} ({why})")
            elif TOOL_PACKAGES[tool] not in installed:
                missing.append(f"{name}: {tool} from {TOOL_PACKAGES[tool]} ({why})")
    assert not missing, "\n".join(missing)
