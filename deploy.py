"""
Tabula: bare disks -> installed NixOS with an ephemeral root.

    pyinfra install-target deploy.py            # over SSH, to the live system of the target
    pyinfra @local deploy.py                    # on the live system itself
    pyinfra install-target deploy.py --dry      # the plan: what each stage would do, nothing run

Every stage is a fact + operation pair from operations/ and runs only what the facts show is
missing, so a re-run after any interruption converges on the same result.
"""

from pyinfra import host

from operations.settings import load_settings
from operations import stages

settings = load_settings(host.data)  # rejects bad profile/data before any command runs
stages.deploy(settings)
