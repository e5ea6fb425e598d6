# SPDX-License-Identifier: LGPL-2.1-or-later
"""KVM detection must not trust "/dev/kvm exists"."""

import os
import platform

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.qemu.accel import VERSION_CACHE, VERSIONS_KEPT, _known_versions, kvm_problem, qemu_version

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
        channel = NotifyChannel(lambda message: None)
        await channel.listen_virtio_serial(tmp_path / f"notify-{version[0]}.sock", version)
        await channel.close()
        return channel.qemu_args[1]

    assert asyncio.run(chardev((11, 1))).endswith(",reconnect-ms=1000")  # QEMU 10 dropped reconnect=
    assert asyncio.run(chardev((7, 2))).endswith(",reconnect=1")


def test_qemu_version_is_kept_in_the_runtime_base_until_the_binary_changes(tmp_path):
    runs = tmp_path / "runs"
    fake = tmp_path / "qemu-system-x86_64"

    def install(version: str) -> None:
        fake.write_text(f"#!/bin/sh\necho run >> {runs}\necho 'QEMU emulator version {version} (Debian)'\n")
        fake.chmod(0o755)

    def asked() -> int:
        _known_versions.clear()  # as a new process: only the file remembers
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    install("9.2.0")
    assert qemu_version(fake, cache_dir=tmp_path) == (9, 2) and asked() == 1
    assert (tmp_path / VERSION_CACHE).exists()
    assert qemu_version(fake, cache_dir=tmp_path) == (9, 2) and asked() == 1  # not asked again
    install("10.1.3-with-a-longer-name")  # an upgrade: another file
    assert qemu_version(fake, cache_dir=tmp_path) == (10, 1) and asked() == 2
    (tmp_path / VERSION_CACHE).write_text("{not json")
    assert qemu_version(fake, cache_dir=tmp_path) == (10, 1) and asked() == 3
    assert qemu_version(fake, cache_dir=tmp_path) == (10, 1) and asked() == 3  # and rewritten
    os.chown(tmp_path / VERSION_CACHE, 65534, 65534)  # not written by us: not believed
    assert qemu_version(fake, cache_dir=tmp_path) == (10, 1) and asked() == 4


def test_the_versions_of_several_qemus_are_kept_so_taking_turns_asks_each_once(tmp_path):
    runs = tmp_path / "runs"
    fakes = []
    for i in range(VERSIONS_KEPT + 1):
        fake = tmp_path / f"qemu-{i}"
        fake.write_text(f"#!/bin/sh\necho run >> {runs}\necho 'QEMU emulator version {i + 1}.{i} (Debian)'\n")
        fake.chmod(0o755)
        fakes.append(fake)

    def version(fake) -> tuple[int, int]:
        _known_versions.clear()  # as a new process: only the file remembers
        return qemu_version(fake, cache_dir=tmp_path)

    def asked() -> int:
        return len(runs.read_text().splitlines())

    for _ in range(3):  # (a user taking turns with two QEMUs: each is asked once)
        assert version(fakes[0]) == (1, 0) and version(fakes[1]) == (2, 1)
    assert asked() == 2
    for i, fake in enumerate(fakes[2:], 2):  # one more than are kept: the one asked longest ago goes
        assert version(fake) == (i + 1, i)
    assert asked() == VERSIONS_KEPT + 1
    assert version(fakes[1]) == (2, 1) and asked() == VERSIONS_KEPT + 1
    assert version(fakes[0]) == (1, 0) and asked() == VERSIONS_KEPT + 2


def test_find_qemu_sees_a_qemu_installed_or_removed_since_it_last_looked(tmp_path, monkeypatch):
    from vmspawnd.qemu.accel import find_qemu

    early, late = tmp_path / "early", tmp_path / "late"
    for d in (early, late):
        d.mkdir()
    monkeypatch.setenv("PATH", f"{early}:{late}")

    def install(binary):
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)

    def settle():  # as directories are between starts: changed a while ago (an answer is then kept)
        for d in (early, late):
            os.utime(d, (1_000_000_000, 1_000_000_000))

    install(real := late / "qemu-system-x86_64")
    settle()
    assert find_qemu() == real
    install(first := early / "qemu")  # installed while the daemon runs: the next start uses it
    assert find_qemu() == first
    settle()
    assert find_qemu() == first
    first.unlink()  # removed again
    assert find_qemu() == real
    monkeypatch.setenv("PATH", str(early))  # another $PATH: looked up in it
    with pytest.raises(ConfigError, match="no QEMU binary found"):
        find_qemu()
