"""Errors that stop a run before (or instead of) a change. pyinfra prints them as one clean line."""

from pyinfra.api.exceptions import PyinfraError


class TabulaError(PyinfraError):
    """Base: the message names the field or device at fault and what the user can do."""
