# SPDX-License-Identifier: LGPL-2.1-or-later
"""How a machine wires up vsock: claimed device fd passed to QEMU, notify listener, credential.

This machine has no /dev/vhost-vsock, so the device is the one thing stood in for: a stand-in
for ``claim_vsock`` returns an fd of /dev/null and the CID "the kernel" accepted.  The AF_VSOCK
listener is real (binding works here; only guests are missing).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from vmspawnd import run as run_module
from vmspawnd.config import MachineConfig
from vmspawnd.qemu.vsock import VsockBackend
from vmspawnd.run import Run
from vmspawnd.runtime import RuntimeDir


@pytest.fixture
def vsock_device(monkeypatch):
    """A vhost-vsock stand-in: usable, and every claim gets the asked-for CID (or 4711)."""
    claimed: list[tuple[int, int | None]] = []

    def claim(name: str, fixed_cid: int | None = None) -> tuple[int, int]:
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        claimed.append((fd, fixed_cid))
        return fd, fixed_cid or 4711

    monkeypatch.setattr(run_module, "claim_vsock", claim)
    return claimed


def new_run(config: MachineConfig, base: Path, backend: VsockBackend | None = None) -> Run:
    run = Run(config, RuntimeDir(base, config.name), on_event=lambda run, kind, data: None)
    run._vsock_backend = backend  # as the preflight chose it
    return run


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("fixed", [None, 1234])
async def test_claimed_vsock_fd_goes_to_qemu_and_the_guest_learns_where_to_notify(tmp_path, vsock_device, fixed):
    config = MachineConfig(name="vs", linux=Path("/vmlinuz"), vsock_cid=fixed)
    m = new_run(config, tmp_path, VsockBackend.KERNEL)
    pass_fds: list[int] = []
    async with m._stack:
        channel = await m._open_notify_channel(tmp_path, pass_fds)
        assert m.vsock is not None and m.vsock.fd is not None
        cid, fd = m.vsock.cid, m.vsock.fd
        assert cid == (fixed or 4711) and vsock_device == [(fd, fixed)]
        assert m.vsock.ssh_address == f"vsock/{cid}"
        assert pass_fds == [fd] and fd_open(fd)  # QEMU inherits it as vhostfd=
        assert channel.credential == ("vmm.notify_socket", f"vsock-stream:2:{channel.port}")
        listener = [p for p in Path("/proc/self/fd").iterdir() if _is_vsock(p)]
        assert listener, "no AF_VSOCK listener"
        assert not (tmp_path / "notify.sock").exists()
    assert not fd_open(fd)  # released with the run


async def test_without_vsock_a_fixed_cid_is_ignored_and_virtio_serial_is_used(tmp_path):
    m = new_run(MachineConfig(name="vs", linux=Path("/vmlinuz"), vsock_cid=1234), tmp_path)
    pass_fds: list[int] = []
    async with m._stack:
        channel = await m._open_notify_channel(tmp_path, pass_fds)
        assert (m.vsock, pass_fds, channel.credential) == (None, [], None)
        assert (tmp_path / "notify.sock").exists()


async def test_over_vhost_device_vsock_the_guest_notifies_a_unix_socket_by_its_port(tmp_path):
    """The hybrid side: what the backend would deliver for a guest connection to host port P."""
    m = new_run(MachineConfig(name="vs", linux=Path("/vmlinuz"), vsock_cid=1234), tmp_path, VsockBackend.VHOST_USER)
    seen: list[tuple[str, str]] = []
    m._guest_message = lambda message: seen.extend(message)  # type: ignore[method-assign]
    pass_fds: list[int] = []
    async with m._stack:
        channel = await m._open_notify_channel(tmp_path, pass_fds)
        assert m.vsock is not None and (m.vsock.cid, m.vsock.fd, pass_fds) == (1234, None, [])
        assert m.vsock.ssh_address == f"vsock-mux/{tmp_path / 'vsock'}"
        port = channel.port
        assert channel.credential == ("vmm.notify_socket", f"vsock-stream:2:{port}")
        path = tmp_path / f"vsock_{port}"
        assert path.stat().st_mode & 0o777 == 0o600 and not (tmp_path / "notify.sock").exists()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b"READY=1\nSTATUS=up\n")
        for _ in range(100):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert seen == [("READY", "1"), ("STATUS", "up")]


def _is_vsock(fd_link: Path) -> bool:
    try:
        s = socket.socket(fileno=os.dup(int(fd_link.name)))
    except (OSError, ValueError):
        return False
    with s:
        return s.family == socket.AF_VSOCK
