"""Where the configuration is evaluated before the disks are touched, and how Nix's answer is read."""
import pytest

from operations.errors import TabulaError
from operations.nixeval import eval_argv, parse_stderr, where_to_evaluate

KIT = {"nixpkgs": "/kit/nixpkgs-24.05"}


@pytest.mark.parametrize("mode, inputs, target_has_nix, where, why", [
    ("auto", KIT, True, "controller", "tabula_nix_inputs: nixpkgs"),     # the user pointed at local inputs
    ("auto", {}, True, "target", "on the target with its nix"),
    ("auto", {}, False, None, "skipped: the target has no nix and tabula_nix_inputs names no nixpkgs"),
    (False, KIT, True, None, "skipped: tabula_nix_check is false"),
    ("controller", {}, False, "controller", "flake inputs as the flake names them"),
    ("target", KIT, True, "target", "on the target"),
])
def test_where_the_configuration_is_evaluated(mode, inputs, target_has_nix, where, why):
    got, reason = where_to_evaluate(mode, inputs, target_has_nix)
    assert got == where and why in reason


def test_evaluating_on_a_target_without_nix_is_refused_by_name():
    with pytest.raises(TabulaError, match="tabula_nix_check: 'target'.*no nix command"):
        where_to_evaluate("target", {}, False)


def test_nix_output_is_split_into_the_error_and_the_evaluation_traces():
    stderr = ("warning: not writing modified lock file of flake 'path:/tmp/x':\n"
              "trace: warning: getExe: Package \"ShellCheck-0.0.0-offline-stub\" does not have\n"
              "error: The option `services.openssh.enabel' does not exist. Definition values:\n"
              "       - In `/nix/store/x-source/extra.nix': true\n")
    error, traces = parse_stderr(stderr)
    assert error.startswith("error: The option `services.openssh.enabel'") and "extra.nix" in error
    assert traces == ('trace: warning: getExe: Package "ShellCheck-0.0.0-offline-stub" does not have',)
    assert parse_stderr("warning: Git tree is dirty\n") == ("", ())


def test_eval_argv_overrides_inputs_and_extends_with_absolute_modules():
    argv = eval_argv("path:/f", "g16", KIT, extra_modules=("/kit/compat-tuned.nix",), json_output=True)
    assert argv[:4] == ["nix", "--extra-experimental-features", "nix-command flakes", "eval"]
    assert ["--override-input", "nixpkgs", "path:/kit/nixpkgs-24.05"] == argv[6:9]
    assert "--impure" in argv and "path:/f#nixosConfigurations.g16" in argv
    assert argv[-1] == ('sys: (s: s.config.system.build.toplevel.drvPath) '
                        '(sys.extendModules { modules = map (m: /. + m) [ "/kit/compat-tuned.nix" ]; })')
    assert eval_argv("path:/f", "g16")[-1] == "path:/f#nixosConfigurations.g16.config.system.build.toplevel.drvPath"
