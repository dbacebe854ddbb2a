"""
How adopt.py writes what it read into a profile: sizes in the unit a user would write, mount
options without the kernel's own. Shared by the layers' ``adopt`` (pure, no facts).
"""

from __future__ import annotations

import re

from operations.target import FileText, Folders, under

# The kernel's own options, or ones Tabula adds itself: never written into an adopted profile.
KERNEL_OPTIONS = {"rw", "relatime", "seclabel", "subvol", "subvolid", "space_cache", "ssd", "inode64",
                  "zfsutil", "xattr", "posixacl", "noacl", "casesensitive", "codepage", "iocharset",
                  "shortname", "errors", "user_xattr", "acl", "inline_data", "inline_xattr", "inline_dentry",
                  "flush_merge", "extent_cache", "mode", "active_logs", "alloc_mode", "fsync_mode",
                  "checkpoint_merge", "discard_unit", "memory", "background_gc", "data", "utf8", "barrier",
                  "nodiscard", "nouser_xattr", "noinline_data", "lazytime", "nogc_merge", "age_extent_cache",
                  "compress_log_size", "noquota"}


# What the initrd need not mount: everything else is mounted there (``neededForBoot``), as
# persisted state may live on it (inferred: the disks do not say it).
NOT_NEEDED_FOR_BOOT = ("/", "/boot", "/tmp", "/swap")
# What a root must be to be an ephemeral one, for a refusal to say.
EPHEMERAL_ROOTS = ("a tmpfs, a btrfs subvolume with a blank snapshot or a ZFS dataset with @empty")


def mounted_at(mountpoint: str, options: list[str]) -> dict:
    """A node's mount as a profile holds it: where, its options as a user writes them, and
    ``needed_for_boot`` (inferred: every mount but NOT_NEEDED_FOR_BOOT)."""
    node = {"mountpoint": mountpoint, "mount_options": user_options(options)}
    if mountpoint not in NOT_NEEDED_FOR_BOOT:
        node["needed_for_boot"] = True
    return node


def size_text(size: int) -> str:
    """Bytes as the largest exact binary unit: 1073741824 -> 1GiB, 3221225472 -> 3GiB."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def user_options(options: list[str]) -> list[str]:
    """A mount's options as a user would write them: without the kernel's own (``rw``,
    ``relatime``, ``subvol=``...), a tmpfs size in the unit it was given in."""
    kept = []
    for option in options:
        key, sep, value = option.partition("=")
        if key in KERNEL_OPTIONS or key.startswith("space_cache"):
            continue
        if key == "size" and value.endswith("k"):
            option = f"size={size_text(int(value[:-1]) * 1024).removesuffix('iB')}"
        kept.append(option)
    return kept


# --- what the NixOS configuration's text says (adopt.py reads /etc/nixos of the installed system) ---

# The NixOS configuration files whose text says what the disks cannot (host, user, persistence).
CONFIG_FILES = ("configuration.nix", "impermanence.nix", "hardware-configuration.nix", "flake.nix")


def config_reads(root: str) -> list:
    return [(FileText, {"path": f"{root.rstrip('/')}/etc/nixos/{name}"}) for name in CONFIG_FILES]


def config_texts(found) -> dict[str, str]:
    """{file name: text} of the configuration files there are."""
    texts = {}
    for name, (fact, kwargs) in zip(CONFIG_FILES, config_reads(found.root)):
        text = found.fact(fact, **kwargs)
        if text is not None:
            texts[name] = text
    return texts

_STRING = r'"((?:[^"\\]|\\.)*)"'


def configured(texts: dict[str, str], pattern: str) -> str | None:
    """The first string value the configuration files give an option (``networking.hostName``):
    a plain reading of ``option = "value";``, not an evaluation."""
    for text in texts.values():
        match = re.search(pattern + r"\s*=\s*" + _STRING + r"\s*;", text)
        if match:
            return match.group(1)
    return None


def normal_user(texts: dict[str, str]) -> str | None:
    """The first ``users.users.<name>`` with ``isNormalUser = true``."""
    for text in texts.values():
        for match in re.finditer(r'users\.users\.("?)([a-z_][a-z0-9_-]*)\1\s*=\s*\{(.*?)\};', text, re.S):
            if re.search(r"isNormalUser\s*=\s*true", match.group(3)):
                return match.group(2)
    return None


def configured_persistence(texts: dict[str, str]) -> dict | None:
    """``environment.persistence."<root>"``'s root, directories and files (plain strings only:
    an entry given as an attribute set is left out)."""
    for text in texts.values():
        match = re.search(r'environment\.persistence\.' + _STRING + r'\s*=\s*\{', text)
        if not match:
            continue
        body = text[match.end():]
        found: dict = {"root": match.group(1)}
        for key in ("directories", "files"):
            listed = re.search(key + r"\s*=\s*\[(.*?)\];", body, re.S)
            plain = re.sub(r"\{[^{}]*\}", "", listed.group(1)) if listed else ""     # attribute-set entries out
            found[key] = [path for path in re.findall(_STRING, plain) if path.startswith("/")]
        return found
    return None


def system_reads(found) -> list:
    """What the nixos layer's adoption reads: the configuration's text, the folders of /home."""
    return config_reads(found.root) + [(Folders, {"path": under(found.root, "/home")})]


def adopt_system(found, draft) -> None:
    """The nixos layer's adoption: ``draft.nixos`` from the configuration's text."""
    homes = found.fact(Folders, path=under(found.root, "/home"))
    draft.nixos, notes = adopted_system(config_texts(found), homes, draft.host, draft.has_resume_swap())
    draft.inferred += notes


def adopted_system(texts: dict[str, str], homes: list[str], host_name: str, has_resume_swap: bool) -> tuple[dict, list[str]]:
    """(the ``nixos`` settings read from the configuration's text, what was inferred): the host
    name, the normal user (else the only folder in /home), time zone, state version, the
    nixos-hardware module the flake names, hibernation (a ``boot.resumeDevice``)."""
    notes = []
    hostname = configured(texts, r"networking\.hostName")
    if not hostname:
        hostname = re.sub(r"[^a-z0-9-]+", "-", host_name.lower()).strip("-")[:63] or "nixos"
        notes.append(f"nixos.hostname {hostname}: no networking.hostName in /etc/nixos, the inventory host's name")
    user = normal_user(texts)
    if not user:
        user = homes[0] if len(homes) == 1 and re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", homes[0]) else "nixos"
        notes.append(f"nixos.user {user}: no users.users.<name> with isNormalUser in /etc/nixos, "
                     + ("the only folder in /home" if user != "nixos" else "a placeholder: set yours"))
    system = {"hostname": hostname, "user": user}
    for key, pattern in (("timezone", r"time\.timeZone"), ("state_version", r"system\.stateVersion")):
        value = configured(texts, pattern)
        if value:
            system[key] = value
    module = next((m.group(1) for text in texts.values()
                   for m in [re.search(r"nixos-hardware\.nixosModules\.([\w-]+)", text)] if m), None)
    if module:
        system["hardware_module"] = module
    if has_resume_swap and any(re.search(r"boot\.resumeDevice\s*=", text) for text in texts.values()):
        system["hibernate"] = True
    return system, notes
