# The NixOS installer with Tabula inside: added to nixpkgs' minimal installer CD (flake.nix), so
# `tabula @local` runs as soon as it has booted. The storage tools are what the guard asks the
# target for (required_tools in operations/disks.py and the layers); the CD has most already.
{ pkgs, self, ... }:
let
  tabula = self.packages.${pkgs.system}.default;
in
{
  boot.supportedFilesystems = [ "btrfs" "f2fs" "vfat" "zfs" ];
  environment.systemPackages = [ tabula ] ++ (with pkgs; [
    gptfdisk      # sgdisk
    cryptsetup
    btrfs-progs
    f2fs-tools
    dosfstools    # mkfs.vfat
    e2fsprogs     # chattr, mkfs.ext4
    util-linux    # wipefs blkid lsblk blockdev mount mkswap swapon
    mkpasswd      # the password hashes: mkpasswd -m sha-512
  ]);
  nix.settings.experimental-features = [ "nix-command" "flakes" ];   # nix run, nix shell
  isoImage.isoBaseName = "nixos-tabula";
}
