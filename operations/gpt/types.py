"""
The GPT partition types Tabula knows: sgdisk type codes -> partition type GUIDs (as blkid
PART_ENTRY_TYPE and lsblk PARTTYPE show them). Data only: the profile model checks a partition's
type code against it when a profile loads; the gpt layer writes and checks the GUIDs.
"""

GPT_TYPE_GUIDS = {
    "EF00": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",  # EFI system partition
    "EF02": "21686148-6449-6E6F-744E-656564454649",  # BIOS boot partition
    "8200": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",  # Linux swap
    "8300": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux filesystem
    "8302": "933AC7E1-2EB4-4F13-B844-0E14E2AEF915",  # Linux /home
    "8304": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",  # Linux x86-64 root (/)
    "8309": "CA7D7CCB-63ED-4C53-861C-1742536059CC",  # Linux LUKS
    "8E00": "E6D6D379-F507-44C2-A23C-238F2A3DF928",  # Linux LVM
    "FD00": "A19D880F-05FC-4D3B-A006-743F0F84911E",  # Linux RAID
    "BF00": "6A85CF4D-1DD2-11B2-99A6-080020736631",  # Solaris root (ZFS)
    "BF01": "6A898CC3-1DD2-11B2-99A6-080020736631",  # Solaris /usr & Mac ZFS
    "0700": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # Microsoft basic data
}


def type_guid(code: str) -> str:
    """The GUID of a type code (profiles are validated against the table when they load)."""
    return GPT_TYPE_GUIDS[code.upper()]
