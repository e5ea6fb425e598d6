# SPDX-License-Identifier: LGPL-2.1-or-later
"""The varlink server, hardened: it never stops accepting, never blocks, never hoards.

asyncvarlink does the protocol work; this module subclasses it where a daemon facing hostile
or heavy load needs more (what upstream could change is noted on each class):

- :class:`GuardedServer` keeps accepting whatever ``accept()`` says: out of file descriptors
  (EMFILE, ENFILE, ENOBUFS, ENOMEM) it pauses accepting briefly, a connection aborted before
  we took it is skipped, and connections over the cap are accepted and closed at once.
  (asyncvarlink 0.3.3 closes the listener on any accept error but EAGAIN.)
- :class:`GuardedTransport` reads one chunk of at most :data:`READ_BUDGET` bytes per event-loop turn,
  so one client streaming data never blocks the others, and stops reading once closing.  It writes a
  reply at once when nothing is queued, as asyncio's own transports do; streamed replies go out
  :data:`WRITE_BURST` at a time in one ``sendmsg``, and their sender then waits one event-loop
  turn (others' turn).
  (asyncvarlink drains the socket in one callback; it sends every reply through a writer it
  registers and removes again, an event-loop turn each, and a streaming method waits for each:
  a List of 1,000 machines spent half its time there.)
- :class:`GuardedProtocol` enforces the message limit *while* a message arrives (one growing
  buffer, no re-copying), caps the bytes buffered across all connections, answers a message
  that is not a JSON object with a protocol error and closes that connection; it records the
  calls in flight, so a stopping daemon lets their last replies go out first.  A reply parameter
  that is :class:`EncodedJson` goes out as the bytes it was encoded to once, not encoded again, and
  a synchronous method whose reply type is an :class:`EncodedReplyType` (List, Describe) has its
  replies written straight to bytes, without asyncvarlink's reply objects.
  Each message is decoded once.  A client that sends calls faster than they are begun (more than
  :data:`MAX_QUEUED_CALLS`), or while its answers wait for it to read them, is not read until they
  are.  A client that shuts down its writing side still gets the answers to all the calls it sent.
  (asyncvarlink checks the limit only after a message is complete, re-copies its buffer for
  every chunk, lets decoding errors other than JSONDecodeError escape, reads on from a client
  that does not read, and hangs up on a half-closed client with the calls it has received but
  not begun unanswered.)

asyncvarlink also does not await ``aclose()`` of a streaming method's generator when sending
fails (the client hung up); the generator is still finalized by asyncio's async-generator
hooks, so the "never awaited" warning that this causes is silenced here.

The private asyncvarlink methods overridden here are listed in :data:`OVERRIDDEN`; an asyncvarlink
that renamed or reshaped one would leave its guard silently unused, so :func:`serve` says so
(:func:`hooks_astray`), and pyproject.toml keeps asyncvarlink below 0.4.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import inspect
import json
import os
import select
import socket
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncvarlink import (
    GenericVarlinkErrorReply,
    VarlinkErrorReply,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodReply,
    VarlinkTransport,
)
from asyncvarlink.conversion import ConversionError, DataclassVarlinkType, ObjectVarlinkType
from asyncvarlink.util import VarlinkUnixServer

from vmspawnd.futures import resolve, resolved
from vmspawnd.log import get_logger
from vmspawnd.proc import process_start_time

log = get_logger()

MAX_MESSAGE = 1 << 20  # one varlink message, without its NUL
MAX_BUFFERED = 64 << 20  # partial messages across all connections
READ_BUDGET = 64 << 10  # bytes read from one connection per event-loop turn
WRITE_BURST = 16  # streamed replies written with one sendmsg, before their sender waits a turn (others' turn)
DEFAULT_MAX_CONNECTIONS = 4096
ACCEPT_PAUSE = 0.1  # seconds without accepting when we are out of file descriptors
ACCEPT_BATCH = 64  # connections accepted per event-loop turn
MAX_QUEUED_CALLS = 64  # calls received on one connection and not begun yet, before its reading pauses
HANGUP_POLL = 0.5  # seconds between checks that a streaming call's client is still there
RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # (Linux ≥ 6.5; Python 3.11 does not name it)
PROTOCOL_VIOLATION = "invalid.asyncvarlink.ProtocolViolation"

warnings.filterwarnings("ignore", message="coroutine method 'aclose' of", category=RuntimeWarning)

_ENCODER = json.JSONEncoder(separators=(",", ":"))  # as asyncvarlink encodes


class EncodedJson:
    """A reply parameter's JSON value, encoded once: a reply sent many times unchanged (a machine's,
    in every List) is then not encoded again for each.  Only :class:`GuardedProtocol` sends it."""

    __slots__ = ("data",)

    def __init__(self, value: Any) -> None:
        self.data = _ENCODER.encode(value).encode()


class PreconvertedDataclass(DataclassVarlinkType):
    """A dataclass type whose instances may carry their JSON form already (``varlink_json``, an
    :class:`EncodedJson`): a List of a thousand machines then converts and encodes only those that
    changed since their last reply."""

    def tojson(self, obj: Any, oobstate: Any = None) -> Any:
        encoded = getattr(obj, "varlink_json", None)
        return encoded if encoded is not None else super().tojson(obj, oobstate)


class UncheckedObject(DataclassVarlinkType):
    """A dataclass type whose JSON objects reach the method as they came, as dicts, for a method that
    checks them itself (Create's config: config_from_json checks each setting and names the wrong one;
    asyncvarlink's conversion of its ≈ 50 optional fields took ≈ 100 µs and named none).  Anything
    else than an object is refused as the base type refuses it; the described type is the same."""

    def fromjson(self, obj: Any, oobstate: Any = None) -> Any:
        if not isinstance(obj, dict):
            raise ConversionError.expected("map", obj)
        return obj


_HEADS = {True: b'{"continues":true,"parameters":{', False: b'{"parameters":{'}


class EncodedReplyType(ObjectVarlinkType):
    """A method's reply type whose replies :class:`GuardedProtocol` writes straight to bytes (a
    synchronous method's, with no file descriptors and no extensions): asyncvarlink's reply objects
    and per-reply bookkeeping, most of a List's time, are skipped.  The interface it describes is
    the same."""

    def __init__(self, typemap: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(typemap, *args, **kwargs)
        self._heads = {(key, continues): _HEADS[continues] + _ENCODER.encode(key).encode() + b":"
                       for key in typemap for continues in (True, False)}

    def message(self, parameters: dict[str, Any], continues: bool) -> bytes:
        """The reply with ``parameters`` (converted by their types), encoded, with its NUL."""
        if len(parameters) == 1:  # one parameter that carries its JSON (a List's reply for each machine)
            (key, value), = parameters.items()
            encoded = getattr(value, "varlink_json", None)
            if encoded is not None and (head := self._heads.get((key, continues))) is not None:
                return b"".join((head, encoded.data, b"}}\0"))
        converted = self.tojson(parameters)
        return encode_message({"continues": True, "parameters": converted} if continues
                              else {"parameters": converted})


def encode_message(obj: dict[str, Any]) -> bytes:
    """A varlink message with its NUL (as asyncvarlink encodes it), :class:`EncodedJson` parameters put
    in as they are."""
    params = obj.get("parameters")
    if not isinstance(params, dict) or not any(isinstance(v, EncodedJson) for v in params.values()):
        return _ENCODER.encode(obj).encode() + b"\0"
    if len(params) == 1 and (len(obj) == 1 or (len(obj) == 2 and obj.get("continues") is True)):
        (key, value), = params.items()  # a method's one reply parameter (List's, Describe's): the common case
        return b"".join((_HEADS[len(obj) == 2], _ENCODER.encode(key).encode(), b":", value.data, b"}}\0"))
    members = [_ENCODER.encode(k).encode() + b":" + v.data for k, v in params.items() if isinstance(v, EncodedJson)]
    plain = {k: v for k, v in params.items() if not isinstance(v, EncodedJson)}
    if plain:
        members.append(_ENCODER.encode(plain).encode()[1:-1])
    head = {k: v for k, v in obj.items() if k != "parameters"}
    return (_ENCODER.encode(head).encode()[:-1] + (b"," if head else b"") + b'"parameters":{'
            + b",".join(members) + b"}}\0")


def _broken_pipe() -> asyncio.Future[None]:
    """What sending on a connection that is gone returns."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.set_exception(BrokenPipeError())
    return fut


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # a broken connection is the transport's to handle, not a stray error


@dataclass
class ServerLimits:
    """The limits of one server, and what is in use of them."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS  # all clients together; root may use them all
    max_message: int = MAX_MESSAGE
    max_buffered: int = MAX_BUFFERED
    buffered: int = 0  # bytes of partial messages held now, all connections together
    calls: set[asyncio.Future[None]] = field(default_factory=set)  # calls in flight

    @property
    def max_per_user(self) -> int:
        """Connections one user but root may hold: a quarter of the cap (one user cannot lock others out)."""
        return max(1, self.max_connections // 4)

    @property
    def max_for_users(self) -> int:
        """Connections all users but root may hold together: the cap but a sixteenth (at least one), kept
        for root."""
        return self.max_connections - min(max(1, self.max_connections // 16), self.max_connections - 1)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the calls in flight, e.g. subscriptions' last replies."""
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=timeout)


