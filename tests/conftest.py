"""Every worker of a parallel run (pytest-xdist, ./dev.sh test) gets a live VM of its own: the
worker's name is added to TABULA_VM_INSTANCE before any test or fixture reads it."""
import os


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        base = os.environ.get("TABULA_VM_INSTANCE", "default")
        os.environ["TABULA_VM_INSTANCE"] = f"{base}-{worker}"
