# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon's console relay.

Under the daemon QEMU serves the guest console on a unix socket in the runtime dir, so a
restarted daemon can reconnect.  The relay keeps that one connection, always drains it (a
guest never blocks on a console nobody watches), remembers recent output, and fans it out to
any number of attached clients.  Each client gets its own PTY by fd passing: it holds the
master (like ``machinectl``'s OpenMachinePTY), the relay serves the slave in raw mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from vmspawnd.identity import ROOT, Identity, connect_as
from vmspawnd.log import get_logger

SCROLLBACK = 64 * 1024
CLIENT_BACKLOG_LIMIT = 1024 * 1024
MAX_VIEWERS = 16  # per console: each holds a PTY, of which the host has a few thousand for everyone

log = get_logger()


class ConsoleRelay:
    """One VM console, many viewers."""

    def __init__(self, path: Path, *, read_only: bool, identity: Identity = ROOT) -> None:
        self.path = path
        self.identity = identity  # whose runtime directory the socket is in
        self.read_only = read_only
        self.scrollback = bytearray()
        self._qemu: asyncio.StreamWriter | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.ReadTransport] = {}  # viewer: output, input
        self._tasks: set[asyncio.Task[None]] = set()
        self._opening = 0  # viewers being attached (their PTYs exist already)

    async def connect(self) -> None:
        """Connect to QEMU's console socket (the run listens on it for QEMU before QEMU's exec)."""
        sock = connect_as(self.identity, str(self.path))  # the VM's user's path: connect as them
        reader, self._qemu = await asyncio.open_unix_connection(sock=sock)
        self._spawn(self._pump_from_qemu(reader))

    @property
    def viewers(self) -> int:
        """How many viewers are attached, or being attached."""
        return len(self._clients) + self._opening

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump_from_qemu(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                self.scrollback += data
                del self.scrollback[:-SCROLLBACK]
                for client in list(self._clients):
                    self._send(client, data)
        self._drop_all()

    def _drop(self, client: asyncio.StreamWriter) -> None:
        """Stop serving a viewer: close both directions of its PTY slave."""
        read_side = self._clients.pop(client, None)
        client.close()
        if read_side is not None:
            read_side.close()

    def _drop_all(self) -> None:
        for client in list(self._clients):
            self._drop(client)

    def _send(self, client: asyncio.StreamWriter, data: bytes) -> None:
        if client.is_closing() or client.transport.get_write_buffer_size() > CLIENT_BACKLOG_LIMIT:
            self._drop(client)  # a viewer that does not read is dropped, the guest is not slowed down
            return
        client.write(data)

    async def open_client(self) -> int:
        """A new viewer: a fresh PTY; return its master fd to hand to the client (the caller closes
        it once passed).  The client hanging up (closing the master) ends the viewer."""
        if self._qemu is None or self._qemu.is_closing():
            raise ConnectionError("the console is not connected")
        master, slave = os.openpty()
        self._opening += 1  # (before the first await: a caller that checked viewers holds its place)
        try:
            tty.setraw(slave)  # bytes pass unchanged both ways: no echo, line editing or CR/LF mangling
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            read_side, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                        os.fdopen(os.dup(slave), "rb", buffering=0))
            write_side, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                                 os.fdopen(os.dup(slave), "wb", buffering=0))
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
            self._opening -= 1
        writer = asyncio.StreamWriter(write_side, protocol, None, loop)
        self._clients[writer] = read_side
        self._send(writer, bytes(self.scrollback))
        self._spawn(self._pump_from_client(reader, writer))
        return master

    async def _pump_from_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):  # EIO: the client closed the master
            while data := await reader.read(4096):
                if not self.read_only and self._qemu is not None and not self._qemu.is_closing():
                    self._qemu.write(data)
                    await self._qemu.drain()  # a QEMU that does not read holds the viewer back (not our memory)
        self._drop(writer)

    async def close(self) -> None:
        self._drop_all()
        if self._qemu is not None:
            self._qemu.close()
            self._qemu = None
        for task in list(self._tasks):
            task.cancel()
