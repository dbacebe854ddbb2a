# `nix develop`: what ./dev.sh needs on NixOS instead of Debian's packages: the Python of the
# package (pyproject.toml's dependencies and test extra) and the live VM's tools. nix is the
# host's own. TABULA_DEV_SHELL tells dev.sh it runs inside.
{ mkShell, tabula, qemu, swtpm, debootstrap, e2fsprogs, openssh }:
mkShell {
  packages = [ tabula.env qemu swtpm debootstrap e2fsprogs openssh ];
  TABULA_DEV_SHELL = "1";
}
