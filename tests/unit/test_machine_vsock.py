# SPDX-License-Identifier: LGPL-2.1-or-later
"""How a machine wires up vsock: claimed device fd passed to QEMU, notify listener, credential.

This machine has no /dev/vhost-vsock, so the device is the one thing stood in for: a stand-in
for ``claim_vsock`` returns an fd of /dev/null and the CID "the kernel" accepted.  The AF_VSOCK
listener is real (binding works here; only guests are missing).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vmspawnd import run as run_module
from vmspawnd.config import MachineConfig
from vmspawnd.run import Run
from vmspawnd.runtime import RuntimeDir
from vmspawnd.values import Tristate


@pytest.fixture
def vsock_device(monkeypatch):
    """A vhost-vsock stand-in: usable, and every claim gets the asked-for CID (or 4711)."""
    claimed: list[tuple[int, int | None]] = []

    def claim(name: str, fixed_cid: int | None = None) -> tuple[int, int]:
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        claimed.append((fd, fixed_cid))
        return fd, fixed_cid or 4711

    monkeypatch.setattr(run_module, "vsock_usable", lambda setting: setting is not Tristate.NO)
    monkeypatch.setattr(run_module, "claim_vsock", claim)
    return claimed


def new_run(config: MachineConfig, base: Path) -> Run:
    return Run(config, RuntimeDir(base, config.name), on_event=lambda run, kind, data: None)


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("fixed", [None, 1234])
async def test_claimed_vsock_fd_goes_to_qemu_and_the_guest_learns_where_to_notify(tmp_path, vsock_device, fixed):
    config = MachineConfig(name="vs", linux=Path("/vmlinuz"), vsock_cid=fixed)
    m = new_run(config, tmp_path)
    pass_fds: list[int] = []
    async with m._stack:
        channel, cid, fd = await m._open_notify_channel(tmp_path, pass_fds)
        assert cid == (fixed or 4711) and vsock_device == [(fd, fixed)]
        assert pass_fds == [fd] and fd_open(fd)  # QEMU inherits it as vhostfd=
        assert channel.credential == ("vmm.notify_socket", f"vsock-stream:2:{channel.port}")
        listener = [p for p in Path("/proc/self/fd").iterdir() if _is_vsock(p)]
        assert listener, "no AF_VSOCK listener"
        assert not (tmp_path / "notify.sock").exists()
    assert not fd_open(fd)  # released with the run


async def test_without_vsock_a_fixed_cid_is_ignored_and_virtio_serial_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "vsock_usable", lambda setting: False)
    m = new_run(MachineConfig(name="vs", linux=Path("/vmlinuz"), vsock_cid=1234), tmp_path)
    pass_fds: list[int] = []
    async with m._stack:
        channel, cid, fd = await m._open_notify_channel(tmp_path, pass_fds)
        assert (cid, fd, pass_fds, channel.credential) == (None, None, [], None)
        assert (tmp_path / "notify.sock").exists()


def _is_vsock(fd_link: Path) -> bool:
    try:
        s = socket.socket(fileno=os.dup(int(fd_link.name)))
    except (OSError, ValueError):
        return False
    with s:
        return s.family == socket.AF_VSOCK
