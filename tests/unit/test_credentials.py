# SPDX-License-Identifier: LGPL-2.1-or-later
"""Credential files: SMBIOS type-11 strings while they fit in 64 KiB, fw_cfg for the rest."""

from __future__ import annotations

import base64
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.guest.credentials import SMBIOS_BUDGET, parse_set_credential, write_credentials
from vmspawnd.qemu.argv import Resources, build_qemu_argv


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_small_credentials_and_raw_strings_are_private_smbios_files(tmp_path):
    files = write_credentials(tmp_path / "c", [("a", b"1\0"), ("b", b"two")], ("io.systemd.credential:x=y",))
    assert [p.read_bytes() for p in files.smbios] == [
        b"io.systemd.credential.binary:a=" + base64.b64encode(b"1\0"),
        b"io.systemd.credential.binary:b=" + base64.b64encode(b"two"),
        b"io.systemd.credential:x=y"]
    assert files.fw_cfg == []
    assert {mode(p) for p in files.smbios} == {0o600} and mode(tmp_path / "c") == 0o700


def test_what_does_not_fit_in_smbios_goes_to_fw_cfg_raw_and_read_only(tmp_path):
    big = bytes(range(256)) * 160  # 40 KiB: base64 makes it 54 KiB, one fits in SMBIOS, two do not
    files = write_credentials(tmp_path / "c", [("first", big), ("second", big), ("small", b"s")])
    assert sorted(p.name for p in files.smbios) == ["first", "small"]  # later small ones still use SMBIOS
    assert sum(p.stat().st_size + 1 for p in files.smbios) <= SMBIOS_BUDGET
    ((name, path),) = files.fw_cfg
    assert name == "opt/io.systemd.credentials/second"
    assert path.read_bytes() == big and mode(path) == 0o400


def test_a_credential_that_fits_nowhere_is_refused_by_name(tmp_path):
    big = b"x" * 60_000
    long_id = "a-credential-name-over-28-chars"
    with pytest.raises(ConfigError) as e:
        write_credentials(tmp_path / "c", [(long_id, big)])
    assert e.value.field == "credential" and e.value.value == long_id and "fw_cfg" in e.value.reason


def test_raw_smbios_strings_beyond_the_budget_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="smbios11"):
        write_credentials(tmp_path / "c", [], ("io.systemd.credential:x=" + "y" * SMBIOS_BUDGET,))


def test_fw_cfg_files_reach_qemu_with_commas_escaped(tmp_path):
    config = MachineConfig(name="vm", linux=Path("/vmlinuz"))
    res = Resources(qemu=Path("/usr/bin/qemu-system-x86_64"), kvm=False, qmp_fd=3, console_pty="/dev/pts/9",
                    fw_cfg_files=(("opt/io.systemd.credentials/a,b", Path("/run/x,y/a,b")),))
    argv = build_qemu_argv(config, res)
    i = argv.index("-fw_cfg")
    assert argv[i + 1] == "name=opt/io.systemd.credentials/a,,b,file=/run/x,,y/a,,b"


def test_small_credentials_with_long_names_stay_in_smbios_when_a_big_one_comes_first(tmp_path):
    big = b"b" * 42_900  # nearly the whole SMBIOS budget, base64-encoded
    files = write_credentials(tmp_path / "c", [("big", big), ("systemd.unit-dropin.sshd-vsock@.service", b"[x]"),
                                               ("ssh.ephemeral-authorized_keys-all", b"ssh-ed25519 AAAA")])
    assert sorted(p.name for p in files.smbios) == ["ssh.ephemeral-authorized_keys-all",
                                                    "systemd.unit-dropin.sshd-vsock@.service"]
    assert [name for name, _ in files.fw_cfg] == ["opt/io.systemd.credentials/big"]


def test_fw_cfg_takes_a_few_big_credentials_not_unlimited(tmp_path):
    creds = [(f"c{i}", b"x" * 30_000) for i in range(10)]  # 40 KB in base64: one fits in SMBIOS
    with pytest.raises(ConfigError, match="fw_cfg"):
        write_credentials(tmp_path / "c", creds)
    assert len(write_credentials(tmp_path / "d", creds[:9]).fw_cfg) == 8  # one in SMBIOS, eight in fw_cfg


def test_a_command_lines_non_utf8_bytes_reach_the_guest_as_they_were(tmp_path):
    """A shell passes bytes; Python keeps those that are no UTF-8 as surrogates: out they go as the same
    bytes (a traceback before).  An escape naming no character is refused."""
    assert parse_set_credential("foo:\udcff\\u00e9") == ("foo", b"\xff\xc3\xa9")
    files = write_credentials(tmp_path / "c", [], ("io.systemd.stub.kernel-cmdline-extra=caf\udce9",))
    assert [p.read_bytes() for p in files.smbios] == [b"io.systemd.stub.kernel-cmdline-extra=caf\xe9"]
    for bad in ("foo:\\ud800", "foo:\\U00110000"):
        with pytest.raises(ConfigError, match="no Unicode character"):
            parse_set_credential(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_credential_that_fills_the_disk_names_its_file(tmp_path):
    """A write to a full disk names no file by itself: the error says which credential's file it was."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path)], check=True)
    try:
        with pytest.raises(OSError) as e:
            write_credentials(tmp_path / "smbios", [("big", b"x" * 200_000)])
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "smbios" / "fw_cfg" / "big")
    finally:
        subprocess.run(["umount", "-l", str(tmp_path)], check=False)
