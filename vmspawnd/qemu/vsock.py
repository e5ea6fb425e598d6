# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest's vsock device, from one of two backends.

* ``vhost-vsock``: the host kernel's ``/dev/vhost-vsock``; we claim a CID on it and QEMU inherits
  the fd.  Host and guest talk over real ``AF_VSOCK`` sockets.
* ``vhost-device-vsock``: a vhost-user backend process (rust-vmm) for hosts without that device.
  Its host side is *hybrid vsock*: a guest connection to the host (CID 2) port P arrives as a
  connection to the Unix socket ``<socket>_P``; a host connection to the guest's port P is a
  connection to ``<socket>`` that first sends ``CONNECT P`` and reads ``OK …``.

``--vsock=auto`` takes the kernel's device when it opens, else vhost-device-vsock when it is
installed, else no vsock; ``--vsock=yes`` fails when neither is there.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.values import CID_MAX, CID_MIN, Tristate, is_decimal, printable, sha256

VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
KERNEL_DEVICE = "/dev/vhost-vsock"
#: Where to find the vhost-user backend: $VMSPAWND_VHOST_DEVICE_VSOCK (a path; empty: never use one),
#: else ``vhost-device-vsock`` on $PATH, else these.
BACKEND_ENV = "VMSPAWND_VHOST_DEVICE_VSOCK"
BACKEND_PATHS = (Path("/usr/bin/vhost-device-vsock"), Path("/usr/libexec/vhost-device-vsock"))
#: Over vhost-device-vsock, the host ports the guest sends its notifications and its journal to (each
#: device is its own world; over the kernel's, the notify port is picked by it, the journal's is the CID).
HYBRID_NOTIFY_PORT = 1_000_001
HYBRID_JOURNAL_PORT = 1_000_002
HOST_CID = 2
#: vhost-device-vsock: the hybrid socket's name in the VM's runtime directory (short: ``vsock_<port>``
#: must fit a socket address)
HYBRID_SOCKET = "vsock"


class VsockBackend(enum.StrEnum):
    KERNEL = "vhost-vsock"
    VHOST_USER = "vhost-device-vsock"


@dataclass(frozen=True)
class GuestVsock:
    """One run's vsock device: its backend, the guest's CID and how the host reaches it."""

    backend: VsockBackend
    cid: int
    fd: int | None = None  # vhost-vsock: the device fd QEMU inherits
    socket: Path | None = None  # vhost-device-vsock: the hybrid socket of the host side

    @property
    def ssh_address(self) -> str:
        """Where ``ssh`` (through systemd-ssh-proxy or ``vmspawnctl ssh``) reaches the guest."""
        return f"vsock/{self.cid}" if self.socket is None else f"vsock-mux/{self.socket}"

    @property
    def journal_port(self) -> int:
        """The host port the guest's journal goes to (--forward-journal)."""
        return self.cid if self.socket is None else HYBRID_JOURNAL_PORT

    def host_port_path(self, port: int) -> Path:
        """vhost-device-vsock: the Unix socket a guest connection to host port ``port`` arrives on."""
        assert self.socket is not None
        return self.socket.with_name(f"{self.socket.name}_{port}")


def find_backend() -> Path | None:
    """The vhost-device-vsock binary, or None (see :data:`BACKEND_ENV`)."""
    configured = os.environ.get(BACKEND_ENV)
    if configured is not None:
        return Path(configured) if configured and os.access(configured, os.X_OK) else None
    found = shutil.which("vhost-device-vsock")
    if found:
        return Path(found).absolute()
    return next((p for p in BACKEND_PATHS if os.access(p, os.X_OK)), None)


def choose_vsock(setting: Tristate, device: str = KERNEL_DEVICE) -> VsockBackend | None:
    """The backend ``--vsock=`` gets here (None: no vsock); ConfigError for ``yes`` without one."""
    if setting is Tristate.NO:
        return None
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
        return VsockBackend.KERNEL
    except OSError as e:
        kernel_problem = f"{device}: {e.strerror}"
    if find_backend() is not None:
        return VsockBackend.VHOST_USER
    if setting is Tristate.YES:
        raise ConfigError("vsock", "yes", f"{kernel_problem}, and vhost-device-vsock is not installed "
                                          "(apt install vhost-device-vsock)")
    return None


def candidate_cids(name: str, attempts: int = 64) -> list[int]:
    """Stable CIDs derived from the machine name, then random ones."""
    derived = [
        CID_MIN + int.from_bytes(sha256(f"{name}/{i}")[:8], "little") % (CID_MAX - CID_MIN)
        for i in range(attempts)
    ]
    span = CID_MAX - CID_MIN + 1  # (random ones from os.urandom: :mod:`random` is ≈ 0.2 MB of the daemon)
    return derived + [CID_MIN + int.from_bytes(os.urandom(4), "little") % span for _ in range(attempts)]


def claim_vsock(name: str, device: str = KERNEL_DEVICE, fixed_cid: int | None = None) -> tuple[int, int]:
    """Open the vhost-vsock device and set a free guest CID (exactly ``fixed_cid`` if given); return (fd, cid)."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        for cid in candidate_cids(name) if fixed_cid is None else [fixed_cid]:
            try:
                fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("<Q", cid))
                return fd, cid
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                if fixed_cid is not None:
                    raise ConfigError("vsock-cid", fixed_cid, "already taken by another VM") from None
        raise OSError(errno.EADDRNOTAVAIL, "no free vsock CID")
    except BaseException:
        os.close(fd)
        raise


def hybrid_cid(name: str, fixed_cid: int | None) -> int:
    """vhost-device-vsock: each device is its own world, so the CID only has to be valid."""
    return fixed_cid if fixed_cid is not None else candidate_cids(name, 1)[0]


def connect_guest_port(address: str, port: int, timeout: float = 10) -> socket.socket:
    """A stream connected to the guest's vsock ``port``, given a :attr:`GuestVsock.ssh_address`.

    Over vhost-device-vsock the ``OK`` line is read byte by byte, so nothing the guest sends after it
    is taken from the caller."""
    kind, _, where = address.partition("/")
    if not 0 <= port <= CID_MAX or kind not in ("vsock", "vsock-mux") or not where or (
            kind == "vsock" and not is_decimal(where)):
        raise ValueError(f"expected vsock/CID or vsock-mux/SOCKET and a port up to {CID_MAX}, "
                         f"got {address!r} port {port}")
    if kind == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target: tuple[int, int] | str = (int(where), port)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target = "/" + where.lstrip("/")
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        if kind == "vsock-mux":
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = bytearray()
            while not reply.endswith(b"\n") and len(reply) < 256:
                byte = sock.recv(1)
                if not byte:
                    break
                reply += byte
            if not reply.startswith(b"OK"):
                said = printable(reply.decode(errors="replace").strip())  # (the peer's words, on our terminal)
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"the guest refused port {port} "
                                             f"({said or 'connection closed'})")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise
