# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest → host notify channel (sd_notify-style ``KEY=VALUE`` lines).

Two transports, same messages:

* vsock: the guest gets ``vmm.notify_socket=vsock-stream:2:PORT``; each notification is one
  stream connection, read to EOF (at most 4096 bytes, as upstream).  Over the kernel's
  vhost-vsock we listen on AF_VSOCK; over vhost-device-vsock such a connection arrives on the
  Unix socket ``<hybrid socket>_PORT``.
* virtio-serial: a port named ``io.systemd.notify`` whose QEMU chardev connects to a unix
  socket we listen on *before* QEMU starts (a guest writing to an unconnected port blocks).

The host side never trusts the guest: lines longer than :data:`MAX_LINE` are dropped, invalid
UTF-8 is dropped, and after :data:`MAX_GARBAGE` bytes of rejected input the channel stops
parsing (it keeps draining, so the guest never blocks on us for that).  A guest sending more than
:data:`LINES_PER_SECOND` lines waits until they are due (:class:`LineBudget`), at most
:data:`MAX_CONNECTIONS` vsock notifications are read at once, each within
:data:`CONNECTION_DEADLINE`, and what the guest does wrong is logged once per channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.log import get_logger
from vmspawnd.qemu import qemu_escape
from vmspawnd.systemd.fdstore import FdStore

MAX_LINE = 4096
MAX_GARBAGE = 1 << 20
READ_CHUNK = 16384  # bytes read from a stream at a time, then others get their turn
LINES_PER_SECOND = 10_000  # from one guest, empty ones too; past that its writes wait (as on a full pipe)
MAX_CONNECTIONS = 16  # vsock: notifications being read at once; more are hung up on
CONNECTION_DEADLINE = 10.0  # s for a vsock notification to arrive whole
NOTIFY_PORT_NAME = "io.systemd.notify"

log = get_logger()


class NotifyParser:
    """Incremental, bounded parser of ``KEY=VALUE`` lines."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long line: drop bytes up to the next newline
        self.garbage = 0
        self.lines = 0  # line ends seen (empty lines too)

    @property
    def exhausted(self) -> bool:
        """True once the guest sent more rejected input than we are willing to look at."""
        return self.garbage > MAX_GARBAGE

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        """Feed bytes; return the complete, valid messages they finish (in one pass over them: a guest
        sending only line ends costs its length, not its length squared)."""
        messages: list[tuple[str, str]] = []
        if self.exhausted:
            return messages
        *complete, rest = _LINE_END.split(data)
        self.lines += len(complete)
        for piece in complete:
            if self._skipping:  # the end of an over-long line
                self.garbage += len(piece)
                self._skipping = False
                continue
            if len(self._buffer) + len(piece) > MAX_LINE:
                self.garbage += len(self._buffer) + len(piece)
                self._buffer.clear()
                continue
            line = bytes(self._buffer) + piece if self._buffer else piece
            self._buffer.clear()
            message = self._parse_line(line)
            if message:
                messages.append(message)
            elif line:
                self.garbage += len(line)
        if self._skipping:
            self.garbage += len(rest)
        elif len(self._buffer) + len(rest) > MAX_LINE:
            self.garbage += len(self._buffer) + len(rest)
            self._buffer.clear()
            self._skipping = True
        else:
            self._buffer += rest
        return messages

    def feed_message(self, data: bytes) -> list[tuple[str, str]]:
        """Parse one complete datagram-like message (vsock: one connection = one message)."""
        if len(data) > MAX_LINE:
            return []
        return [m for m in (self._parse_line(line) for line in data.replace(b"\r", b"\n").split(b"\n")) if m]

    @staticmethod
    def _parse_line(line: bytes) -> tuple[str, str] | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return None
        key, sep, value = text.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum() or not key.isupper() or "\0" in value:
            return None
        return key, value


_LINE_END = re.compile(rb"\r|\n")


MessageHandler = Callable[[list[tuple[str, str]]], None]  # one notification: its (key, value)s


@contextlib.contextmanager
def _quiet_when_cancelled() -> Iterator[None]:
    """A connection's task, cancelled (the event loop ends while a guest still writes), ends quietly:
    asyncio 3.11's stream server logs a cancelled handler task as an error with its traceback."""
    try:
        yield
    except asyncio.CancelledError:
        pass


