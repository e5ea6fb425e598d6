# SPDX-License-Identifier: LGPL-2.1-or-later
"""Wait for a name to appear in a directory, woken by inotify rather than by polling.

A helper (swtpm, virtiofsd, vhost-device-vsock) is ready once its socket exists; QEMU is started
right after, so every millisecond between the socket's creation and our noticing it is start time.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100

_libc = ctypes.CDLL(None, use_errno=True)


class DirectoryWatch:
    """Entries created in (or moved into) ``directory``: :meth:`changed` returns after the next one.
    Raises OSError if the kernel cannot watch it (no inotify, no permission, too many watches)."""

    def __init__(self, directory: Path) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _oserror(directory)
        if _libc.inotify_add_watch(fd, os.fsencode(directory), IN_CREATE | IN_MOVED_TO) < 0:
            error = _oserror(directory)
            os.close(fd)
            raise error
        self._fd = fd

    async def changed(self, also: asyncio.Future | None = None, timeout: float | None = None) -> None:
        """Return once something was created there (what was read is discarded), ``also`` is done, or
        ``timeout`` seconds passed."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._fd, _resolve, woken)
        try:
            await asyncio.wait([woken] if also is None else [woken, also], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(self._fd)
            woken.cancel()
        self._drain()

    def _drain(self) -> None:
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirectoryWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _oserror(path: Path) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"inotify: {os.strerror(err)}", str(path))
