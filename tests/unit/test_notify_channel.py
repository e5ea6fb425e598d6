# SPDX-License-Identifier: LGPL-2.1-or-later
"""The notify channel against a hostile guest: floods of lines or connections cost the daemon little,
never stall its event loop, and never hold resources without bound.  Real sockets, as QEMU's chardev and
vhost-device-vsock connect to them."""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest

from vmspawnd.guest import channel as channel_module
from vmspawnd.guest.channel import LINES_PER_SECOND, MAX_CONNECTIONS, LineBudget, NotifyChannel


async def _max_stall_while(work: asyncio.Future, period: float = 0.01) -> float:
    """The longest the event loop went without running a heartbeat while ``work`` ran."""
    loop = asyncio.get_running_loop()
    worst, last = 0.0, loop.time()
    while not work.done():
        await asyncio.sleep(period)
        now = loop.time()
        worst, last = max(worst, now - last - period), now
    await work
    return worst


async def test_a_guest_sending_only_line_ends_neither_stalls_the_daemon_nor_is_parsed_unbounded(tmp_path):
    """(A chunk of 64 KiB of newlines stalled the event loop ≈ 1 s: the parser was quadratic.)"""
    received: list[tuple[str, str]] = []
    notify = NotifyChannel(lambda message: received.extend(message))
    path = tmp_path / "notify.sock"
    await notify.listen_virtio_serial(path)
    reader, writer = await asyncio.open_unix_connection(str(path))

    async def flood() -> None:
        for _ in range(16):
            writer.write(b"\n" * 65536)
            await asyncio.sleep(0)  # (our writes go as far as the channel reads)
        writer.write(b"READY=1\n")
        await asyncio.sleep(0.2)

    try:
        stall = await _max_stall_while(asyncio.ensure_future(flood()))
        assert stall < 0.25, f"the event loop stalled {stall:.3f} s"
    finally:
        writer.close()
        await notify.close()


async def test_the_line_budget_makes_a_flooding_guest_wait_until_it_is_gone(monkeypatch):
    waits: list[float] = []
    real_wait_for = asyncio.wait_for

    async def wait_for(awaitable, timeout):  # (records how long the budget would wait, waits not at all)
        waits.append(timeout)
        return await real_wait_for(awaitable, 0)

    monkeypatch.setattr(channel_module.asyncio, "wait_for", wait_for)
    now = [50.0]
    budget = LineBudget(clock=lambda: now[0])
    await budget.spend(10)
    assert waits == []  # within the budget: only the others' turn
    await budget.spend(5 * LINES_PER_SECOND)
    assert waits == [pytest.approx((5 * LINES_PER_SECOND + 10) / LINES_PER_SECOND)]
    budget.lift()  # QEMU exited: what the guest wrote before is read at once
    await budget.spend(50 * LINES_PER_SECOND)
    assert len(waits) == 1


async def test_notify_connections_beyond_the_cap_are_hung_up_on_and_none_is_held_past_its_deadline(
        tmp_path, monkeypatch):
    """vhost-device-vsock's connections (one per notification) to a guest that opens many and sends
    slowly: more than MAX_CONNECTIONS at once are closed at once, and each has a deadline in all,
    not per read (a byte every few seconds kept one for hours)."""
    monkeypatch.setattr(channel_module, "CONNECTION_DEADLINE", 1.0)
    received: list[tuple[str, str]] = []
    notify = NotifyChannel(lambda message: received.extend(message))
    path = tmp_path / "vsock_9"
    await notify.listen_hybrid(path, 9)
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, str(path))
            socks.append(s)
        await asyncio.sleep(0.3)
        hung_up = [s for s in socks if await _closed_by_peer(s)]
        assert len(hung_up) == 8

        async def trickle(s: socket.socket) -> None:  # "READY=1\n" a byte every 0.3 s: 2.4 s in all
            for byte in b"READY=1\n":
                await asyncio.sleep(0.3)
                try:
                    await loop.sock_sendall(s, bytes([byte]))
                except OSError:
                    return

        await asyncio.gather(*(trickle(s) for s in socks if s not in hung_up))
        assert received == []  # none arrived whole within its deadline
        assert all([await _closed_by_peer(s) for s in socks])
    finally:
        for s in socks:
            s.close()
        await notify.close()


async def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_what_the_guest_sends_before_the_channel_is_served_arrives(tmp_path):
    """The listener is served from the event loop's next turn (not on the way to QEMU's exec): QEMU's
    chardev may connect, and the guest write, before that; nothing of it is lost."""
    received: list[tuple[str, str]] = []
    notify = NotifyChannel(lambda message: received.extend(message))
    path = tmp_path / "notify.sock"
    await notify.listen_virtio_serial(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early:  # (no turn of the loop since)
        early.connect(str(path))
        early.sendall(b"READY=1\nSTATUS=early\n")
        try:
            for _ in range(100):
                if len(received) == 2:
                    break
                await asyncio.sleep(0.01)
            assert received == [("READY", "1"), ("STATUS", "early")]
        finally:
            await notify.close()


async def test_a_channel_closed_before_it_was_served_leaves_no_listener(tmp_path):
    """(A start undone right after the channel listened: the server's start, not begun, must not serve a
    closed server, nor a listener outlive the run.)"""
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    notify = NotifyChannel(lambda message: None)
    path = tmp_path / "notify.sock"
    await notify.listen_virtio_serial(path)
    await notify.close()  # (no turn of the loop between)
    await asyncio.sleep(0.05)  # (the cancelled start has its turn)
    gc.collect()  # (a task that failed reports it when it is collected)
    assert errors == []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late, pytest.raises(ConnectionRefusedError):
        late.connect(str(path))