#: The connection whose call is being served (set for each call's task).
current_connection: contextvars.ContextVar[GuardedProtocol] = contextvars.ContextVar("current_connection")


class GuardedProtocol(VarlinkInterfaceServerProtocol):
    """One client connection (see the module docstring)."""

    def __init__(self, registry: VarlinkInterfaceRegistry, limits: ServerLimits,
                 on_call_error: Callable[[BaseException], VarlinkErrorReply | None]) -> None:
        super().__init__(registry)
        self._limits = limits
        self._on_call_error = on_call_error
        self._pending = bytearray()  # the start of a message whose NUL has not arrived yet
        self._dropped = False
        self._sock: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sock = transport.get_extra_info("socket")

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_pending()
        super().connection_lost(exc)

    # ------------------------------------------------------------ reading
    def message_received(self, data: bytes, fds: Any) -> None:
        if self._dropped:
            return
        end = data.rfind(b"\0")
        if end < 0:
            self._hold(data)
            return
        complete = bytes(self._pending) + data[:end + 1] if self._pending else data[:end + 1]
        self._release_pending()
        if len(complete) > self._limits.max_message + 1 and any(
                len(part) > self._limits.max_message for part in complete.split(b"\0")):
            self._reject(f"message larger than {self._limits.max_message} bytes", reply=False)
            return
        try:  # each message is decoded once, there: what it cannot decode comes to error_received
            super().message_received(complete, fds)
        except (ValueError, RecursionError) as e:  # what it lets escape (incl. over-long integers, bad UTF-8)
            self._reject(f"not valid JSON: {str(e)[:100]}", reply=True)
            return
        if not self._dropped:
            self._hold(data[end + 1:])
            self._throttle()

    def _throttle(self) -> None:
        """Stop reading from a client that sends calls faster than they are begun, or while its answers
        wait for it to read them: asyncvarlink reads again once all its calls are begun, and
        :meth:`GuardedTransport.resume_reading` once its answers are written too.  (asyncvarlink reads on:
        a client that pipelined calls without reading the answers grew the daemon's memory without
        bound, the calls and their answers both.)"""
        transport = self._transport
        if transport is not None and (len(getattr(self, "_consumer_queue", ())) >= MAX_QUEUED_CALLS
                                      or (isinstance(transport, GuardedTransport) and transport.answers_waiting())):
            transport.pause_reading()

    def _hold(self, data: bytes) -> None:
        """Keep the start of a message: within the per-message and the total limit, or drop the client."""
        if not data:
            return
        if len(self._pending) + len(data) > self._limits.max_message:
            self._reject(f"message larger than {self._limits.max_message} bytes", reply=False)
        elif self._limits.buffered + len(data) > self._limits.max_buffered:
            self._reject("too much data buffered for incomplete messages", reply=False)
        else:
            self._pending += data
            self._limits.buffered += len(data)

    def _release_pending(self) -> None:
        self._limits.buffered -= len(self._pending)
        self._pending = bytearray()

    def _reject(self, why: str, *, reply: bool) -> None:
        """A protocol violation: answer it if the client can read an answer, then hang up."""
        log.warning("varlink protocol violation; closing the connection", error=why)
        self._dropped = True
        self._release_pending()
        if reply:
            self.send_error(GenericVarlinkErrorReply(PROTOCOL_VIOLATION, {"reason": why}))
        self.close()

    def error_received(self, err: Exception, data: bytes, fds: Any) -> None:
        """A message that is not valid JSON, or not an object."""
        self._reject(f"not valid JSON: {str(err)[:100]}" if isinstance(err, ValueError) else "not a JSON object",
                     reply=True)

    def eof_received(self) -> None:
        """The client sent all it will (it shut down its writing side): the calls it sent before are
        still answered.  (asyncvarlink hangs up once the calls begun are done, and those received
        but not begun yet were never answered.)"""
        queue = getattr(self, "_consumer_queue", None)
        if queue and not self._dropped:  # after them, in their order: their processing is under way
            queue.append((self._eof_after_calls, None))
        else:
            super().eof_received()

    def _eof_after_calls(self) -> None:
        super().eof_received()

    def request_received(self, obj: Any, fds: Any) -> asyncio.Future[None] | None:
        if self._dropped:  # what followed a protocol violation is not a call
            return None
        return super().request_received(obj, fds)

    # ------------------------------------------------------------ writing
    def send_message(self, obj: Any, fds: list[int] | None = None, autoclose: bool = True) -> asyncio.Future[None]:
        """As asyncvarlink sends a message, but :class:`EncodedJson` parameters go in as they are, and a
        streamed reply (``continues``) goes to :meth:`GuardedTransport.send_streamed`."""
        transport = self._transport
        if transport is None:
            return _broken_pipe()
        data = encode_message(obj)
        if obj.get("continues") and not fds and isinstance(transport, GuardedTransport):
            fut = transport.send_streamed(data)
        else:
            fut = transport.send_message(data, fds)
        if fds and autoclose:
            def close_fds(_: asyncio.Future[None]) -> None:
                for fd in fds:
                    os.close(fd)
            fut.add_done_callback(close_fds)
        return fut

    # ------------------------------------------------------------ calls
    def _call_sync_method_single(self, method: Any, signature: Any, pyparams: dict[str, Any],
                                 oneway: bool) -> asyncio.Future[None] | None:
        if not isinstance(signature.return_type, EncodedReplyType):
            return super()._call_sync_method_single(method, signature, pyparams, oneway)
        result = method(**pyparams)
        return None if oneway else self._send_result(signature.return_type, result)

    async def _call_sync_method_more(self, method: Any, signature: Any, pyparams: dict[str, Any]) -> None:
        if not isinstance(signature.return_type, EncodedReplyType):
            return await super()._call_sync_method_more(method, signature, pyparams)
        try:
            generator = method(**pyparams)
            for result in generator:
                try:
                    await self._send_result(signature.return_type, result)
                except OSError:
                    generator.close()
                    return
        except VarlinkErrorReply as err:
            self.send_error(err)

    def _send_result(self, reply_type: EncodedReplyType, result: Any) -> asyncio.Future[None]:
        """Send a method's ``result`` (an AnnotatedResult) as asyncvarlink's :meth:`send_reply` does, but
        encoded by ``reply_type`` straight to bytes."""
        if result.extensions:
            return self.send_reply(VarlinkMethodReply(reply_type.tojson(result.parameters),
                                                      continues=result.continues, extensions=result.extensions))
        data = reply_type.message(result.parameters, result.continues)
        transport = self._transport
        if transport is None:
            fut = _broken_pipe()
        elif result.continues and isinstance(transport, GuardedTransport):
            fut = transport.send_streamed(data)
        else:
            fut = transport.send_message(data)
        if fut.done():
            self._on_message_sent(fut)  # (written already, or failed: nothing in flight)
        else:
            fut.add_done_callback(self._on_message_sent)
            self._add_transfer(fut)
        return fut

    def call_received(self, call: Any, fds: Any) -> asyncio.Future[None] | None:
        token = current_connection.set(self)  # copied into the call's task
        try:
            fut = super().call_received(call, fds)
        finally:
            current_connection.reset(token)
        if fut is not None:
            self._limits.calls.add(fut)
            fut.add_done_callback(self._limits.calls.discard)
        return fut

    def handle_call_exception(self, exc: BaseException, oneway: bool) -> None:
        reply = self._on_call_error(exc)
        if reply is not None:
            raise reply
        log.error("varlink call failed", error=repr(exc)[:500])
        if not oneway:
            self.send_error(GenericVarlinkErrorReply("io.vmspawnd.Manager.InternalError", {"reason": str(exc)[:500]}))

    def peer(self) -> Peer | None:
        """The client as the kernel saw it when it connected (see :class:`Peer`)."""
        if self._transport is not None and (known := self._transport.get_extra_info("peer")) is not None:
            return known
        if self._sock is None or (creds := peer_credentials(self._sock)) is None:
            return None
        return Peer(*creds, start_time=None)

    def hung_up(self) -> bool:
        """True once the client closed its end (checked without reading what it may have sent)."""
        if self._transport is None or self._transport.is_closing() or self._sock is None:
            return True
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    async def wait_hangup(self) -> None:
        """Return once the client hung up (a streaming call's reading is paused, so poll)."""
        while not self.hung_up():
            await asyncio.sleep(HANGUP_POLL)