class LineBudget:
    """At most ``per_second`` lines a second from one guest (each read counts as one more, and each KiB
    read as one more: a flood without line ends is bounded too): a guest that sends more waits until
    they are due (its writes block, as on a full pipe), and every batch gives the event loop's other
    work its turn, so a flood costs the daemon little and holds up no one else."""

    def __init__(self, per_second: int = LINES_PER_SECOND, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._start, self._used = clock(), 0
        self._lifted = asyncio.Event()  # set once the guest is gone: what it wrote is read at once

    def lift(self) -> None:
        """No more waiting (QEMU exited: what is left is finite, and the run waits for it)."""
        self._lifted.set()

    async def spend(self, lines: int) -> None:
        now = self._clock()
        if now - self._start >= 1.0 and self._used <= self.per_second:
            self._start, self._used = now, 0
        self._used += lines
        wait = self._used / self.per_second - (now - self._start)
        if self._used > self.per_second and wait > 0 and not self._lifted.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lifted.wait(), wait)
            self._start, self._used = self._clock(), 0
        else:
            await asyncio.sleep(0)


def _unix_listener(path: Path, identity: Identity, backlog: int) -> socket.socket:
    """A listening unix socket at ``path`` (replacing a stale one), made as ``identity``, 0600.  It is
    served with ``asyncio.start_server``, not ``start_unix_server``, which from Python 3.13 on removes
    the socket's path when the server closes: a daemon that detaches leaves it to the next one (and
    to QEMU, which reconnects to it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with acting_as(identity):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock.bind(str(path))
            path.chmod(0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _vsock_listener(port: int | None) -> socket.socket:
    """A listening AF_VSOCK socket on ``port`` (or one the kernel picks), for every CID."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY if port is None else port))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


