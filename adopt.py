"""
Tabula's adoption: a profile read from the disks of a machine Tabula did not install (by the
guide's commands, with disko, by hand), so deploy, verify, gaps and the rescue work on it.
Read only: nothing on the target changes, no secret is needed.

    pyinfra install-target adopt.py             # the live system of the target, over SSH
    pyinfra @local adopt.py                     # on the live system itself
    pyinfra install-target adopt.py --data tabula_adopt_profile=laptop.yaml
    pyinfra install-target deploy.py --data tabula_profile=laptop.yaml    # then, as any profile

The installed system is read under /mnt when something is mounted there, else at / (the booted
machine; ``tabula_root`` says it). What no profile can express (LVM, mdraid, a root nothing rolls
back at boot...) is named with its device, and no profile is written unless
``tabula_adopt_partial=true``.
"""

from pyinfra import host

from operations import stages
from operations.adopt import load_adopt_settings

stages.adopt(load_adopt_settings(host.data))
