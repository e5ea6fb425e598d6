# SPDX-License-Identifier: LGPL-2.1-or-later
"""Unified kernel images: detected by their .linux section; command line via SMBIOS; UEFI only."""

import struct
import uuid
from pathlib import Path

import pytest

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.plan import plan_launch
from vmspawnd.qemu.argv import Resources, build_qemu_argv, cmdline_smbios_strings
from vmspawnd.qemu.firmware import is_uki, pe_section_names


def make_pe(path: Path, sections: list[str]) -> Path:
    """A minimal PE: MZ header, e_lfanew → PE signature, COFF header, empty optional header, sections."""
    data = bytearray(0x40)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x40)
    coff = bytearray(24)
    coff[:4] = b"PE\0\0"
    struct.pack_into("<H", coff, 6, len(sections))
    struct.pack_into("<H", coff, 20, 0)
    data += coff
    for name in sections:
        data += name.encode().ljust(8, b"\0") + bytes(32)
    path.write_bytes(bytes(data))
    return path


def test_sections_and_uki_detection(tmp_path):
    uki = make_pe(tmp_path / "uki.efi", [".text", ".osrel", ".cmdline", ".linux", ".initrd"])
    plain = make_pe(tmp_path / "vmlinuz", [".setup", ".text"])
    assert pe_section_names(uki)[3] == ".linux" and is_uki(uki)
    assert not is_uki(plain)
    (tmp_path / "junk").write_bytes(b"\0" * 100)
    assert pe_section_names(tmp_path / "junk") == []


def test_uki_needs_uefi(tmp_path):
    uki = make_pe(tmp_path / "uki.efi", [".linux"])
    with pytest.raises(ConfigError, match="UKI"):
        plan_launch(MachineConfig(name="u", linux=uki, firmware="bios").validated())


def test_uki_command_line_goes_via_smbios_not_append(tmp_path):
    uki = make_pe(tmp_path / "uki.efi", [".linux"])
    config = MachineConfig(name="u", linux=uki, kernel_cmdline=("quiet",), firmware="none")
    res = Resources(qemu=Path("/usr/bin/qemu"), kvm=False, qmp_fd=3, console_pty="/dev/pts/1", uki=True,
                    vmgenid=uuid.UUID(int=1))
    assert "-append" not in build_qemu_argv(config, res)
    assert cmdline_smbios_strings(config, None, uki=True) == [
        "io.systemd.stub.kernel-cmdline-extra=console=hvc0 quiet",
        "io.systemd.boot.kernel-cmdline-extra=console=hvc0 quiet"]
    assert cmdline_smbios_strings(config, None, uki=False) == []
