"""Device images: a Debian root filesystem with the agent installed, enrolling on first boot.

- `classes`: device classes as data (firmware-images/classes/*.toml), read strictly;
- `build`: the root filesystem with mmdebstrap, and for amd64 a raw bootable GPT disk
  image (systemd-boot on an EFI system partition), made without loop devices;
- `disk`: the GPT layout and the EFI system partition (sfdisk, mkfs.vfat, mtools);
- `cli`: `edgefleet firmware build CLASS` and `edgefleet firmware enroll IMAGE FILE`.
"""
