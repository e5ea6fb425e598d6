# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon's file-descriptor store at its service manager (sd_notify ``FDSTORE=1``).

A running VM's guest speaks to the daemon through a socket the daemon listens on (its notify
channel).  Under systemd the daemon hands a copy of each such listener to its service's store
(``FileDescriptorStoreMax=`` in vmspawnd.service): systemd holds it while the daemon stops or
restarts, and passes it to the next daemon (``LISTEN_FDS``, by name).  So nothing a guest says
while no daemon runs is lost: its connection waits in the listener's backlog, where it would
otherwise be refused (vsock), or its writes would time out (virtio-serial).

The read end of each QEMU's output pipe (qemu/output.py) is stored too: what QEMU writes while no
daemon runs waits in the pipe for the next daemon, where QEMU's writes would otherwise fail.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

from vmspawnd.log import get_logger
from vmspawnd.systemd.notify import send_with_fds

#: the first words of the names of the descriptors we store (``notify.<machine>``, ``output.<machine>``);
#: any other descriptor systemd passes is a socket unit's
NOTIFY = "notify"
OUTPUT = "output"

log = get_logger()

Send = Callable[[str, list[int]], object]


class FdStore:
    """What the service manager keeps for us, and what it gave back at our start."""

    def __init__(self, inherited: dict[str, list[int]] | None = None, send: Send = send_with_fds) -> None:
        self._inherited = dict(inherited or {})  # name → fds, until a run takes them
        self._send = send

    @staticmethod
    def stored_name(name: str) -> bool:
        """Whether a descriptor systemd passed under ``name`` is one we stored (not a socket unit's)."""
        return name.split(".", 1)[0] in (NOTIFY, OUTPUT)

    def keep(self, name: str, fd: int) -> None:
        """Store a copy of ``fd`` under ``name`` (one per name: an earlier one is dropped).  A store
        that cannot take it costs only what it is for: it is logged, and the run goes on."""
        self._tell(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self._tell(f"FDSTORE=1\nFDNAME={name}", fd)

    def take_fd(self, name: str) -> int | None:
        """The descriptor stored under ``name`` by an earlier daemon, if systemd passed it to us (once)."""
        fds = self._inherited.pop(name, [])
        for extra in fds[1:]:
            os.close(extra)
        return fds[0] if fds else None

    def take(self, name: str) -> socket.socket | None:
        """The socket stored under ``name`` by an earlier daemon, if systemd passed it to us (once)."""
        fd = self.take_fd(name)
        if fd is None:
            return None
        sock = socket.socket(fileno=fd)  # (its family, unix or vsock, read from it)
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
        return sock

    def forget(self, name: str) -> None:
        """Drop what is stored under ``name`` (its VM ended)."""
        self._tell(f"FDSTOREREMOVE=1\nFDNAME={name}")

    def _tell(self, message: str, *fds: int) -> None:
        try:
            self._send(message, list(fds))
        except OSError as e:
            log.warning("cannot tell the service manager", message=message.replace("\n", " "), error=str(e))

    def forget_unclaimed(self) -> None:
        """Drop what no run took (their VMs ended while no daemon ran)."""
        for name, fds in self._inherited.items():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.forget(name)
            log.info("dropped a stored descriptor of a VM that is gone", name=name)
        self._inherited.clear()


def for_service(inherited: dict[str, list[int]]) -> FdStore | None:
    """The store of the systemd service we are the main process of (None when we are not one: no
    $NOTIFY_SOCKET, or $SYSTEMD_EXEC_PID, which systemd ≥ 248 sets, names another process)."""
    if not os.environ.get("NOTIFY_SOCKET") or os.environ.get("SYSTEMD_EXEC_PID") != str(os.getpid()):
        return None
    return FdStore(inherited)


def notify_name(machine: str) -> str:
    """The stored name of a machine's notify listener (machine names are letters, digits and
    hyphens: a valid descriptor name)."""
    return f"{NOTIFY}.{machine}"


def output_name(machine: str) -> str:
    """The stored name of the read end of a machine's QEMU output pipe."""
    return f"{OUTPUT}.{machine}"