class NotifyChannel:
    """Listens for the guest's notifications and hands each one's ``(key, value)`` pairs to a handler (on a
    stream, what one read brought).

    With a daemon's ``store`` (systemd/fdstore.py) the listener is kept there under ``stored_as``:
    a restarted daemon's channel listens on that same socket, and what the guest sent meanwhile
    waits in it."""

    def __init__(self, handler: MessageHandler, store: FdStore | None = None, stored_as: str = "") -> None:
        self._handler = handler
        self._store, self._stored_as = store, stored_as
        self._server: asyncio.AbstractServer | None = None
        self._serving: asyncio.Future[None] | None = None  # the server's start (see _serve)
        self.qemu_args: list[str] = []
        self.credential: tuple[str, str] | None = None  # (id, value) for vsock
        self.port: int | None = None
        self._peer_cid: int | None = None
        self._open = 0  # connections being read
        self._idle = asyncio.Event()  # set while none is
        self._idle.set()
        self._budget = LineBudget()
        self._warned: set[str] = set()
        self._qemu_connected: asyncio.Event | None = None  # a virtio-serial channel's: set while QEMU is on it

    async def drained(self, timeout: float) -> None:
        """Return once every open connection has been read to its end (QEMU gone: what the guest
        wrote last is in the socket, then EOF), or after ``timeout`` seconds."""
        self._budget.lift()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        self._open += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._open -= 1
            if not self._open:
                self._idle.set()

    async def qemu_connected(self, timeout: float) -> None:
        """Return once QEMU's chardev is connected to a virtio-serial channel (it reconnects within a
        second to a restarted daemon; what the guest writes before that is lost), or after ``timeout``
        seconds; at once for a vsock channel (the guest connects when it writes)."""
        if self._qemu_connected is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._qemu_connected.wait(), timeout)

    async def listen_virtio_serial(self, path: Path, qemu_version: tuple[int, int] = (0, 0),
                                   identity: Identity = ROOT) -> None:
        """Listen on a unix socket that QEMU's chardev (running as ``identity``) will connect to (and
        reconnect to: QEMU 9.2 renamed the option ``reconnect=`` seconds to ``reconnect-ms=``, and 10.x
        dropped the old one)."""
        self._qemu_connected = asyncio.Event()
        sock = self._listener(str(path), lambda: _unix_listener(path, identity, backlog=4))
        await self._serve(sock, self._serve_stream, limit=MAX_LINE * 4)
        reconnect = "reconnect-ms=1000" if qemu_version >= (9, 2) else "reconnect=1"
        self.qemu_args = [
            "-chardev", f"socket,id=notify,path={qemu_escape(str(path))},{reconnect}",
            "-device", f"virtserialport,chardev=notify,name={NOTIFY_PORT_NAME}",
        ]

    async def listen_vsock(self, port: int | None = None, peer_cid: int | None = None) -> None:
        """Listen on AF_VSOCK (the given port, or one the kernel picks) for per-message connections;
        only connections from ``peer_cid`` (our guest) are read, other guests cannot speak for it."""
        self._peer_cid = peer_cid
        sock = self._listener(port, lambda: _vsock_listener(port))
        self.port = sock.getsockname()[1]
        await self._serve(sock, self._serve_vsock)
        self.credential = ("vmm.notify_socket", f"vsock-stream:2:{self.port}")

    async def listen_hybrid(self, path: Path, port: int, identity: Identity = ROOT) -> None:
        """vhost-device-vsock: the guest's connections to host port ``port`` arrive on the Unix socket
        ``path`` (made as ``identity`` in the VM's private runtime dir: only its device reaches it),
        one connection per message as over AF_VSOCK."""
        sock = self._listener(str(path), lambda: _unix_listener(path, identity, backlog=16))
        await self._serve(sock, self._serve_vsock)
        self.port = port
        self.credential = ("vmm.notify_socket", f"vsock-stream:2:{port}")

    async def _serve(self, sock: socket.socket, serve: Callable[..., Awaitable[None]], **options: Any) -> None:
        """Serve ``sock`` from the event loop's next turn on, not on the way to QEMU's exec (≈ 0.1 ms:
        connections wait in its backlog meanwhile).  Nothing here waits, so a start undone meanwhile
        cannot leave a server that :meth:`close` does not know of."""
        self._server = await asyncio.start_server(serve, sock=sock, start_serving=False, **options)
        self._serving = asyncio.ensure_future(self._server.start_serving())

    def _listener(self, address: str | int | None, make: Callable[[], socket.socket]) -> socket.socket:
        """The listener an earlier daemon stored for this channel, if it listens on ``address`` (a unix
        socket's path, a vsock port), else a new one from ``make`` (stored in turn)."""
        if self._store is None:
            return make()
        sock = self._store.take(self._stored_as)
        if sock is not None:
            bound = sock.getsockname()
            if address is None or (bound[1] if isinstance(bound, tuple) else bound) == address:
                log.info("listening for the guest on the socket an earlier daemon left in the store")
                return sock
            sock.close()
        sock = make()
        self._store.keep(self._stored_as, sock.fileno())
        return sock

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._qemu_connected is not None
        self._qemu_connected.set()
        try:
            with self._reading(), _quiet_when_cancelled():
                await self._read_stream(reader, writer)
        finally:
            if not self._open:
                self._qemu_connected.clear()

    async def _read_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = NotifyParser()
        try:
            while data := await reader.read(READ_CHUNK):
                lines = parser.lines
                if messages := parser.feed(data):
                    self._dispatch(messages)
                if parser.exhausted:
                    self._warn_once("garbage", "guest notify channel sends garbage; ignoring it from now on")
                await self._budget.spend(parser.lines - lines + 1 + len(data) // 1024)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve_vsock(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            self._warn_once("connections", f"the guest opens more than {MAX_CONNECTIONS} notify connections at "
                            "once; hanging up on the rest")
            writer.close()
            return
        with self._reading(), _quiet_when_cancelled():
            await self._read_vsock(reader, writer)

    async def _read_vsock(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._peer_cid is not None and (not isinstance(peer, tuple) or peer[0] != self._peer_cid):
            self._warn_once("peer", "ignoring notify connections from another vsock peer", peer=str(peer))
            writer.close()
            return
        try:
            async with asyncio.timeout(CONNECTION_DEADLINE):
                data = await reader.read(MAX_LINE + 1)
                rest = data
                while rest and len(data) <= MAX_LINE:
                    rest = await reader.read(MAX_LINE + 1 - len(data))
                    data += rest
            if len(data) > MAX_LINE:
                self._warn_once("long", "guest notification too long, dropped", size=len(data))
                return
            messages = NotifyParser().feed_message(data)
            if messages:
                self._dispatch(messages)
            await self._budget.spend(len(messages) + 1)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _warn_once(self, key: str, message: str, **data: object) -> None:
        """A warning about what the guest does, once per channel (a guest must not flood the log)."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, **data)

    def _dispatch(self, message: list[tuple[str, str]]) -> None:
        try:
            self._handler(message)
        except Exception:  # a handler bug must not kill the channel
            log.exception("notify handler failed", keys=",".join(key for key, _ in message))

    async def __aenter__(self) -> NotifyChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._serving is not None:
            self._serving.cancel()  # (not begun yet: it would serve a closed server)
            self._serving = None
        if self._server is not None:
            self._server.close()
            self._server = None
