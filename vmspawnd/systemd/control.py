# SPDX-License-Identifier: LGPL-2.1-or-later
"""A running VM's control socket, ``<records dir>/control``: it listens from the run's start, and is
served (``io.systemd.MachineInstance``, systemd/instance.py) from its first connection on.

What serves it, asyncvarlink and the interface, takes ≈ 10 ms of imports, a tenth of the CPU that
``vmspawn`` uses in all: it is loaded only for a VM that someone calls, which machined ≥ 261 does
for machinectl's commands on that VM (and nobody does where no machined runs).  A connection made
meanwhile waits in the socket's backlog, as one made before a server accepts.  This module imports
nothing of asyncvarlink."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import typing
from pathlib import Path

from vmspawnd.log import get_logger
from vmspawnd.proc import SUN_PATH_MAX

if typing.TYPE_CHECKING:
    from vmspawnd.systemd.instance import ControlServer, MachineControl

log = get_logger()

SOCKET_NAME = "control"
BACKLOG = 16


def control_path(records: Path) -> Path | None:
    """Where a VM's control socket goes, or None when the path would not fit a unix socket address."""
    path = records / SOCKET_NAME
    return path if len(os.fsencode(path)) <= SUN_PATH_MAX else None


class ControlListener:
    """``async with ControlListener(path, run)``: ``path`` listens for the block (OSError where it
    cannot), and is served from its first connection on."""

    def __init__(self, path: Path, control: MachineControl) -> None:
        self.path = path  # in a directory of ours alone
        self._control = control
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loading: asyncio.Task[None] | None = None
        self._server: ControlServer | None = None

    async def __aenter__(self) -> ControlListener:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a socket an earlier daemon left (re-adoption)
            sock.bind(str(self.path))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._first_connection)
        return self

    def _first_connection(self) -> None:
        assert self._loop is not None and self._sock is not None
        self._loop.remove_reader(self._sock.fileno())
        self._loading = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        assert self._sock is not None
        try:
            from vmspawnd.systemd.instance import ControlServer  # (deferred: see the module's docstring)

            server = ControlServer(self._sock, self._control)
            await server.start()
        except Exception as e:  # (its callers get a closed socket, not a wait)
            log.warning("cannot serve the control socket", path=str(self.path), error=str(e))
            self._sock.close()
            return
        self._server = server

    async def __aexit__(self, *exc: object) -> None:
        if self._loading is None:
            if self._loop is not None and self._sock is not None:
                self._loop.remove_reader(self._sock.fileno())
        else:
            await self._loading  # (a few ms: its imports, and the server's start)
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._sock is not None:
            self._sock.close()
