"""
The luks layer: LUKS containers, formatted on a partition that carries no signature yet, and
opened as their mapping.

The passphrase comes from the controller (``TABULA_LUKS_PASSPHRASE`` or ``..._FILE``), is read
once per run by the stages (``run.secrets``) and reaches cryptsetup on stdin only (pyinfra's ``_stdin``), never argv, output or
files. cryptsetup reads it without ``--key-file``: piped stdin is then read up to the first
newline, exactly like a passphrase typed at the boot prompt. (``--key-file=-`` would keep the
newline pyinfra appends to stdin as part of the key, and the typed passphrase would not open it.)

An existing header is never re-formatted: if the passphrase does not open it, the run stops.

With ``tpm2_unlock`` a TPM2 token is enrolled beside the passphrase (``systemd-cryptenroll``), which
stays in its keyslot for recovery (the rescue opens with it); the token is sealed to the profile's
PCRs and the initrd unlocks with it (``crypttabExtraOpts = [ "tpm2-device=auto" ]``). A target
without a TPM 2.0 is refused before any change.
"""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand

from operations.contract import Layer, Target
from operations.errors import TabulaError
from operations.luks.facts import (LuksHeader, LuksMapping, LuksTokens, Tpm2Devices,  # noqa: F401 (the parsers:
                                   parse_cryptsetup_status, parse_luks_dump)               # as luks.parse_*)
from operations.luks.passphrase import PASSPHRASE, passphrase
from operations.luks.tpm2 import passphrase_slots, recovery_problem, token_reads, tpm2_problem, tpm2_token
from operations.nixlit import DeviceIds, NixFragments, nix_string
from operations.profile import Luks, Profile
from operations.run import FactRequest, Made, Run, operation
from operations.run import script as shell_script
from operations.secrets import Secret
from operations.target import SIGNATURE_FOUND_ADVICE, CanonicalPath, WholeDiskSignature


# --- commands ---------------------------------------------------------------------------------


def format_args(luks: Luks) -> list[str]:
    """luksFormat's settings from the profile (the disko export gives disko the same)."""
    args = ["--type", luks.luks_type]
    if luks.cipher:
        args += ["--cipher", luks.cipher]
    if luks.key_size:
        args += ["--key-size", str(luks.key_size)]
    args += ["--pbkdf", luks.pbkdf]
    if luks.pbkdf_iterations:
        args += ["--pbkdf-force-iterations", str(luks.pbkdf_iterations)]
    if luks.pbkdf_memory:
        args += ["--pbkdf-memory", str(luks.pbkdf_memory)]
    return args


def format_command(device: str, luks: Luks, secret: Secret) -> StringCommand:
    args: list = ["cryptsetup", "luksFormat", "--batch-mode", *format_args(luks)]
    args.append(shlex.quote(device))
    # Checked again in the same command: udev may have hidden the device while the facts ran
    # (a partition-table re-read after a close), and a header must never be formatted over.
    quoted = shlex.quote(device)
    script = (f"udevadm settle; [ -b {quoted} ] || {{ echo 'tabula: {device} is missing' >&2; exit 1; }}; "
              f"if cryptsetup isLuks {quoted} || [ -n \"$(blkid -p -o value -s TYPE {quoted})\" ]; then "
              f"echo 'tabula: {device} already carries a signature: not formatting it {SIGNATURE_FOUND_ADVICE}' >&2; "
              "exit 1; fi; "
              + " ".join(str(a) for a in args))
    return shell_script(script, _stdin=secret.reveal())


def open_options(luks: Luks) -> list[str]:
    options = []
    if luks.allow_discards:
        options.append("--allow-discards")
    if luks.bypass_workqueues:
        options += ["--perf-no_read_workqueue", "--perf-no_write_workqueue"]
    return options


