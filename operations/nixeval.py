"""
Does the NixOS configuration evaluate? Asked before any disk is touched.

``nixos-install`` evaluates ``config.system.build.toplevel.drvPath`` before it builds anything: a
configuration that fails there (an unfree package, conflicting option values, a misspelled
option) fails the install after the disks were formatted. This module asks Nix the same question
first, with the files the run is going to write (rendered with placeholder devices):

- on the target when it has ``nix`` (the NixOS installer does; the flake's inputs are fetched);
- on the controller when inventory data points at the inputs to use (``tabula_nix_inputs``:
  flake input name -> local folder, e.g. the offline kit in tests);
- not at all when ``tabula_nix_check`` is false (offline installs), and the plan says so.

    from operations import nixeval
    nixeval.precheck(profile, settings)   # a step of its own, before the first disk change

``evaluate`` is also what the tests use to evaluate every profile against real nixpkgs.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pyinfra import logger
from pyinfra.api import FactBase, QuoteString, StringCommand

from operations.errors import TabulaError
from operations import disks, nixos
from operations.target import files_tar
from operations.run import Run, operation

NIX_FLAGS = ("--extra-experimental-features", "nix-command flakes")
# What nixos-install evaluates before it builds.
TOPLEVEL = "config.system.build.toplevel.drvPath"


class EvaluationFailed(TabulaError):
    """Nix refused the configuration; the message carries Nix's error."""


@dataclass(frozen=True)
class Evaluation:
    """What ``nix eval`` said: the value (stdout), the error, and the evaluation's traces."""

    ok: bool
    value: str = ""
    error: str = ""
    traces: tuple[str, ...] = field(default=())

    def json(self):
        """The value of an evaluation asked with ``json_output``."""
        return json.loads(self.value)


def parse_stderr(stderr: str) -> tuple[str, tuple[str, ...]]:
    """(the error, the ``trace:`` lines) of nix's stderr.

    Evaluation warnings (``lib.warn``, ``warnings`` of modules via ``builtins.trace``) come as
    ``trace: warning: ...``; Nix's own notes (``warning: not writing modified lock file``, the
    inputs it added) are not about the configuration and are left out.
    """
    lines = stderr.splitlines()
    traces = tuple(line.strip() for line in lines if line.startswith("trace:"))
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    error = "\n".join(lines[start:]).strip() if start is not None else ""
    return error, traces


def eval_argv(flake: str, hostname: str, inputs: dict[str, str] | None = None, apply: str | None = None,
              extra_modules: tuple[str, ...] = (), json_output: bool = False) -> list[str]:
    """``nix eval`` of a flake's NixOS system (its toplevel drvPath, or ``apply`` on the system).

    + flake: the flake reference, ``path:/abs/dir``
    + inputs: flake input name -> local folder overriding it (``path:``)
    + apply: a Nix function of the system (``sys: ...``) whose result is printed instead
    + extra_modules: module files added with ``extendModules`` (the kit's compat modules in tests)
    """
    system = f"{flake}#nixosConfigurations.{hostname}"   # a validated host name: a plain attribute
    argv = ["nix", *NIX_FLAGS, "eval", "--no-write-lock-file", "--json" if json_output else "--raw"]
    for name, folder in (inputs or {}).items():
        argv += ["--override-input", name, f"path:{folder}"]
    if extra_modules:
        # extendModules takes absolute paths, which needs --impure.
        modules = " ".join(json.dumps(str(Path(m).resolve())) for m in extra_modules)
        extended = f"(sys.extendModules {{ modules = map (m: /. + m) [ {modules} ]; }})"
        function = f"sys: ({apply or ('s: s.' + TOPLEVEL)}) {extended}"
        argv += ["--impure", system, "--apply", function]
    elif apply:
        argv += [system, "--apply", apply]
    else:
        argv += [f"{system}.{TOPLEVEL}"]
    return argv