class GuardedTransport(VarlinkTransport):
    """Reads one chunk of at most :data:`READ_BUDGET` bytes per event-loop turn and nothing once closing.

    It does not peek at message boundaries first (asyncvarlink's way, so that file descriptors go with
    the message they came with: a second ``recv`` and a third that finds the socket empty, for each
    message): no method served here uses a client's file descriptors (io.systemd.MachineInstance's
    AddStorage and ReplaceStorage, which would, are refused), so those a client sends anyway go with
    its chunk and are closed once its calls are done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, boundary_predictor=None, **kwargs)
        self._held: list[bytes] = []  # streamed replies of this event-loop turn, not written yet
        self._written = resolved(self._loop)  # what a write that is done returns (one, as it never changes)
        self._resume_when_written = False  # reading resumes once the answers waiting are written

    def _handle_read_socket(self) -> None:
        if not self.is_closing():  # (closing: the reader goes with the connection, on the next turn)
            self._sock_receive_fds(READ_BUDGET)

    def answers_waiting(self) -> bool:
        """Whether answers wait for the client to read them (the socket took no more)."""
        return bool(self._sendqueue)

    def resume_reading(self) -> None:
        """Read again, or, while answers wait for the client to read them, once they are written."""
        if self._sendqueue and not self._closing:
            if not self._resume_when_written:
                self._resume_when_written = True
                self._sendqueue[-1][2].add_done_callback(self._written_out)
            return
        super().resume_reading()

    def _written_out(self, fut: asyncio.Future[None]) -> None:
        _retrieve(fut)  # (a client gone: its writer is told; the connection is closing)
        self._resume_when_written = False
        self.resume_reading()

    def send_streamed(self, data: bytes) -> asyncio.Future[None]:
        """A streamed reply: held, to go out with the ones that follow it, :data:`WRITE_BURST` of them in
        one ``sendmsg`` (their sender then waits one event-loop turn: others' turn), fewer at the end
        of this turn."""
        if self._sendqueue or self._closing or self._sendfd is None:
            return self.send_message(data)
        self._held.append(data)
        if len(self._held) == 1:
            self._loop.call_soon(self._write_held)
        if len(self._held) < WRITE_BURST:
            return self._written
        queued = self._write_held()
        if queued is not None:
            return queued  # the sender waits until the socket took them
        turn = self._loop.create_future()
        self._loop.call_soon(resolve, turn)
        return turn

    def send_message(self, data: bytes, fds: list[int] | None = None) -> asyncio.Future[None]:
        """Write at once, after what is held, when nothing is queued; else queue it (as asyncvarlink
        queues everything)."""
        if (self._write_held() is not None or self._sendqueue or self._closing or self._sendfd is None
                or (fds and self._do_write is self._do_write_fd)):
            return super().send_message(data, fds)
        try:
            sent = self._do_write([data], list(fds or []))
        except OSError:
            return super().send_message(data, fds)  # the queued path retries it, or fails it as usual
        if sent < len(data):
            return super().send_message(data[sent:], [])  # the descriptors went with the first byte
        return self._written

    def _write_held(self) -> asyncio.Future[None] | None:
        """Write the held replies with one ``sendmsg``; what the socket does not take is queued (and
        that future returned).  A transport that is closing or lost its sender drops them."""
        held, self._held = self._held, []
        if not held or self._closing or self._sendfd is None:
            return None
        sent = 0
        if not self._sendqueue:
            try:
                sent = self._do_write(held, [])
            except OSError:
                pass  # EAGAIN: queued, written when the socket takes it; else the queued path fails it
            else:
                if sent == sum(len(d) for d in held):
                    return None
        queued = super().send_message(b"".join(held)[sent:], [])
        queued.add_done_callback(_retrieve)  # (when written from call_soon, nobody awaits it)
        return queued

    def close(self) -> None:
        self._write_held()  # first: a closing transport writes nothing new
        super().close()


@dataclass(frozen=True)
class Peer:
    """The process that connected: its pid, uid and gid (SO_PEERCRED), and its start time, read
    when it connected and only while it still ran (so it is that process's, not that of another
    that took its pid since; None if it was gone or not asked, for root)."""

    pid: int
    uid: int
    gid: int
    start_time: int | None


def peer_of(sock: socket.socket) -> Peer | None:
    """The peer of a just-accepted connection (see :class:`Peer`)."""
    if (creds := peer_credentials(sock)) is None:
        return None
    pid, uid, gid = creds
    return Peer(pid, uid, gid, None if uid == 0 or pid <= 0 else peer_start_time(sock, pid))


def peer_start_time(sock: socket.socket, pid: int) -> int | None:
    """The start time of the process that connected ``sock``, whose pid is ``pid``; None if it has
    ended.  The kernel's pidfd of the peer (SO_PEERPIDFD, Linux ≥ 6.5; older kernels: one opened
    now) still running after the read proves the read was of that process."""
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
    try:
        start = process_start_time(pid)
        ended = select.poll()
        ended.register(pidfd, select.POLLIN)  # a pidfd is readable once its process has ended
        return None if ended.poll(0) else start
    finally:
        os.close(pidfd)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """A unix socket's peer's (pid, uid, gid) as the kernel saw them when it connected (SO_PEERCRED)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