def open_command(device: str, luks: Luks, secret: Secret) -> StringCommand:
    # A wrong passphrase must stop the run with a message, never lead to a re-format.
    mapped = shlex.quote(f"/dev/mapper/{luks.mapper}")
    script = (
        f"if [ -e {mapped} ]; then echo 'tabula: /dev/mapper/{luks.mapper} is already open on another device: "
        "close it or rename the mapper in the profile' >&2; exit 1; fi; "
        # --disable-external-tokens: the passphrase opens it, never a TPM2 token (cryptsetup would try
        # the token first and open without the passphrase: a wrong one would go unnoticed)
        f"cryptsetup open --disable-external-tokens {' '.join(open_options(luks))} {shlex.quote(device)} "
        f"{shlex.quote(luks.mapper)} || "
        f"{{ echo \"tabula: the LUKS passphrase does not open {device} (or cryptsetup failed): "
        "the header is kept; check TABULA_LUKS_PASSPHRASE\" >&2; exit 1; }"
    )
    return shell_script(script, _stdin=secret.reveal())


# --- the rules ----------------------------------------------------------------------------------


def wanted_version(luks: Luks) -> int:
    return int(luks.luks_type.removeprefix("luks"))


def version_problem(luks: Luks, header: dict) -> str | None:
    """The header's LUKS version when it is not the profile's (a drift no run may re-format)."""
    have = header.get("version")
    return None if have == wanted_version(luks) else f"LUKS version {have}, the profile wants {wanted_version(luks)}"


def open_flags(luks: Luks) -> list[str]:
    """The flags ``cryptsetup status`` shows for a mapping opened as the profile says."""
    flags = ["discards"] if luks.allow_discards else []
    return flags + (["no_read_workqueue", "no_write_workqueue"] if luks.bypass_workqueues else [])


def container_reads(device: str) -> list[FactRequest]:
    return [(LuksHeader, {"device": device}), (WholeDiskSignature, {"device": device})]


def mapping_reads(device: str, luks: Luks) -> list[FactRequest]:
    return [(LuksMapping, {"mapper": luks.mapper}), (CanonicalPath, {"path": device})]


# --- operations -------------------------------------------------------------------------------


@operation()
def container(run: Run, device: str, luks: Luks):
    """
    Format a LUKS container on a device that has no signature yet. A device that already carries a
    LUKS header is kept as it is; one with any other signature is refused.

    + run: the run (facts, what it made, the passphrase)
    + device: the partition, by its stable path (/dev/disk/by-partlabel/...)
    + luks: the profile's Luks node (type, cipher, key derivation)

    **Example:**

    .. code:: python

        luks.container(run, device="/dev/disk/by-partlabel/cryptroot", luks=profile_luks)
    """
    # A partition this run just made is not read: the format command itself checks it is blank.
    header, signature = (None, {}) if run.before_wipe() or run.created_this_run(Made.device(device)) else run.read_many(
        container_reads(device))
    if header:
        if version_problem(luks, header):
            raise TabulaError(f"{device} holds a LUKS{header.get('version')} header, the profile wants {luks.luks_type}: "
                              "refusing to re-format an existing container (drift)")
        run.noop(f"{device} already holds a {luks.luks_type} header (UUID {header.get('uuid')})")
        return
    if signature.get("TYPE") or signature.get("PTTYPE"):
        found = signature.get("TYPE") or f"{signature['PTTYPE']} partition table"
        if found == "crypto_LUKS":
            # The magic is there but cryptsetup cannot read the header: a luksFormat that was cut
            # short (or a damaged header). Formatting over it could destroy a container with data.
            raise TabulaError(f"{device} carries a LUKS signature but cryptsetup cannot read its header (a luksFormat "
                              "interrupted before it finished, or a damaged header): refusing to format over it. If "
                              f"the partition holds nothing you need, clear it with `wipefs -a {device}` on the target "
                              "and re-run; otherwise restore the header from a backup (cryptsetup luksHeaderRestore)")
        raise TabulaError(f"refusing to luksFormat {device}: it holds a {found} signature")
    run.tell(f"luksFormat {device}: a {luks.luks_type} container (key derivation {luks.pbkdf})")
    run.record_created(Made.luks(device))
    yield format_command(device, luks, passphrase(run))