def write_tree(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def evaluate(files: dict[str, str] | Path, hostname: str, inputs: dict[str, str] | None = None,
             apply: str | None = None, extra_modules: tuple[str, ...] = (), json_output: bool = False,
             timeout: float = 900) -> Evaluation:
    """Evaluate a NixOS flake here (the controller): files {name: text} or a folder holding them."""
    with tempfile.TemporaryDirectory(prefix="tabula-eval-") as scratch:
        if isinstance(files, Path):
            folder = files.resolve()
        else:
            folder = Path(scratch)
            write_tree(folder, files)
        argv = eval_argv(f"path:{folder}", hostname, inputs, apply, extra_modules, json_output)
        # Debian's nix-bin has no nixbld group; evaluation builds nothing, so no build users.
        argv[1:1] = ["--option", "build-users-group", ""]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return Evaluation(ok=False, error="nix is not installed on the controller")
    error, traces = parse_stderr(done.stderr)
    if done.returncode != 0 and not error:
        error = done.stderr.strip() or f"nix eval exited with {done.returncode}"
    return Evaluation(ok=done.returncode == 0, value=done.stdout, error=error, traces=traces)


# --- on the target ------------------------------------------------------------------------------


def files_archive(files: dict[str, str]) -> str:
    """The files as one base64 tar (a fixed mtime: the same files give the same text)."""
    return base64.b64encode(files_tar(dict(sorted(files.items())))).decode()


class TargetEvaluation(FactBase):
    """
    ``nix eval`` of the configuration on the target, in a scratch folder removed afterwards:
    ``{"status": exit status, "value": stdout, "stderr": ...}``. The files hold no secret (the
    same files are written to /mnt/etc/nixos), so they travel in the command.

    .. code:: python

        read(TargetEvaluation, archive=files_archive(files), hostname="g16")
    """

    def command(self, archive: str, hostname: str) -> StringCommand:
        # The flake reference is built by the shell from the scratch folder and the host name ($2).
        nix_eval = shlex.join(eval_argv("FLAKE", "HOST")[:-1]) + f' "path:$d#nixosConfigurations.$2.{TOPLEVEL}"'
        script = ('d=$(mktemp -d /tmp/tabula-eval.XXXXXX) || exit 0; '
                  'printf %s "$1" | base64 -d | tar -x -C "$d" && '
                  f'{nix_eval} >"$d.out" 2>"$d.err"; echo "status=$?"; '
                  'echo "value=$(base64 -w0 <"$d.out")"; echo "stderr=$(base64 -w0 <"$d.err")"; '
                  'rm -rf "$d" "$d.out" "$d.err"')
        return StringCommand("sh", "-c", QuoteString(script), "nixeval", QuoteString(archive), QuoteString(hostname))

    def process(self, output):
        found = dict(line.partition("=")[::2] for line in output if "=" in line)
        return {"status": int(found.get("status", "1") or 1),
                "value": base64.b64decode(found.get("value", "")).decode(errors="replace"),
                "stderr": base64.b64decode(found.get("stderr", "")).decode(errors="replace")}

    @staticmethod
    def default():
        return None


# --- the step ----------------------------------------------------------------------------------


def where_to_evaluate(mode, inputs: dict | None, target_has_nix: bool) -> tuple[str | None, str]:
    """("controller" | "target" | None, why) for the setting ``tabula_nix_check``."""
    if mode is False:
        return None, "skipped: tabula_nix_check is false (an offline install: nothing to evaluate with)"
    if mode == "controller" or (mode == "auto" and inputs):
        return "controller", ("on the controller, flake inputs from tabula_nix_inputs: " + ", ".join(sorted(inputs))
                              if inputs else "on the controller, flake inputs as the flake names them")
    if mode == "target" or target_has_nix:
        if not target_has_nix:
            raise TabulaError("tabula_nix_check: 'target' asks to evaluate on the target, which has no nix command")
        return "target", "on the target with its nix (flake inputs fetched as nixos-install will)"
    return None, ("skipped: the target has no nix and tabula_nix_inputs names no nixpkgs for the controller; "
                  "nixos-install will be the first to evaluate the configuration")


def evaluate_on_target(run: Run, files: dict[str, str], hostname: str) -> Evaluation:
    answer = run.read(TargetEvaluation, archive=files_archive(files), hostname=hostname) or \
        {"status": 1, "value": "", "stderr": "error: no answer from the target"}
    error, traces = parse_stderr(answer["stderr"])
    return Evaluation(ok=answer["status"] == 0, value=answer["value"],
                      error=error or answer["stderr"].strip(), traces=traces)


def precheck(run: Run) -> None:
    """The stage, while the run is prepared (before any operation runs): render the files this
    run will write (placeholder devices: the partitions do not exist yet) for the hardware module
    the target's DMI selects, and evaluate them; a configuration Nix refuses stops the run with
    Nix's error. The result is a step of the plan."""
    profile, settings = run.profile, run.settings
    target_has_nix = False
    if settings.tabula_nix_check is not False:
        fact, arguments = disks.tools_request(profile, settings.tabula_install, run.layers)   # the guard's read, kept
        target_has_nix = "nix" in run.read(fact, **arguments)["commands"]
    where, why = where_to_evaluate(settings.tabula_nix_check, settings.tabula_nix_inputs, target_has_nix)
    if where is None:
        evaluated(run, summary=f"not evaluated before the install: {why}", name="NixOS evaluation")
        return
    module, _ = nixos.choose_hardware_module(profile, run.read(nixos.DmiProductName))
    files = nixos.rendered_with(run.layers, profile, None, None, hardware_module=module, placeholder=True)
    logger.info(f"{run.prefix}evaluating the NixOS configuration {why}")
    hostname = profile.nixos.hostname
    result = evaluate(files, hostname, settings.tabula_nix_inputs) if where == "controller" else \
        evaluate_on_target(run, files, hostname)
    if not result.ok:
        raise EvaluationFailed(
            f"the NixOS configuration does not evaluate ({why}); nothing was changed on the disks.\n"
            f"{result.error}\n"
            "Fix the profile (nixos.extra_config, vars) and run again; tabula_nix_check=false skips this check.")
    for trace in result.traces:
        logger.warning(f"{run.prefix}Nix evaluation: {trace}")
    evaluated(run, summary=f"evaluates ({why}): {result.value.strip()}", name="NixOS evaluation")


@operation()
def evaluated(run: Run, summary: str):
    """
    The plan's line for the evaluation ``precheck`` did before any operation: it changes nothing.

    + run: the run
    + summary: what was evaluated where, and the result (or why it was skipped)

    .. code:: python

        nixeval.evaluated(run, summary="evaluates (on the controller): /nix/store/...-nixos-system-g16.drv")
    """
    run.noop(f"NixOS configuration {summary}")
    return
    yield  # an operation is a generator
