# ASUS ROG Zephyrus G16 extras from the guide: ASUS services, NVIDIA hybrid graphics, PipeWire.
{ config, lib, pkgs, ... }:

{
  # Use latest kernel for best hardware support
  boot.kernelPackages = pkgs.linuxPackages_latest;

  # ASUS ROG services
  services.asusd = {
    enable = true;
    enableUserService = true;
  };

  services.supergfxd.enable = true;

  # Fix for supergfxctl GPU detection
  systemd.services.supergfxd.path = [ pkgs.pciutils ];

  # Power management: power-profiles-daemon unless the nixos-hardware module chooses otherwise
  # (the 2025 G16's gu605cw module enables TuneD, which switches power-profiles-daemon off).
  services.power-profiles-daemon.enable = lib.mkDefault true;
  services.thermald.enable = true;

  # NVIDIA configuration (for hybrid graphics)
  hardware.nvidia = {
    modesetting.enable = true;
    powerManagement.enable = true;
    powerManagement.finegrained = true;
    open = true;  # Use open source kernel modules (recommended for RTX 50 series)
    nvidiaSettings = true;
    package = config.boot.kernelPackages.nvidiaPackages.latest;
  };

  # Enable OpenGL
  hardware.graphics = {
    enable = true;
    enable32Bit = true;
  };

  # Enable sound with PipeWire
  security.rtkit.enable = true;
  services.pipewire = {
    enable = true;
    alsa.enable = true;
    alsa.support32Bit = true;
    pulse.enable = true;
  };

  environment.systemPackages = with pkgs; [
    btop
    lshw
    asusctl
    supergfxctl
  ];
}
