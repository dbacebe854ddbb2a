"""
The registry: every layer of the install, in stage order. The only list of layers: the stages,
the guard, verify, the gap report, the rescue, the NixOS files and the disko export walk it.
A new layer is a module (or package) with a ``LAYER`` implementing ``operations.contract.Layer``,
added here; tests/unit/test_contract.py fails when one is missing or breaks the contract.
"""

from operations import btrfs, filesystems, gpt, luks, mounts, nixos, persist, zfs

LAYERS = (gpt.LAYER, luks.LAYER, filesystems.LAYER, zfs.LAYER, btrfs.LAYER, mounts.LAYER, nixos.LAYER, persist.LAYER)
