# SPDX-License-Identifier: LGPL-2.1-or-later
"""vhost-device-vsock: the guest's vsock device where the host kernel has no ``/dev/vhost-vsock``.

It runs as the VM's user beside QEMU, like swtpm and virtiofsd: QEMU connects to its vhost-user
socket (``vsock.vhost``); the host side is the hybrid socket ``vsock`` (see
:mod:`vmspawnd.qemu.vsock`).  Ready once it has created the vhost-user socket.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.proc import check_socket_path
from vmspawnd.qemu import qemu_escape
from vmspawnd.qemu.vsock import HYBRID_JOURNAL_PORT, HYBRID_NOTIFY_PORT, GuestVsock, find_backend
from vmspawnd.services.runner import RunningService, ServiceError, ServiceRunner, ServiceSpec

VHOST_USER_SOCKET = "vsock.vhost"


def vhost_user_socket(vsock: GuestVsock) -> Path:
    assert vsock.socket is not None
    return vsock.socket.with_name(VHOST_USER_SOCKET)


def vsock_backend_spec(machine: str, vsock: GuestVsock, backend: Path, bound_to: str | None = None,
                       identity: Identity = ROOT) -> ServiceSpec:
    """vhost-device-vsock for one guest: its CID, QEMU's socket and the host's hybrid socket."""
    assert vsock.socket is not None
    vhost = vhost_user_socket(vsock)
    argv = (str(backend), f"--guest-cid={vsock.cid}", f"--socket={vhost}", f"--uds-path={vsock.socket}")
    return ServiceSpec(name=f"vmspawnd-{machine}-vsock", argv=argv, bound_to=bound_to, ready_path=vhost,
                       description=f"vsock device (CID {vsock.cid}) of VM {machine}", identity=identity)


async def start_vsock_backend(runner: ServiceRunner, machine: str, vsock: GuestVsock, bound_to: str | None = None,
                              identity: Identity = ROOT) -> RunningService:
    """Start vhost-device-vsock (after removing sockets an earlier run left, as the VM's user)."""
    backend = find_backend()
    if backend is None:
        raise ServiceError(f"vmspawnd-{machine}-vsock", "vhost-device-vsock is not installed")
    vhost = vhost_user_socket(vsock)
    check_socket_path(vsock.host_port_path(max(HYBRID_NOTIFY_PORT, HYBRID_JOURNAL_PORT)))
    with acting_as(identity):
        for stale in (vhost, vsock.socket):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # type: ignore[union-attr]
    return await runner.start(vsock_backend_spec(machine, vsock, backend, bound_to, identity))


def qemu_vsock_args(vsock: GuestVsock) -> list[str]:
    """``-chardev socket,…`` + ``-device vhost-user-vsock-pci`` (guest RAM must be shared memory)."""
    return ["-chardev", f"socket,id=vsock,path={qemu_escape(vhost_user_socket(vsock))}",
            "-device", "vhost-user-vsock-pci,chardev=vsock"]
