# The Python packages Tabula runs with: nixpkgs' Python 3.11 set, with the packages nixpkgs
# (24.05) lacks or has too old (pyinfra 2.9 for 3.10, tree-sitter 0.21 for >= 0.23, no
# tree-sitter-nix, pydantic and what it needs) added as the wheels pip installs. pins.json holds
# them as data: each wheel's file name, its hash, the packages it depends on (tests/nix/test_flake.py
# checks them against pyproject.toml and the wheels' own metadata; the compiled ones are cp311).
# fetchPypi builds each URL from the file name; Nix checks the hash. nixpkgs' own packages are
# used as they are (none rebuilt): overriding typing-extensions in the whole set would rebuild
# cryptography, gevent, pytest and more on the installer.
{ lib, python311, fetchPypi, autoPatchelfHook, stdenv }:
let
  pins = lib.importJSON ./pins.json;

  wheel = attr: pin:
    let
      # name-version-python-abi-platform.whl (PEP 427)
      tags = builtins.match "([^-]+)-([^-]+)-([^-]+)-([^-]+)-(.+)[.]whl" pin.file;
      tag = builtins.elemAt tags;
      compiled = tag 4 != "any";
    in
    python311.pkgs.buildPythonPackage {
      pname = attr;
      version = tag 1;
      format = "wheel";
      src = fetchPypi {
        pname = tag 0;
        version = tag 1;
        format = "wheel";
        dist = tag 2;
        python = tag 2;
        abi = tag 3;
        platform = tag 4;
        inherit (pin) hash;
      };
      dependencies = map (name: packages.${name}) pin.dependencies;
      # manylinux wheels link the C runtime only (pydantic-core also libgcc_s): patched to the store's
      nativeBuildInputs = lib.optional compiled autoPatchelfHook;
      buildInputs = lib.optional compiled stdenv.cc.cc.lib;
      pythonImportsCheck = pin.imports;
    };

  # nixpkgs' packages by their attribute names, the pinned wheels over them
  packages = python311.pkgs // lib.mapAttrs wheel pins.wheels;
in
{
  python = python311;
  inherit packages;
}
