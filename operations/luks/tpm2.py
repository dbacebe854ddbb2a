"""
The TPM2 token of a LUKS2 container (``tpm2_unlock``): enrolled with ``systemd-cryptenroll``
beside the passphrase, which stays in its keyslot for recovery, sealed to the profile's PCRs. The
rules here decide for the operation and for ``problems`` alike.
"""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand

from operations.luks.facts import LuksTokens
from operations.luks.passphrase import passphrase
from operations.profile import Luks
from operations.run import FactRequest, Made, Run, operation
from operations.run import script as shell_script
from operations.secrets import Secret


def tpm2_tokens(tokens: dict | None) -> list[dict]:
    """The systemd-tpm2 tokens of a header, each {"id", "keyslots", "pcrs"} (systemd writes the
    PCRs as ``tpm2-pcrs`` up to 251, ``tpm2-hash-pcrs`` since)."""
    found = []
    for token_id, token in sorted((tokens or {}).items(), key=lambda item: int(item[0])):
        if token.get("type") == "systemd-tpm2":
            pcrs = token.get("tpm2-hash-pcrs", token.get("tpm2-pcrs", []))
            found.append({"id": token_id, "keyslots": list(token.get("keyslots", [])), "pcrs": sorted(pcrs)})
    return found


def tpm2_problem(luks: Luks, tokens: dict | None) -> str | None:
    """What keeps the header from unlocking with the TPM as the profile says (None: it does)."""
    if not luks.tpm2_unlock:
        return None
    found = tpm2_tokens(tokens)
    wanted = "+".join(map(str, luks.tpm2_pcrs)) or "none"
    if not found:
        return f"no TPM2 token (tpm2_unlock), the profile wants one sealed to PCRs {wanted}"
    sealed = ["+".join(map(str, token["pcrs"])) or "none" for token in found]
    if len(found) > 1 or found[0]["pcrs"] != luks.tpm2_pcrs:
        return f"TPM2 token(s) sealed to PCRs {', '.join(sealed)}, the profile wants one sealed to PCRs {wanted}"
    return None


def passphrase_slots(header: dict, tokens: dict | None) -> dict:
    """The header's keyslots that no token holds: the passphrases'."""
    token_slots = {slot for token in (tokens or {}).values() for slot in token.get("keyslots", [])}
    return {number: slot for number, slot in header["keyslots"].items() if number not in token_slots}


def recovery_problem(header: dict, tokens: dict | None) -> str | None:
    """A header whose every keyslot belongs to a token has no passphrase left to recover with."""
    if header["keyslots"] and not passphrase_slots(header, tokens):
        return "no passphrase keyslot left (every keyslot belongs to a token): the rescue could not open it"
    return None


def token_reads(device: str, luks: Luks) -> list[FactRequest]:
    return [(LuksTokens, {"device": device})] if luks.tpm2_unlock else []



def enroll_command(device: str, luks: Luks, secret: Secret, replace: bool) -> StringCommand:
    """systemd-cryptenroll adds a TPM2 keyslot, unlocking the header with the passphrase, which it
    takes from $PASSWORD (systemd 252 has no key-file option for it): the shell reads it from
    stdin into its own environment, never argv. ``replace``: tokens sealed otherwise go in the same
    command, once the new one is in."""
    quoted = shlex.quote(device)
    pcrs = "+".join(str(pcr) for pcr in luks.tpm2_pcrs)
    script = (f"cryptsetup isLuks --type luks2 {quoted} || {{ echo 'tabula: {device} holds no LUKS2 header: "
              "no TPM2 token enrolled' >&2; exit 1; }; "
              "ls /dev/tpmrm* >/dev/null 2>&1 || { echo 'tabula: no TPM 2.0 device (/dev/tpmrm*): "
              "no TPM2 token enrolled' >&2; exit 1; }; "
              "IFS= read -r PASSWORD; export PASSWORD; "
              f"systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs={pcrs} "
              + ("--wipe-slot=tpm2 " if replace else "") + quoted)
    return shell_script(script, _stdin=secret.reveal())


@operation()
def tpm2_token(run: Run, device: str, luks: Luks):
    """
    Enroll a TPM2 token in the container, sealed to the profile's PCRs, beside the passphrase
    (kept for recovery). A token sealed to other PCRs is replaced in the same command.

    + run: the run (facts, what it made, the passphrase)
    + device: the partition holding the container (/dev/disk/by-partlabel/...)
    + luks: the profile's Luks node (tpm2_pcrs)

    **Example:**

    .. code:: python

        luks.tpm2_token(run, device="/dev/disk/by-partlabel/cryptroot", luks=profile_luks)
    """
    # A container this run formatted has no token yet.
    tokens = {} if run.before_wipe() or run.created_this_run(Made.luks(device)) else run.read(LuksTokens, device=device)
    problem = tpm2_problem(luks, tokens)
    if problem is None:
        token = tpm2_tokens(tokens)[0]
        run.noop(f"{device} already has a TPM2 token sealed to PCRs {'+'.join(map(str, token['pcrs'])) or 'none'} "
                 f"(keyslot {', '.join(token['keyslots'])})")
        return
    wanted = "+".join(map(str, luks.tpm2_pcrs)) or "none"
    run.tell(f"enroll a TPM2 token in {device}, sealed to PCRs {wanted}; the passphrase keyslot stays")
    yield enroll_command(device, luks, passphrase(run), replace=bool(tpm2_tokens(tokens)))