@operation()
def mapping(run: Run, device: str, luks: Luks):
    """
    Open the LUKS container as /dev/mapper/<mapper>, with the profile's discard and workqueue
    settings. A mapping of that name on another device is refused.

    + run: the run (facts, what it made, the passphrase)
    + device: the partition holding the container (/dev/disk/by-partlabel/...)
    + luks: the profile's Luks node (mapper name, open options)

    **Example:**

    .. code:: python

        luks.mapping(run, device="/dev/disk/by-partlabel/cryptroot", luks=profile_luks)
    """
    # Nothing can be open on a container this run just formatted; the open command itself stops
    # when a mapping of that name is open on another device.
    new = run.created_this_run(Made.luks(device))
    status, backing = (None, None) if new else run.read_many(mapping_reads(device, luks))
    if status:
        if backing and status.get("device") and status["device"] != backing:
            raise TabulaError(f"/dev/mapper/{luks.mapper} is open on {status['device']}, not on {device} "
                              f"({backing}): close it or rename the mapper in the profile")
        run.noop(f"/dev/mapper/{luks.mapper} is already open on {status.get('device', device)}")
        return
    run.tell(f"open {device} as /dev/mapper/{luks.mapper}" + (f" ({', '.join(open_options(luks))})" if open_options(luks) else ""))
    if new:
        run.record_created(Made.device(f"/dev/mapper/{luks.mapper}"))
    yield open_command(device, luks, passphrase(run))


# --- the layer ------------------------------------------------------------------------------------


def open_mapper(found, device: str) -> str | None:
    """The name of the open mapping of a LUKS device (adopt.py's survey), or None."""
    mapping = next((c["name"] for c in found.children(device) if c["type"] == "crypt"), None)
    return mapping.removeprefix("/dev/mapper/") if mapping else None


