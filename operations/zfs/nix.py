"""
The NixOS side of the zfs layer: ZFS support, ``networking.hostId``, the pool imported by
partlabel, the passphrase prompt, and the initrd service that rolls the temp datasets back to
@empty at every boot.
"""

from __future__ import annotations

import shlex

from operations.nixlit import HIBERNATE_RESUME, NixFragments, nix_indented_string, nix_list, nix_string
from operations.profile import Profile
from operations.zfs.common import EMPTY_SNAPSHOT, temp_datasets


def rollback_script(profile: Profile) -> str:
    """The shell script that rolls every temp dataset back to @empty (initrd, and the e2e tests)."""
    lines = ["set -eu"]
    lines += [f"zfs rollback -r {shlex.quote(f'{name}@{EMPTY_SNAPSHOT}')}" for name in temp_datasets(profile)]
    return "\n".join(lines) + "\n"


def nix_configuration(profile: Profile) -> str:
    """
    configuration.nix bindings (two-space indent) for the profile's pools, or "" without pools:
    ZFS support, ``networking.hostId`` (= ``profile.host_id``), import by partlabel, and the
    passphrase prompt for the encrypted datasets.

    Unlocking: the encrypted datasets keep ``keylocation=prompt``; with
    ``boot.zfs.requestEncryptionCredentials`` the initrd asks for the passphrase (the one tabula
    read from TABULA_ZFS_KEY) when it imports the pool for the neededForBoot mounts (``/remote``).
    Nothing that unlocks the data is stored on the machine, like the LUKS passphrase.
    """
    if not profile.pools:
        return ""
    encrypted = [f"{p.name}/{d.name}" for p in profile.pools.values() for d in p.datasets if d.encryption]
    lines = [
        "  # ZFS (pools from the profile)",
        '  boot.supportedFilesystems = [ "zfs" ];',
        f"  networking.hostId = {nix_string(profile.host_id)};  # first 8 hex chars of sha256(host name)",
        "  # Member partitions are found by their partlabels (they carry the host hash).",
        '  boot.zfs.devNodes = "/dev/disk/by-partlabel";',
        "  # Prompt for the passphrase of the encrypted datasets in the initrd (keylocation=prompt).",
        f"  boot.zfs.requestEncryptionCredentials = {nix_list(encrypted) if encrypted else 'false'};",
        "  services.zfs.autoScrub.enable = true;",
    ]
    if profile.nixos.hibernate:
        lines += [
            "  # Hibernation (nixos.hibernate): NixOS puts nohibernate on the kernel command line",
            "  # unless this is set, and a forced import before a resume would corrupt the pool.",
            "  boot.zfs.allowHibernation = true;",
            "  boot.zfs.forceImportRoot = false;",
        ]
    return "\n".join(lines) + "\n"


def nix_rollback_service(profile: Profile) -> str:
    """
    impermanence.nix bindings: the initrd (systemd stage 1) service that runs ``rollback_script``
    after the pool import and before ``/`` is mounted; "" when no dataset has an @empty snapshot.
    """
    temps = temp_datasets(profile)
    if not temps:
        return ""
    pools = sorted({name.split("/", 1)[0] for name in temps})
    import_units = [f"zfs-import-{name}.service" for name in pools]
    imports = nix_list(import_units)
    lines = [
        "  # Rollback service: the temp datasets return to their @empty snapshots at every boot,",
        "  # after the pool is imported and before / is mounted (systemd stage 1); after the initrd",
        "  # has tried to resume from hibernation too, so a resumed system keeps the root it left.",
        "  boot.initrd.systemd.services.tabula-rollback-temp = {",
        '    description = "Roll the temp datasets back to @empty";',
        '    wantedBy = [ "initrd.target" ];',
        f"    requires = {imports};",
        f"    after = {nix_list([*import_units, HIBERNATE_RESUME])};",
        '    before = [ "sysroot.mount" ];',
        "    path = [ config.boot.zfs.package ];",
        '    unitConfig.DefaultDependencies = "no";',
        '    serviceConfig.Type = "oneshot";',
        f"    script = {nix_indented_string(rollback_script(profile))};",
        "  };",
    ]
    return "\n".join(lines) + "\n"


def nix_fragments(profile: Profile) -> NixFragments:
    """configuration.nix: ZFS support, hostId, pool import, key prompt; impermanence.nix: the
    initrd service that rolls the temp datasets back to @empty."""
    return NixFragments(configuration=nix_configuration(profile), impermanence=nix_rollback_service(profile))
