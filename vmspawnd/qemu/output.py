# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU's stdout and stderr under the daemon: a pipe that the daemon reads.

QEMU had the daemon's own stdout and stderr (its journal stream, under systemd), so a VM's user,
who may attach to their QEMU, could write lines into the daemon's log that looked like the
daemon's.  Now each line QEMU writes is one field of one log entry of the daemon's, named as
QEMU's output of that machine; a QEMU that writes a flood is heard :data:`BURST` lines at once and
one a second after that.  The last lines also say why a QEMU that did not come up exited.

Under systemd the daemon keeps a copy of the pipe's read end in its service's store
(systemd/fdstore.py): a restarted daemon reads on from it, lines written while no daemon ran
included.  To fill the pipe then, and so wait, QEMU would have to write :data:`AWAY_BUFFER` bytes.
Without a store, the lines QEMU writes after its daemon ended are lost (QEMU ignores SIGPIPE).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import time

from vmspawnd.log import Logger

TAIL_LINES = 8  # kept for an error message
MAX_LINE = 1000  # bytes of a line: a longer one is cut into lines of this size
BURST = 100  # lines logged at once; then one a second
READ_SIZE = 65536
AWAY_BUFFER = 1 << 20  # bytes the pipe holds while no daemon reads it (an unprivileged user's maximum)


class QemuOutput:
    """The pipe for one QEMU's output: :attr:`write_fd` is QEMU's stdout and stderr; :meth:`start`
    reads it (once QEMU holds it), :attr:`last` has the last lines, :meth:`close` ends it."""

    def __init__(self, log: Logger, read_fd: int | None = None) -> None:
        """A new pipe; or, with ``read_fd``, the read end of the pipe of a QEMU that runs already."""
        self._log = log
        if read_fd is None:
            self._read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            os.set_blocking(self.write_fd, True)  # (QEMU's end: QEMU expects blocking writes)
        else:
            self._read_fd, self.write_fd = read_fd, -1
            os.set_blocking(read_fd, False)
        self.last: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = b""
        self._tokens, self._refilled = float(BURST), time.monotonic()
        self._dropped = 0
        self._ended = asyncio.Event()

    @property
    def read_fd(self) -> int:
        return self._read_fd

    def hold_while_away(self) -> None:
        """Let the pipe hold :data:`AWAY_BUFFER` bytes (a store keeps its read end while no daemon
        reads it); it holds less where the kernel refuses."""
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._read_fd, fcntl.F_SETPIPE_SZ, AWAY_BUFFER)

    def start(self) -> None:
        """Read QEMU's output from now on (our copy of its end is closed: EOF comes with QEMU's exit)."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        asyncio.get_running_loop().add_reader(self._read_fd, self._readable)

    async def ended(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until QEMU's last line was read."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)

    def close(self) -> None:
        """Log what QEMU wrote and we did not read yet (its last words, when it exited), and stop."""
        for _ in range(AWAY_BUFFER // READ_SIZE):
            if not self._readable():
                break
        if self._read_fd >= 0:
            self._finish()
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def _readable(self) -> bool:
        """Read and log what is there; whether there may be more."""
        if self._read_fd < 0:
            return False
        try:
            data = os.read(self._read_fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._finish()
            return False
        *lines, self._partial = (self._partial + data).split(b"\n")
        while len(self._partial) >= MAX_LINE:
            lines.append(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]
        for line in lines:
            for start in range(0, max(1, len(line)), MAX_LINE):
                self._line(line[start:start + MAX_LINE].decode(errors="replace"))
        return True

    def _line(self, line: str) -> None:
        self.last.append(line)
        now = time.monotonic()
        self._tokens = min(float(BURST), self._tokens + (now - self._refilled))
        self._refilled = now
        if self._tokens < 1:
            self._dropped += 1
            return
        self._tokens -= 1
        if self._dropped:
            self._log.warning("QEMU wrote more than is logged; lines were dropped", dropped=self._dropped)
            self._dropped = 0
        self._log.warning("QEMU's output", output=line)

    def _finish(self) -> None:
        if self._partial:
            self._line(self._partial.decode(errors="replace"))
            self._partial = b""
        if self._dropped:
            self._log.warning("QEMU wrote more than is logged; lines were dropped", dropped=self._dropped)
            self._dropped = 0
        with contextlib.suppress(ValueError, RuntimeError):  # (no loop, or never started)
            asyncio.get_running_loop().remove_reader(self._read_fd)
        os.close(self._read_fd)
        self._read_fd = -1
        self._ended.set()
