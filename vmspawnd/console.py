"""The daemon's console relay.

Under the daemon QEMU serves the guest console on a unix socket in the runtime dir, so a
restarted daemon can reconnect.  The relay keeps that one connection, always drains it (a
guest never blocks on a console nobody watches), remembers recent output, and fans it out to
any number of attached clients, each of which gets one end of a socketpair by fd passing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import structlog

SCROLLBACK = 64 * 1024
CLIENT_BACKLOG_LIMIT = 1024 * 1024

log = structlog.get_logger()


class ConsoleRelay:
    """One VM console, many viewers."""

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self.scrollback = bytearray()
        self._qemu: asyncio.StreamWriter | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, timeout: float = 5.0) -> None:
        """Connect to QEMU's console socket (QEMU listens on it from the start)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, self._qemu = await asyncio.open_unix_connection(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._spawn(self._pump_from_qemu(reader))

    def _spawn(self, coro) -> None:
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
        for client in list(self._clients):
            client.close()
        self._clients.clear()

    def _send(self, client: asyncio.StreamWriter, data: bytes) -> None:
        if client.is_closing() or client.transport.get_write_buffer_size() > CLIENT_BACKLOG_LIMIT:
            client.close()  # a viewer that does not read is dropped, the guest is not slowed down
            self._clients.discard(client)
            return
        client.write(data)

    async def open_client(self) -> socket.socket:
        """A new viewer: return the socket to hand to the client (the caller closes it after passing it)."""
        if self._qemu is None or self._qemu.is_closing():
            raise ConnectionError("the console is not connected")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._send(writer, bytes(self.scrollback))
        self._clients.add(writer)
        self._spawn(self._pump_from_client(reader, writer))
        return theirs

    async def _pump_from_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(4096):
                if not self.read_only and self._qemu is not None and not self._qemu.is_closing():
                    self._qemu.write(data)
        self._clients.discard(writer)
        writer.close()

    async def close(self) -> None:
        for client in list(self._clients):
            client.close()
        self._clients.clear()
        if self._qemu is not None:
            self._qemu.close()
            self._qemu = None
        for task in list(self._tasks):
            task.cancel()
