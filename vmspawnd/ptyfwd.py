# SPDX-License-Identifier: LGPL-2.1-or-later
"""The console: a PTY pair for QEMU and an asyncio forwarder between it and our terminal.

Interactive mode puts the terminal into raw mode (restored on every exit path), propagates
the window size (SIGWINCH) and watches for Ctrl-] pressed three times within one second,
which asks to kill the VM.  Read-only mode only copies the guest's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
import time
import tty
from collections.abc import Callable

from vmspawnd.tint import RESET, TITLE_END, Tinter, title_start

ESCAPE_BYTE = 0x1D  # Ctrl-]
ESCAPE_COUNT = 3
ESCAPE_WINDOW = 1.0
OUTPUT_READ = 65536  # bytes of the guest's console output forwarded per event-loop turn
DRAIN_LIMIT = 1 << 18  # bytes forwarded at most when stopping: more than a console holds, less than a flood


class Pty:
    """A PTY pair: we keep the master (and hold the slave open so reads never see a hang-up
    before QEMU opened it); QEMU opens :attr:`slave_path`."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        os.set_blocking(self.master, False)
        os.set_inheritable(self.master, False)
        self.slave_path = os.ttyname(self._slave)
        tty.setraw(self._slave)

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class EscapeDetector:
    """Counts Ctrl-] presses; fires once three land within one second of the first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._count = 0
        self._first = 0.0

    def feed(self, data: bytes) -> bool:
        """Return True when the kill sequence completed within this input."""
        for byte in data:
            if byte != ESCAPE_BYTE:
                self._count = 0
                continue
            now = self._clock()
            if self._count == 0 or now - self._first > ESCAPE_WINDOW:
                self._count, self._first = 1, now
            else:
                self._count += 1
            if self._count >= ESCAPE_COUNT:
                self._count = 0
                return True
        return False


class PtyForwarder:
    """Copies bytes between the PTY master and our stdin/stdout."""

    def __init__(self, master: int, *, read_only: bool, on_escape: Callable[[], None],
                 stdin: int = 0, stdout: int = 1, on_hangup: Callable[[], None] | None = None,
                 tint: str | None = None, title: str | None = None) -> None:
        self._master = master
        os.set_blocking(master, False)  # drained in a loop until EAGAIN
        self._tinter = Tinter(tint) if tint else None
        self._title = title
        self._on_hangup = on_hangup
        self._stdin = stdin
        self._stdout = stdout
        self._on_escape = on_escape
        self._escape = EscapeDetector()
        self._saved_termios: list | None = None
        self._loop = asyncio.get_running_loop()
        self._reading_stdin = False
        self._stdin_polled = True  # False: a file, read a chunk per turn (epoll refuses files and /dev/null)
        self._next_read: asyncio.Handle | None = None
        self._unsent = b""  # input the console did not take yet (we read no more meanwhile)
        self.read_only = read_only or not _readable(stdin)
        self._last_byte = b"\n"

    def start(self) -> None:
        """Start forwarding; puts an interactive terminal into raw mode."""
        if self._title:
            self._write(title_start(self._title))
        self._loop.add_reader(self._master, self._pump_output)
        if self.read_only:
            return
        if os.isatty(self._stdin):
            self._saved_termios = termios.tcgetattr(self._stdin)
            tty.setraw(self._stdin, termios.TCSANOW)
            self._copy_window_size()
            self._loop.add_signal_handler(signal.SIGWINCH, self._copy_window_size)
        self._watch_stdin()

    def stop(self) -> None:
        """Drain what the guest wrote, stop forwarding and restore the terminal."""
        self._pump_output(drain=True)
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._master)
        self._unwatch_stdin()
        if self._unsent:
            self._unsent = b""
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._master)
        if self._saved_termios is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGWINCH)
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._stdin, termios.TCSADRAIN, self._saved_termios)
            self._saved_termios = None
        if self._last_byte not in (b"\n", b"\r"):
            self._write(b"\r\n" if os.isatty(self._stdout) else b"\n")
        if self._tinter is not None:
            self._write(RESET)
            self._tinter = None
        if self._title:
            self._write(TITLE_END)
            self._title = None

    def _pump_output(self, drain: bool = False) -> None:
        """Forward what the guest wrote: one read per call (the event loop calls again while more is
        there, with the hotkey, signals and QMP in between: a guest flooding its console never holds
        them up), or, if ``drain``, what is there (up to :data:`DRAIN_LIMIT`: a guest writing on must not keep
        us from stopping)."""
        left = DRAIN_LIMIT
        while left > 0:
            try:
                data = os.read(self._master, OUTPUT_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EIO: slave closed
                data = b""
            if not data:  # hang-up (a console socket reports EOF)
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._master)
                if self._on_hangup is not None:
                    self._on_hangup()
                    self._on_hangup = None
                return
            self._last_byte = data[-1:]
            self._write(self._tinter.feed(data) if self._tinter else data)
            if not drain:
                return
            left -= len(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._stdout, view)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:  # stdout gone (EPIPE): drop the output, keep the VM
                return
            view = view[n:]

    def _watch_stdin(self) -> None:
        """Read standard input as it comes; a file (or /dev/null), which epoll refuses as always readable,
        a chunk per event-loop turn (and so to its end, where a console carries on read-only)."""
        try:
            self._loop.add_reader(self._stdin, self._pump_input)
        except PermissionError:
            self._stdin_polled = False
            self._next_read = self._loop.call_soon(self._pump_input)
        self._reading_stdin = True

    def _unwatch_stdin(self) -> None:
        if not self._reading_stdin:
            return
        self._reading_stdin = False
        if self._next_read is not None:
            self._next_read.cancel()
            self._next_read = None
        elif self._stdin_polled:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._stdin)

    def _pump_input(self) -> None:
        self._next_read = None
        try:
            data = os.read(self._stdin, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF on stdin: carry on read-only
            self._unwatch_stdin()
            return
        self._unsent = data
        self._send_input()
        if self._escape.feed(data):
            self._on_escape()

    def _send_input(self) -> None:
        """Give the console what was read; what it does not take yet waits for it to take more, and
        standard input is not read meanwhile (a file is not read faster than the guest takes it)."""
        try:
            sent = os.write(self._master, self._unsent)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the console is gone (its hang-up ends the forwarding): nothing more is read for it
            self._unsent = b""
            self._unwatch_stdin()
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._master)
            return
        self._unsent = self._unsent[sent:]
        if self._unsent:
            if self._reading_stdin:
                self._unwatch_stdin()
                self._loop.add_writer(self._master, self._send_input)
            return
        if not self._reading_stdin:  # (the console took what waited: read on)
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._master)
            self._watch_stdin()
        elif not self._stdin_polled:
            self._next_read = self._loop.call_soon(self._pump_input)

    def _copy_window_size(self) -> None:
        for fd in (self._stdin, self._stdout):
            try:
                size = fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            except OSError:
                continue
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master, termios.TIOCSWINSZ, size)
            return


def _readable(fd: int) -> bool:
    try:
        return (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)
    except OSError:
        return False
