# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon's file-descriptor store (systemd/fdstore.py) with the notify channel: what a guest says
while no daemon runs waits for the next one.  The service manager here is a faithful peer of
sd_notify's store messages (``FDSTORE=1``, ``FDSTOREREMOVE=1``, ``FDNAME=``, the descriptors as
SCM_RIGHTS) on a real $NOTIFY_SOCKET; tests/systemd/test_daemon_vm.py does the same under systemd."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vmspawnd.guest.channel import NotifyChannel
from vmspawnd.log import get_logger
from vmspawnd.qemu.output import QemuOutput
from vmspawnd.systemd.fdstore import FdStore, for_service, notify_name, output_name


class ServiceManager:
    """What systemd's store holds for the service, by name (its own copies of the descriptors)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)  # (Python 3.11's recv_fds drops its flags argument)
        self.store: dict[str, list[int]] = {}

    def receive(self) -> dict[str, list[int]]:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.sock, 4096, 16)
            except BlockingIOError:
                return self.store
            fields = dict(line.split("=", 1) for line in message.decode().splitlines())
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(name, []):
                    os.close(fd)
            if fields.get("FDSTORE") == "1":
                self.store.setdefault(name, []).extend(fds)
            else:
                for fd in fds:
                    os.close(fd)

    def passed(self) -> dict[str, list[int]]:
        """What a next daemon is started with (LISTEN_FDS): copies; the store keeps its own."""
        return {name: [os.dup(fd) for fd in fds] for name, fds in self.receive().items()}

    def close(self) -> None:
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    peer = ServiceManager(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield peer
    peer.close()


async def _guest_says(path: Path, message: bytes) -> None:
    """A vsock notification over vhost-device-vsock: one connection to the unix socket, one message."""
    with socket.socket(socket.AF_UNIX) as guest:
        guest.connect(str(path))
        guest.sendall(message)


async def test_what_a_guest_says_while_no_daemon_runs_is_read_by_the_next(manager: ServiceManager, tmp_path: Path):
    path = tmp_path / "notify.sock_1000001"
    first = NotifyChannel(lambda message: None, FdStore(), notify_name("web"))
    await first.listen_hybrid(path, 1000001)
    assert list(manager.receive()) == ["notify.web"]
    await first.close()  # the daemon stops (or dies): its listener is closed, the store's copy is not
    assert path.exists()

    await _guest_says(path, b"READY=1\nSTATUS=said while away\n")

    received: list[tuple[str, str]] = []
    second = NotifyChannel(lambda message: received.extend(message), FdStore(manager.passed()),
                           notify_name("web"))
    try:
        await second.listen_hybrid(path, 1000001)
        async with asyncio.timeout(5):
            while len(received) < 2:
                await asyncio.sleep(0.01)
    finally:
        await second.close()
    assert received == [("READY", "1"), ("STATUS", "said while away")]
    assert list(manager.receive()) == ["notify.web"]  # still the one listener: nothing stored twice


async def test_what_qemu_writes_while_no_daemon_runs_is_logged_by_the_next(manager: ServiceManager) -> None:
    first = QemuOutput(get_logger())
    FdStore().keep(output_name("web"), first.read_fd)  # (as Run._store_output does)
    qemu = os.dup(first.write_fd)  # (QEMU's stdout and stderr)
    first.start()
    with capture_logs() as logs:
        os.write(qemu, b"said to the first\n")
        first.close()  # the daemon stops (or dies): its read end is closed, the store's copy is not
        os.write(qemu, b"said while away\n")  # (without the store: EPIPE, and the line lost)
        second = QemuOutput(get_logger(), read_fd=FdStore(manager.passed()).take_fd(output_name("web")))
        second.start()
        os.close(qemu)  # QEMU exits
        await second.ended(5)
    said = [entry["output"] for entry in logs if entry["event"] == "QEMU's output"]
    assert said == ["said to the first", "said while away"]
    assert FdStore.stored_name(output_name("web"))  # (a next daemon takes it as ours, not a socket unit's)
    second.close()


async def test_without_a_store_a_guest_speaking_while_no_daemon_runs_is_refused(tmp_path: Path):
    path = tmp_path / "notify.sock_1000001"
    first = NotifyChannel(lambda message: None)
    await first.listen_hybrid(path, 1000001)
    await first.close()
    with pytest.raises(ConnectionRefusedError):
        await _guest_says(path, b"READY=1\n")


async def test_a_stored_listener_of_another_address_is_not_used(manager: ServiceManager, tmp_path: Path):
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(tmp_path / "elsewhere.sock"))
    old.listen(1)
    channel = NotifyChannel(lambda message: None, FdStore({"notify.web": [old.detach()]}), notify_name("web"))
    try:
        await channel.listen_hybrid(tmp_path / "notify.sock_1", 1)
        (stored,) = manager.receive()["notify.web"]  # the new one replaced it in the store
        with socket.socket(fileno=os.dup(stored)) as sock:
            assert sock.getsockname() == str(tmp_path / "notify.sock_1")
    finally:
        await channel.close()


def test_what_no_run_took_is_closed_and_dropped_from_the_store(manager: ServiceManager):
    with socket.socket(socket.AF_UNIX) as left:
        FdStore().keep("notify.gone", left.fileno())  # an earlier daemon's, whose VM ended while none ran
    passed = manager.passed()
    assert list(manager.store) == ["notify.gone"]
    FdStore(passed).forget_unclaimed()
    assert manager.receive() == {}
    (fd,) = passed["notify.gone"]
    with pytest.raises(OSError):
        os.fstat(fd)


def test_only_the_main_process_of_a_service_has_a_store(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("SYSTEMD_EXEC_PID", str(os.getpid()))
    assert for_service({}) is not None
    monkeypatch.setenv("SYSTEMD_EXEC_PID", "1")  # (a shell started by a service, say)
    assert for_service({}) is None
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.setenv("SYSTEMD_EXEC_PID", str(os.getpid()))
    assert for_service({}) is None
    assert FdStore.stored_name("notify.web") and not FdStore.stored_name("vmspawnd.socket")