class ClientSocket(socket.socket):
    """An accepted client's socket, whose repr asks the kernel nothing: asyncio formats a new fd's
    repr into a KeyError at its first ``add_reader``, and a socket's asks for both its addresses
    (≈ 70 µs of each request after idling)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<client socket fd={self.fileno()}>"


class GuardedServer(VarlinkUnixServer):
    """A listener that never closes on an accept error and keeps at most ``max_connections``."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], GuardedProtocol],
                 limits: ServerLimits) -> None:
        super().__init__(sock, protocol_factory)
        self.limits = limits
        self._paused = False
        self._warned: set[str] = set()

    async def start_serving(self) -> None:
        await super().start_serving()
        assert self._sock is not None
        self._sock.listen(socket.SOMAXCONN)  # asyncvarlink listens with a backlog of 1

    def _handle_accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._sock is None or self._paused:
                return
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    self._warn_once("resources", "cannot accept a connection now; pausing briefly", error=str(e))
                    self._pause()
                    return
                continue  # ECONNABORTED, EPROTO…: that client is gone, the next one is not
            peer = peer_of(conn)
            uid = peer.uid if peer is not None else -1
            if (limit := self._limit_reached(uid)) is not None:
                self._warn_once(limit, "connection limit reached; closing new connections", limit=limit)
                conn.close()
                continue
            conn = ClientSocket(conn.family, conn.type, conn.proto, fileno=conn.detach())
            conn.setblocking(False)
            self._transports.add(GuardedTransport(self._loop, conn, conn, self._protocol_factory(),
                                                  {"peername": addr, "socket": conn, "uid": uid,
                                                   "peer": peer}))

    def connection_count(self) -> int:
        return sum(1 for t in self._transports if not t.is_closing())

    def _limit_reached(self, uid: int) -> str | None:
        """The limit a new connection of ``uid`` would go over, if any: that of all clients; or, for a
        user but root, that of all users but root (so root always gets in) or of one user (so others do)."""
        total = users = own = 0
        for transport in self._transports:
            if not transport.is_closing():
                peer = transport.get_extra_info("uid")
                total += 1
                users += peer != 0
                own += peer == uid
        limits = self.limits
        if total >= limits.max_connections:
            return f"{limits.max_connections} for all clients"
        if uid != 0 and users >= limits.max_for_users:
            return f"{limits.max_for_users} for all users but root"
        if uid != 0 and own >= limits.max_per_user:
            return f"{limits.max_per_user} for uid {uid}"
        return None

    def _pause(self) -> None:
        assert self._sock is not None
        self._paused = True
        self._loop.remove_reader(self._sock)
        self._loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = False
        if self._sock is not None:
            self._loop.add_reader(self._sock, self._handle_accept)

    def _warn_once(self, key: str, message: str, **data: Any) -> None:
        """Log a load condition once per episode (not once per refused client)."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, **data)
            self._loop.call_later(10, self._warned.discard, key)


#: the private methods of asyncvarlink (0.3.3) that the classes above override
OVERRIDDEN: tuple[tuple[type, tuple[str, ...]], ...] = (
    (GuardedProtocol, ("_call_sync_method_single", "_call_sync_method_more")),
    (GuardedTransport, ("_handle_read_socket",)),
    (GuardedServer, ("_handle_accept",)),
)
_checked_hooks = False


def hooks_astray(overridden: tuple[tuple[type, tuple[str, ...]], ...] = OVERRIDDEN) -> list[str]:
    """The overridden methods (``Class._method``) whose base class, as installed, lacks them or takes
    other parameters: their guards would not run, or would be called wrongly."""
    astray = []
    for ours, names in overridden:
        base = ours.__mro__[1]
        for name in names:
            theirs = getattr(base, name, None)
            if theirs is None or (list(inspect.signature(theirs).parameters)
                                  != list(inspect.signature(getattr(ours, name)).parameters)):
                astray.append(f"{base.__name__}.{name}")
    return astray


async def serve(sock: socket.socket, registry: VarlinkInterfaceRegistry, limits: ServerLimits,
                on_call_error: Callable[[BaseException], VarlinkErrorReply | None]) -> GuardedServer:
    """Serve ``registry`` on the listening socket ``sock`` (the first time, saying if the installed
    asyncvarlink no longer has the methods the guards override)."""
    global _checked_hooks
    if not _checked_hooks:
        _checked_hooks = True
        if astray := hooks_astray():
            log.warning("this asyncvarlink lacks or reshaped methods the server's guards override; "
                        "they do not run (vmspawnd is tested with asyncvarlink 0.3.3)", methods=", ".join(astray))
    sock.setblocking(False)
    server = GuardedServer(sock, lambda: GuardedProtocol(registry, limits, on_call_error), limits)
    await server.start_serving()
    return server
