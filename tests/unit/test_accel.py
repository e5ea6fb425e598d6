# SPDX-License-Identifier: LGPL-2.1-or-later
"""KVM detection must not trust "/dev/kvm exists"."""

import platform

import pytest

from vmspawnd.qemu.accel import kvm_problem

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 module names")


def test_pvm_only_kvm_is_rejected(tmp_path):
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm_pvm").mkdir()
    assert "kvm_pvm" in kvm_problem(tmp_path, device="/dev/null")


def test_hardware_kvm_is_accepted(tmp_path):
    (tmp_path / "kvm_intel").mkdir()
    assert kvm_problem(tmp_path, device="/dev/null") is None


def test_missing_device_is_reported(tmp_path):
    assert "No such file" in kvm_problem(tmp_path, device=str(tmp_path / "kvm"))


def test_qemu_version_is_read_from_the_binary_and_picks_the_notify_reconnect_option(tmp_path):
    import asyncio

    from vmspawnd.guest.channel import NotifyChannel
    from vmspawnd.qemu.accel import find_qemu, qemu_version

    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 11.1.2 (Debian 1:11.1.2+ds-3)'\n")
    fake.chmod(0o755)
    assert qemu_version(fake) == (11, 1)
    assert qemu_version(tmp_path / "missing") == (0, 0)
    assert qemu_version(find_qemu()) >= (7, 2)  # the real one answers too

    async def chardev(version: tuple[int, int]) -> str:
        channel = NotifyChannel(lambda key, value: None)
        await channel.listen_virtio_serial(tmp_path / f"notify-{version[0]}.sock", version)
        await channel.close()
        return channel.qemu_args[1]

    assert asyncio.run(chardev((11, 1))).endswith(",reconnect-ms=1000")  # QEMU 10 dropped reconnect=
    assert asyncio.run(chardev((7, 2))).endswith(",reconnect=1")
