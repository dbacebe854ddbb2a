"""
Tabula's gap report: what was written to the ephemeral root since the last boot that neither
persistence nor a mount keeps, with the profile vars that would keep it. Read only.

    pyinfra install-target gaps.py              # the booted machine over SSH (or the live system
    pyinfra @local gaps.py                      # after the install: the system under /mnt)
    pyinfra install-target gaps.py --data tabula_root=/    # say where the system is

Same inventory data as deploy.py (tabula_profile, tabula_vars); no secret is needed.
"""

from pyinfra import host

from operations.settings import load_settings
from operations import stages

settings = load_settings(host.data)
stages.gaps_report(settings)
