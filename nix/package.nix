# Tabula as a Nix package: the project's deploys and data in $out/share/tabula, run by the
# `tabula` command (tabula.sh) with a Python that has pyproject.toml's dependencies (and its
# "test" extra, for `tabula verify`). The dependency names come from pyproject.toml itself.
{ lib, stdenvNoCC, python, pythonPackages }:
let
  project = (lib.importTOML ../pyproject.toml).project;
  # "pyinfra==3.10.*" -> "pyinfra": nixpkgs names Python packages as PyPI does, lower case
  name = requirement: lib.toLower (builtins.head (builtins.match "([A-Za-z0-9_.-]+).*" requirement));
  requirements = project.dependencies ++ project.optional-dependencies.test;
  packages = map (r: pythonPackages.${name r}) requirements;
  env = python.withPackages (_: packages);
  files = [
    "deploy.py" "gaps.py" "rescue.py" "inventory.py" "pyproject.toml"
    "group_data" "operations" "profiles" "templates" "tests/__init__.py" "tests/verify"
  ];
in
stdenvNoCC.mkDerivation {
  pname = "tabula";
  inherit (project) version;
  # The files a run reads (lib.fileset would be shorter, but needs Nix >= 2.14)
  src = lib.cleanSourceWith {
    name = "tabula-source";
    src = ../.;
    filter = path: type:
      let rel = lib.removePrefix (toString ../. + "/") (toString path);
      in baseNameOf path != "__pycache__" && lib.any (keep: rel == keep || lib.hasPrefix "${keep}/" rel
        || lib.hasPrefix "${rel}/" keep) files;
  };
  dontBuild = true;
  installPhase = ''
    runHook preInstall
    mkdir -p $out/share/tabula $out/bin
    cp -r . $out/share/tabula
    ${env.interpreter} -m compileall -q $out/share/tabula
    substitute ${./tabula.sh} $out/bin/tabula \
      --subst-var-by python ${env.interpreter} --subst-var-by share $out/share/tabula
    chmod +x $out/bin/tabula
    runHook postInstall
  '';
  passthru = {
    inherit env python;
    # every Python package in env, the dependencies' dependencies included (read by the tests)
    pythonModules = python.pkgs.requiredPythonModules packages;
  };
  meta = {
    inherit (project) description;
    mainProgram = "tabula";
    platforms = lib.platforms.linux;
  };
}
