# SPDX-License-Identifier: LGPL-2.1-or-later
"""Wait for a name to appear in a directory, or for a file to be written, woken by inotify rather
than by polling.

A helper that makes its own socket (vhost-device-vsock) is ready once the socket exists; QEMU is
started right after, so every millisecond between the socket's creation and our noticing it is start
time (swtpm and virtiofsd are socket-activated: nothing is waited for).

One inotify instance serves the whole process, and each wait adds and removes a watch on it:
closing an inotify instance waits for the kernel's SRCU grace period (up to ≈ 10 ms here), which
would stall the event loop, while removing a watch does not.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

from vmspawnd.futures import resolve
from vmspawnd.proc import libc, libc_error

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class _Inotify:
    """The process's inotify instance: watches counted per descriptor, waiters woken per descriptor."""

    def __init__(self) -> None:
        fd = libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise libc_error("inotify_init1")
        self.fd = fd
        self._uses: dict[int, int] = {}
        self._waiters: dict[int, set[asyncio.Future[None]]] = {}
        self._missed: set[int] = set()  # watches that had an event while nobody waited on them
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop our reader is registered with

    def add(self, path: Path, mask: int) -> int:
        wd = libc().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise libc_error(f"inotify: {path}")
        self._uses[wd] = self._uses.get(wd, 0) + 1  # the same directory twice is the same watch
        return wd

    def remove(self, wd: int) -> None:
        self._uses[wd] -= 1
        if not self._uses[wd]:
            del self._uses[wd]
            self._missed.discard(wd)
            libc().inotify_rm_watch(self.fd, wd)  # (EINVAL if the directory went first: nothing to do)

    def wait(self, wd: int) -> asyncio.Future[None]:
        """A future done at the next event for ``wd``; :meth:`forget` it when done with it."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.fd)
            loop.add_reader(self.fd, self._read)
            self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(wd, set()).add(future)
        if wd in self._missed:  # (it happened between two waits)
            self._missed.discard(wd)
            future.set_result(None)
        return future

    def forget(self, wd: int, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(wd, set())
        waiters.discard(future)
        if not waiters:
            self._waiters.pop(wd, None)
        if not self._waiters and self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self.fd)
            self._loop = None

    def _read(self) -> None:
        woken: set[int] = set()
        try:
            while data := os.read(self.fd, 64 * 1024):
                offset = 0
                while offset + EVENT_HEADER.size <= len(data):
                    wd, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
                    offset += EVENT_HEADER.size + length
                    woken |= set(self._uses) if mask & IN_Q_OVERFLOW else {wd}
        except BlockingIOError:
            pass
        for wd in woken:
            if wd not in self._waiters and wd in self._uses:
                self._missed.add(wd)
            for future in self._waiters.get(wd, ()):
                resolve(future)


_instance: _Inotify | None = None


class DirectoryWatch:
    """Entries created in (or moved into) ``directory``: :meth:`changed` returns after the next one
    (or, with ``mask=IN_MODIFY`` on a file, after the next write to it).  Raises OSError if the
    kernel cannot watch it (no inotify, no permission, too many watches)."""

    def __init__(self, directory: Path, mask: int = IN_CREATE | IN_MOVED_TO) -> None:
        global _instance
        if _instance is None:
            _instance = _Inotify()
        self._inotify = _instance
        self._wd: int | None = self._inotify.add(directory, mask)

    async def changed(self, also: asyncio.Future | None = None, timeout: float | None = None) -> None:
        """Return once something happened there, ``also`` is done, or ``timeout`` seconds passed."""
        assert self._wd is not None, "changed() after close()"
        woken = self._inotify.wait(self._wd)
        try:
            await asyncio.wait([woken] if also is None else [woken, also], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._inotify.forget(self._wd, woken)
            woken.cancel()

    def close(self) -> None:
        if self._wd is not None:
            self._inotify.remove(self._wd)
            self._wd = None

    def __enter__(self) -> DirectoryWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def appears(path: Path, timeout: float, also: asyncio.Future | None = None) -> bool:
    """Wait until ``path`` exists (True), or ``also`` is done or ``timeout`` seconds passed (False).
    Woken by inotify on its directory; where that cannot be watched (missing, no inotify), polled
    at 2, 4, 8… up to 50 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        watch: DirectoryWatch | None = DirectoryWatch(path.parent)
    except OSError:
        watch = None
    delay = 0.002
    try:
        while not os.path.lexists(path):
            left = deadline - loop.time()
            if left <= 0 or (also is not None and also.done()):
                return False
            if watch is not None:
                await watch.changed(also=also, timeout=left)
            elif also is not None:
                await asyncio.wait([also], timeout=min(delay, left))
            else:
                await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return True
    finally:
        if watch is not None:
            watch.close()


async def writes(path: Path) -> AsyncIterator[None]:
    """Yield now, and after each write to the file ``path`` (writes close together, or made while the
    caller was busy, are seen once); raises OSError if it cannot be watched."""
    with DirectoryWatch(path, IN_MODIFY) as watch:
        while True:
            yield
            await watch.changed()
