{
  description = "Tabula: bare disks to an installed NixOS with an ephemeral root (a pyinfra deploy)";

  # The nixpkgs Tabula's Python set is written for (nix/python.nix); the tests evaluate against
  # a 24.05 tree (--override-input nixpkgs).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      py = pkgs.callPackage ./nix/python.nix { };
      tabula = pkgs.callPackage ./nix/package.nix { inherit (py) python; pythonPackages = py.packages; };
    in
    {
      packages.${system}.default = tabula;

      apps.${system}.default = { type = "app"; program = "${tabula}/bin/tabula"; };

      devShells.${system}.default = pkgs.callPackage ./nix/shell.nix { inherit tabula; };

      # nix build .#nixosConfigurations.installer.config.system.build.isoImage
      nixosConfigurations.installer = nixpkgs.lib.nixosSystem {
        inherit system;
        specialArgs = { inherit self; };   # nix/installer.nix takes the package from it
        modules = [
          "${nixpkgs}/nixos/modules/installer/cd-dvd/installation-cd-minimal.nix"
          ./nix/installer.nix
        ];
      };
    };
}
