"""Every worker of a parallel run (pytest-xdist, ./dev.sh test) gets a live VM of its own: the
worker's name is added to TABULA_VM_INSTANCE before any test or fixture reads it."""
import os


def pytest_configure(config):
    # only in a worker itself (a pytest it starts, e.g. the verification command, inherits the
    # worker's environment but is not a worker)
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker:
        base = os.environ.get("TABULA_VM_INSTANCE", "default")
        os.environ["TABULA_VM_INSTANCE"] = f"{base}-{worker}"
