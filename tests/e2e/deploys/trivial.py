"""Trivial deploy for the test bed: a marker file naming the pyinfra host and the guest's hostname.

Idempotent on purpose (no server.shell), so a second run must report no changes.
"""
from io import StringIO

from pyinfra import host
from pyinfra.facts.server import Hostname
from pyinfra.operations import files

marker = f"deployed-to={host.name}\nhostname={host.get_fact(Hostname)}\n"

files.put(
    name="Write the tabula-trivial marker",
    src=StringIO(marker),
    dest="/root/tabula-trivial",
    mode="644",
)
