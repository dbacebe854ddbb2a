"""
Tabula rescue: a machine whose root no longer boots, put back from the live system.

    pyinfra install-target rescue.py            # over SSH, to the live system booted on the machine
    pyinfra @local rescue.py                    # on the live system itself
    pyinfra install-target rescue.py --dry      # the plan: what would be restored, nothing run

Same inventory data and secrets as deploy.py (tabula_profile, tabula_vars, TABULA_LUKS_PASSPHRASE,
TABULA_ZFS_KEY). btrfs: the container opened, nested subvolumes of @root deleted, @root restored
from @root-blank; ZFS: the pool imported, its key loaded, every temp dataset rolled back to
@empty. Refused when the blank snapshot or @empty is missing (or the blank is writable); the
persistent subvolumes and datasets are never touched. Then everything is mounted under /mnt and
/mnt/etc/nixos put back from the persisted copy, as the install left it.
"""

from pyinfra import host

from operations.settings import load_settings
from operations import stages

settings = load_settings(host.data)  # rejects bad profile/data before any command runs
stages.rescue(settings)
