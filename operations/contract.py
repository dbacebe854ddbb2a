"""
The layer contract: what every layer of the install (gpt, luks, filesystems, zfs, btrfs, mounts,
nixos, persist) answers, so the stages, the guard, verify, the gap report, the rescue and the
disko export walk one registry (``operations.layers.LAYERS``) and never name a layer.

A layer is one class (``Layer``), one instance of it in the registry. Deciding is separate from
acting, as in community.crypto's luks_device: ``problems`` and the layer's own rule functions
(``btrfs.blank_problems``, ``gpt.compare``...) only compare what was read with the profile; the
operations act on what they found, and refuse drift with the same rules. Each invariant exists
once, and the guard, the operations, the rescue and ``tests/verify`` call it.

    for layer in run.layers:
        layer.make(run)               # the steps a layer takes part in (nothing by default)

A step adds pyinfra operations; it reads nothing itself (the operations read, through the run).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from operations.nixlit import DeviceIds, NixFragments
from operations.run import FactRequest, Run

if TYPE_CHECKING:
    from operations.adopt import Draft, Found
    from operations.profile import Profile
    from operations.settings import Settings
    from operations.target import Written


class Target(Protocol):
    """What ``problems`` reads the target through (``operations.verify``: a testinfra host)."""

    settings: "Settings"
    root: str                   # where the installed system is: /mnt (the live system), / (booted)
    layers: tuple               # the registry

    def read(self, fact, **kwargs) -> Any:
        """A fact's value, read with the fact's own command (as the deploy reads it)."""

    def run(self, command: str) -> Any:
        """A shell command's result (``rc``, ``stdout``): for what no fact reads."""


class DiskoContext(Protocol):
    """What a layer's disko nodes need from the export (``operations.disko``)."""

    profile: "Profile"

    def content(self, node, device: str, part) -> dict | None:
        """The disko node of a partition's content, made by the layer that owns it."""


class Layer(ABC):
    """One layer of the install. Every method below the steps is required."""

    name: ClassVar[str]         # its verify test is test_<name> (tests/verify/test_target.py)
    absent: ClassVar[str]       # what a profile without it lacks ("no LUKS container"): why verify skips it

    # --- the steps of a deploy, in stage order; a layer takes part in those it needs ----------------

    def make(self, run: Run) -> None:
        """Make what lies on the disks: partitions, containers, filesystems, pools, subvolumes."""

    def mount(self, run: Run) -> None:
        """Mount the installed system under /mnt."""

    def fill(self, run: Run) -> None:
        """Write what lives on the mounted system: swapfiles, the NixOS files, the seeded state."""

    def install(self, run: Run) -> None:
        """Install the system, and what must follow the install."""

    def close(self, run: Run) -> None:
        """Leave the target as the first boot takes it (pools exported)."""

    def rescue(self, run: Run) -> None:
        """From the live system, put back what the boot-time rollback restores (rescue.py)."""

    # --- what the stages, the guard, verify, the gap report and the export ask ---------------------

    @abstractmethod
    def applies(self, profile: "Profile") -> bool:
        """Whether the profile has nodes of this layer (else verify skips it, saying ``absent``)."""

    @abstractmethod
    def owns(self, node) -> bool:
        """Whether a partition's content node (``Filesystem``, ``Luks``...) is this layer's."""

    @abstractmethod
    def tools(self, profile: "Profile") -> dict[str, str]:
        """{command, or "<name> kernel module": what needs it} on the target, for the guard."""

    def refusals(self, run: Run) -> list[str]:
        """What the target lacks for this layer's steps that no command supplies (a TPM 2.0 for a
        TPM2 token), read from facts by the guard: each line refuses the install before any change.
        (A layer may warn here too, of what it does not refuse.)"""
        return []

    def refusal_reads(self, run: Run) -> list[FactRequest]:
        """The facts ``refusals`` reads: read in the guard's first batch, so they cost no round trip."""
        return []

    @abstractmethod
    def secrets(self, settings: "Settings", rescue: bool) -> dict[str, bool]:
        """{secret name: required} this layer's steps use (the stages read them once, in order)."""

    @abstractmethod
    def observe(self, run: Run) -> list[FactRequest]:
        """The facts its deploy steps read, exactly as they read them: read by the guard in one
        batch with its own when the target already holds the layout (a re-run), so a converged
        run reads nothing else. A step may still read what this does not name (read alone then)."""

    @abstractmethod
    def problems(self, target: Target) -> list[str]:
        """How the target differs from the profile, one line per mismatch (``tests/verify``)."""

    @abstractmethod
    def nix(self, profile: "Profile", devices: DeviceIds) -> NixFragments:
        """What it adds to the generated NixOS files (devices: where the ids come from, and the
        values its ``nix_reads`` read)."""

    def nix_reads(self, profile: "Profile", root: str) -> dict[str, FactRequest]:
        """What its Nix fragment reads from the target besides the devices' ids, by a key of its
        own (e.g. a swapfile's resume offset), with the installed system mounted at ``root``: read
        with the nixos layer's reads, handed to ``nix`` as ``devices.fact(key, ...)``."""
        return {}

    @abstractmethod
    def gaps(self, run: Run, root: str) -> "tuple[list[Written], list[str]]":
        """(what its ephemeral root got since the last boot, how that was found) for gaps.py."""

    def adopt_reads(self, found: "Found") -> list[FactRequest]:
        """The facts its ``adopt`` reads, given the block devices, mounts and pools ``found``
        holds: read with every layer's in one batch (``found.fact``)."""
        return []

    @abstractmethod
    def adopt(self, found: "Found", draft: "Draft") -> None:
        """Describe this layer's nodes as the target holds them into ``draft`` (adopt.py), or
        ``draft.refuse`` what no profile can express, naming the device and why. It reads
        nothing: ``found`` holds what the survey read (``operations/adopt/survey.py``)."""

    @abstractmethod
    def disko(self, profile: "Profile", context: DiskoContext) -> dict[str, Any]:
        """Its top-level part of ``disko.devices`` ({"disk": ...}, {"zpool": ...}, {"nodev": ...};
        "fileSystems": plain NixOS options beside it), or {}."""

    @abstractmethod
    def disko_node(self, node, device: str, part, context: DiskoContext) -> dict | None:
        """The disko node of a partition content node this layer ``owns`` (None: left without)."""
