# SPDX-License-Identifier: LGPL-2.1-or-later
"""Console forwarding: Ctrl-] three times within one second kills the VM, two do nothing; a flooding guest
never holds up the event loop."""

import contextlib
import os

import pytest

from vmspawnd.ptyfwd import EscapeDetector


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_three_presses_within_a_second_fire():
    clock = Clock()
    d = EscapeDetector(clock)
    assert not d.feed(b"\x1d")
    clock.now += 0.3
    assert not d.feed(b"\x1d")
    clock.now += 0.3
    assert d.feed(b"\x1d")


def test_two_presses_then_a_pause_do_not_fire():
    clock = Clock()
    d = EscapeDetector(clock)
    assert not d.feed(b"\x1d\x1d")
    clock.now += 1.5
    assert not d.feed(b"\x1d")
    clock.now += 0.1
    assert not d.feed(b"\x1d")
    clock.now += 0.1
    assert d.feed(b"\x1d")


def test_other_bytes_reset_the_count():
    d = EscapeDetector(Clock())
    assert not d.feed(b"\x1d\x1dx\x1d")
    assert d.feed(b"\x1d\x1d")


@pytest.mark.parametrize("flood", [b"\0" * 4096, b"\x1b[0mab\x1b[48;5;1m\r\n" * 256],
                         ids=["text", "escape sequences"])
async def test_a_guest_flooding_its_console_never_holds_up_the_event_loop(flood: bytes) -> None:
    """(The forwarder read until the console was empty, and the tint went byte by byte: a flooding guest
    kept the Ctrl-] hotkey, the signal handlers and QMP from running for seconds.)"""
    import asyncio
    import subprocess
    import sys

    from vmspawnd.ptyfwd import Pty, PtyForwarder

    pty = Pty()
    null = os.open(os.devnull, os.O_WRONLY)
    forwarder = PtyForwarder(pty.master, read_only=True, on_escape=lambda: None, stdin=null, stdout=null,
                             tint="48;2;0;64;0")
    forwarder.start()
    writer = subprocess.Popen([sys.executable, "-c", "import sys\nwith open(sys.argv[1], 'wb') as f:\n"
                               f"    while True: f.write({flood!r})", pty.slave_path])
    loop = asyncio.get_running_loop()
    try:
        worst, end = 0.0, loop.time() + 2
        while loop.time() < end:
            before = loop.time()
            await asyncio.sleep(0.01)
            worst = max(worst, loop.time() - before - 0.01)
        assert worst < 0.25, f"the event loop was held up {worst:.3f} s"
    finally:
        writer.kill()
        writer.wait()
        forwarder.stop()
        pty.close()
        os.close(null)


async def test_stopping_forwards_what_the_guest_wrote_last_but_ends_while_it_floods() -> None:
    """(Stopping read on until the console was empty: detaching from a flooding guest never ended.)"""
    import select
    import subprocess
    import threading

    from vmspawnd.ptyfwd import Pty, PtyForwarder

    pty = Pty()
    out_r, out_w = os.pipe()
    os.set_blocking(out_r, False)
    null = os.open(os.devnull, os.O_RDONLY)
    last = b"the guest's last words\r\n"
    try:
        forwarder = PtyForwarder(pty.master, read_only=True, on_escape=lambda: None, stdin=null, stdout=out_w)
        slave = os.open(pty.slave_path, os.O_WRONLY | os.O_NOCTTY)
        os.write(slave, last)  # written, not yet read by the event loop
        forwarder.stop()
        os.close(slave)
        assert os.read(out_r, 4096).replace(b"\r", b"") == last.replace(b"\r", b"")
    finally:
        os.close(out_r)
        os.close(out_w)

    devnull = os.open(os.devnull, os.O_WRONLY)
    forwarder = PtyForwarder(pty.master, read_only=True, on_escape=lambda: None, stdin=null, stdout=devnull,
                             tint="48;2;0;64;0")  # (the tint's escape sequences are its slow path)
    with open(pty.slave_path, "wb") as slave_file:  # (two writers: one the reader could keep up with)
        writers = [subprocess.Popen(["yes", "\x1b[0mab\x1b[48;5;1m"], stdout=slave_file) for _ in range(2)]
    stopper = threading.Thread(target=forwarder.stop)
    try:
        assert select.select([pty.master], [], [], 30)[0], "the guest wrote nothing"
        stopper.start()
        stopper.join(1.5)  # (0.1-0.2 s here; it read on for 2.5-3.9 s, until the writers lost a race)
        assert not stopper.is_alive(), "stopping went on while the guest wrote"
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
        stopper.join()
        pty.close()
        os.close(null)
        os.close(devnull)


