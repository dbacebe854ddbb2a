"""The LUKS passphrase, read once per run by the stages (``run.secrets``)."""

from __future__ import annotations

from operations.errors import TabulaError
from operations.run import Run
from operations.secrets import Secret


PASSPHRASE = "LUKS_PASSPHRASE"


def passphrase(run: Run) -> Secret:
    """The LUKS passphrase the stages read for this run, refused when it could not be typed at
    the boot prompt."""
    secret = run.secrets[PASSPHRASE]
    if "\n" in secret.reveal() or "\r" in secret.reveal():
        raise TabulaError(f"the LUKS passphrase from {secret.source} has a line break inside: it could not "
                          "be typed at the boot prompt")
    return secret