class LuksLayer(Layer):
    name = "luks"
    absent = "no LUKS container"

    def make(self, run: Run) -> None:
        if run.profile.luks_devices():
            # Checked now, while the deploy is prepared: operation bodies run only at execution, so a
            # passphrase refused there would stop the run after the partition tables were written.
            passphrase(run)
        for part, luks in run.profile.luks_devices():
            container(run, device=part.device, luks=luks, name=f"LUKS format {part.label}")
            mapping(run, device=part.device, luks=luks, name=f"LUKS open {luks.mapper}")
            if luks.tpm2_unlock:
                tpm2_token(run, device=part.device, luks=luks, name=f"LUKS TPM2 token {part.label}")

    def rescue(self, run: Run) -> None:
        """Open each container with the passphrase on stdin, as the install does; never luksFormat."""
        if run.profile.luks_devices():
            passphrase(run)     # checked while the run is prepared, as in make()
        for part, luks in run.profile.luks_devices():
            mapping(run, device=part.device, luks=luks, name=f"LUKS open {luks.mapper}")

    def adopt_reads(self, found) -> list[FactRequest]:
        reads: list[FactRequest] = []
        for device in [d["name"] for d in found.devices if d["fstype"] == "crypto_LUKS"]:
            reads += [(LuksHeader, {"device": device}), (LuksTokens, {"device": device})]
            mapper = open_mapper(found, device)
            reads += [(LuksMapping, {"mapper": mapper})] if mapper else []
        return reads

    def adopt(self, found, draft) -> None:
        """Each LUKS header: its version, key derivation, the open mapping's name and flags, a
        TPM2 token. A closed container's content cannot be read: refused (open it first)."""
        adopted = set(draft.adopted_devices())
        for device in [d["name"] for d in found.devices if d["fstype"] == "crypto_LUKS"]:
            if device not in adopted:
                continue
            mapper = open_mapper(found, device)
            if not mapper and (draft.gpt_code(device) or "") == "8200":
                continue            # a swap partition keyed at random at every boot: the filesystems layer's
            if not mapper:
                draft.refuse(device, "a closed LUKS container: its content cannot be read (open it with "
                                     "cryptsetup open, then adopt again)")
                continue
            header = found.fact(LuksHeader, device=device) or {}
            slots = [slot for slot in header.get("keyslots", {}).values() if slot.get("pbkdf")]
            first = slots[0] if slots else {}
            node = {"type": "luks", "mapper": mapper, "luks_type": f"luks{header.get('version', 2)}",
                    "mapping": f"/dev/mapper/{mapper}"}
            if first.get("pbkdf") in ("argon2id", "argon2i", "pbkdf2"):
                node["pbkdf"] = first["pbkdf"]
                if first["pbkdf"] == "pbkdf2" and str(first.get("iterations", "")).isdigit():
                    node["pbkdf_iterations"] = int(first["iterations"])
            flags = set((found.fact(LuksMapping, mapper=mapper) or {}).get("flags", []))
            node["allow_discards"] = "discards" in flags
            node["bypass_workqueues"] = {"no_read_workqueue", "no_write_workqueue"} <= flags
            tokens = [t for t in (found.fact(LuksTokens, device=device) or {}).values() if t.get("type") == "systemd-tpm2"]
            if tokens:
                node["tpm2_unlock"] = True
                node["tpm2_pcrs"] = sorted(tokens[0].get("tpm2-pcrs", []))
            draft.content(device, node)

    def applies(self, profile: Profile) -> bool:
        return bool(profile.luks_devices())

    def owns(self, node) -> bool:
        return isinstance(node, Luks)

    def tools(self, profile: Profile) -> dict[str, str]:
        needed = {}
        for part, luks in profile.luks_devices():
            needed["cryptsetup"] = f"LUKS container {part.label}"
            if luks.tpm2_unlock:
                needed["systemd-cryptenroll"] = f"the TPM2 token of {part.label} (tpm2_unlock)"
        return needed

    def refusal_reads(self, run: Run) -> list[FactRequest]:
        return [(Tpm2Devices, {})] if any(luks.tpm2_unlock for _, luks in run.profile.luks_devices()) else []

    def refusals(self, run: Run) -> list[str]:
        """A TPM2 token needs a TPM 2.0 on the target: without one the run is refused before any
        change, not after the disks are made."""
        wanted = [part.label for part, luks in run.profile.luks_devices() if luks.tpm2_unlock]
        if not wanted or run.read(Tpm2Devices):
            return []
        return [f"tpm2_unlock (tabula_vars['tpm2_unlock']) for {', '.join(wanted)}: {run.host.name} has no TPM 2.0 "
                "(no /dev/tpmrm* device: none fitted, or off in the firmware settings); turn it on in the "
                "firmware, or set tpm2_unlock to false and unlock with the passphrase"]

    def secrets(self, settings, rescue: bool) -> dict[str, bool]:
        return {PASSPHRASE: True} if settings.profile.luks_devices() else {}

    def observe(self, run: Run) -> list[FactRequest]:
        return [read for part, luks in run.profile.luks_devices()
                for read in container_reads(part.device) + mapping_reads(part.device, luks) + token_reads(part.device, luks)]

    def problems(self, target: Target) -> list[str]:
        """Each container's LUKS header (version, key derivation, cipher when the profile sets
        one) and its mapping open on that partition with the profile's flags."""
        failures = []
        for part, luks in target.settings.profile.luks_devices():
            header = target.read(LuksHeader, device=part.device)
            version = wanted_version(luks)
            if header is None:
                failures.append(f"{part.device}: no LUKS header (the profile wants {luks.luks_type})")
            else:
                if version_problem(luks, header):
                    failures.append(f"{part.device}: {version_problem(luks, header)}")
                # a token's keyslot (a TPM2 one: pbkdf2 over a random key) is not the passphrase's
                tokens = target.read(LuksTokens, device=part.device) if version == 2 else None
                pbkdfs = sorted({slot.get("pbkdf") for number, slot in passphrase_slots(header, tokens).items()
                                 if slot.get("pbkdf")})
                if version == 2 and pbkdfs != [luks.pbkdf]:
                    failures.append(f"{part.device}: key slots derive keys with {', '.join(pbkdfs) or 'nothing'}, "
                                    f"the profile wants {luks.pbkdf}")
                if luks.cipher and header.get("cipher") != luks.cipher:
                    failures.append(f"{part.device}: cipher {header.get('cipher')}, the profile wants {luks.cipher}")
                failures += [f"{part.device}: {problem}" for problem in
                             (tpm2_problem(luks, tokens), recovery_problem(header, tokens)) if problem]
            mapped = target.read(LuksMapping, mapper=luks.mapper)
            if mapped is None:
                failures.append(f"/dev/mapper/{luks.mapper}: not open")
                continue
            on = target.read(CanonicalPath, path=part.device)
            if on and mapped.get("device") and target.read(CanonicalPath, path=mapped["device"]) != on:
                failures.append(f"/dev/mapper/{luks.mapper}: opened from {mapped['device']}, not {part.device} ({on})")
            missing = [flag for flag in open_flags(luks) if flag not in mapped["flags"]]
            if missing:
                failures.append(f"/dev/mapper/{luks.mapper}: flags {' '.join(mapped['flags']) or 'none'} "
                                f"lack {' '.join(missing)}")
        return failures

    def nix(self, profile: Profile, devices: DeviceIds) -> NixFragments:
        """hardware-configuration.nix: the initrd opens each container (by its UUID) before the
        filesystems inside it are mounted, asking for the passphrase at boot."""
        parts: list[str] = []
        for part, luks in profile.luks_devices():
            lines = [f"  boot.initrd.luks.devices.{nix_string(luks.mapper)} = {{",
                     f"    device = {nix_string(devices.path(part.device))};"]
            if luks.allow_discards:
                lines.append("    allowDiscards = true;")
            if luks.bypass_workqueues:
                lines.append("    bypassWorkqueues = true;")
            if luks.tpm2_unlock:
                # systemd-cryptsetup in stage 1 tries the TPM2 token first, then asks for the passphrase
                lines.append('    crypttabExtraOpts = [ "tpm2-device=auto" ];')
            lines.append("  };")
            parts.append("\n".join(lines))
        # (the default with a systemd stage 1, said because the unlock depends on it; in
        # configuration.nix: hardware-configuration.nix holds only the storage the patch replaces)
        tpm2 = any(luks.tpm2_unlock for _, luks in profile.luks_devices())
        return NixFragments(hardware="\n\n".join(parts),
                            configuration="  boot.initrd.systemd.enableTpm2 = true;" if tpm2 else "")

    def gaps(self, run: Run, root: str) -> tuple[list, list[str]]:
        return [], []

    def disko(self, profile: Profile, context) -> dict:
        return {}

    def disko_node(self, node: Luks, device: str, part, context) -> dict | None:
        """settings become boot.initrd.luks.devices.<name> (and disko's open flags); no passwordFile:
        disko asks for the passphrase at the terminal (askPassword), Tabula reads it on stdin."""
        settings = {}
        if node.allow_discards:
            settings["allowDiscards"] = True
        if node.bypass_workqueues:
            settings["bypassWorkqueues"] = True
        if node.tpm2_unlock:
            # the unlock; the token itself is enrolled by Tabula (disko enrolls none: disko #709)
            settings["crypttabExtraOpts"] = ["tpm2-device=auto"]
        made = {"type": "luks", "name": node.mapper, "settings": settings, "extraFormatArgs": format_args(node)}
        inner = context.content(node.content, node.device, part)
        if inner:
            made["content"] = inner
        return made


LAYER = LuksLayer()