@pytest.mark.parametrize("given", [b"", b"date\n" + bytes(range(1, 29)) + b"\n" * 3 + os.urandom(300_000)],
                         ids=["/dev/null", "a file"])
async def test_standard_input_from_a_file_or_dev_null_is_forwarded_at_the_pace_of_the_console(tmp_path, given):
    """(epoll refuses files and /dev/null: the forwarder failed to start, so `vmspawnctl console VM </dev/null`
    could not show a console; input the console did not take at once was dropped.)"""
    import asyncio

    from vmspawnd.ptyfwd import Pty, PtyForwarder

    given = given.replace(b"\x1d", b"")  # (Ctrl-] thrice would detach)
    source = tmp_path / "input"
    source.write_bytes(given)
    pty = Pty()
    stdin = os.open(source if given else os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    os.set_blocking(out_r, False)
    forwarder = PtyForwarder(pty.master, read_only=False, on_escape=lambda: None, stdin=stdin, stdout=out_w)
    slave = os.open(pty.slave_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    try:
        forwarder.start()
        received = bytearray()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            await asyncio.sleep(0.05 if len(received) == len(given) else 0.001)  # the guest reads slowly
            with contextlib.suppress(BlockingIOError):
                received += os.read(slave, 1024)
            if len(received) == len(given):
                os.write(slave, b"guest output\r\n")  # the guest's output still reaches us
                await asyncio.sleep(0.2)
                break
        assert bytes(received) == given  # all of it, in order, nothing dropped while the console was full
        assert b"guest output" in os.read(out_r, 4096)
    finally:
        forwarder.stop()
        for fd in (slave, stdin, out_r, out_w):
            os.close(fd)
        pty.close()


async def test_a_paste_bigger_than_the_console_takes_at_once_arrives_whole() -> None:
    """(Input the console did not take at once was dropped: a long paste into a terminal lost its middle.)"""
    import asyncio

    from vmspawnd.ptyfwd import Pty, PtyForwarder

    pasted = bytes(range(32, 127)) * 2000  # 190 kB, no Ctrl-]
    pty, terminal = Pty(), Pty()  # the console, and the user's terminal (our standard input is its slave)
    terminal_in = os.open(terminal.slave_path, os.O_RDWR | os.O_NOCTTY)
    out_r, out_w = os.pipe()
    forwarder = PtyForwarder(pty.master, read_only=False, on_escape=lambda: None, stdin=terminal_in, stdout=out_w)
    guest = os.open(pty.slave_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    try:
        forwarder.start()  # (puts the terminal in raw mode: the paste arrives as it is)
        typed, received = 0, bytearray()
        deadline = loop.time() + 30
        while len(received) < len(pasted) and loop.time() < deadline:
            if typed < len(pasted):
                with contextlib.suppress(BlockingIOError):
                    typed += os.write(terminal.master, pasted[typed:typed + 8192])
            await asyncio.sleep(0.001)
            with contextlib.suppress(BlockingIOError):
                received += os.read(guest, 512)  # the guest reads slowly
        assert bytes(received) == pasted
    finally:
        forwarder.stop()
        for fd in (guest, terminal_in, out_r, out_w):
            os.close(fd)
        pty.close()
        terminal.close()


async def test_a_file_is_not_read_on_into_a_console_that_is_gone(tmp_path) -> None:
    """(Each chunk of the file was read and thrown away, to its end: `</dev/zero` never stopped.)"""
    import asyncio
    import socket

    from vmspawnd.ptyfwd import PtyForwarder

    source = tmp_path / "input"
    source.write_bytes(b"x" * (8 << 20))
    console, gone = socket.socketpair()
    gone.close()  # (a write to it fails: EPIPE)
    stdin = os.open(source, os.O_RDONLY)
    out = os.open(os.devnull, os.O_WRONLY)
    forwarder = PtyForwarder(console.fileno(), read_only=False, on_escape=lambda: None, stdin=stdin, stdout=out)
    try:
        forwarder.start()
        await asyncio.sleep(0.3)
        assert os.lseek(stdin, 0, os.SEEK_CUR) <= 4096  # the first chunk, and no more
    finally:
        forwarder.stop()
        for fd in (stdin, out):
            os.close(fd)
        console.close()
