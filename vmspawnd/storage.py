# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash-safe files: write to a temp file, fsync, rename, fsync the directory (the fsyncs only for
what must survive the machine, not just our process).  Where making a file is slow, the next temp
file is made ahead (:class:`FileAhead`); what a crash leaves is removed by
:func:`remove_leftover_temps`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any, mode: int = 0o600, durable: bool = True,
                      ahead: FileAhead | None = None) -> int:
    """Replace ``path`` with ``data`` as JSON: readers see the old file or the new one, never a torn one.
    ``durable``: also once the machine crashed (fsync); without it, once our process was killed.  A
    durable file is written for people to read (indented); the others compactly (much faster).
    ``ahead``: take the temporary file from there when it has one ready (it must be in ``path``'s
    directory).  Returns the file's size."""
    return write_bytes_atomic(path, encode_json(data, durable), mode, durable, ahead)


def write_bytes_atomic(path: Path, encoded: bytes, mode: int = 0o600, durable: bool = True,
                       ahead: FileAhead | None = None) -> int:
    """:func:`write_json_atomic` of bytes already encoded."""
    made = ahead.take() if ahead is not None else None
    tmp = made[0] if made else temp_path(path)
    try:
        if made:
            fd = made[1]
        else:
            fd = ahead.create(tmp) if ahead is not None else _create(tmp)
        if ahead is not None:
            ahead.make_next()
        try:
            _write_all(fd, encoded)
            if mode != _CREATED_MODE:  # (a umask that takes the owner's read or write is not ours)
                os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    return len(encoded)


def write_cache(path: str, data: bytes) -> None:
    """Replace the cache file ``path`` (a copy of what can be made again, readable by all) with ``data``,
    whole or not at all, quietly failing as a ``.pyc`` write does (its directory not ours to write…); the
    temporary file of a process killed while it wrote there is removed first."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_leftover_temps(Path(path).parent, of=os.path.basename(path))
        write_bytes_atomic(Path(path), data, mode=0o644, durable=False)


def encode_json(data: Any, durable: bool = True) -> bytes:
    """What :func:`write_json_atomic` writes: indented for a durable file (people read those), else compact."""
    text = json.dumps(data, indent=2, sort_keys=True) if durable else json.dumps(data, separators=(",", ":"))
    return (text + "\n").encode()


def temp_path(path: Path) -> Path:
    """A name for a temporary file beside ``path``, ours alone, that :func:`remove_leftover_temps`
    removes once we are gone."""
    return path.with_name(f".{path.name}.{os.getpid()}-{next(_temp_names)}.tmp")


_temp_names = itertools.count()
_CREATED_MODE = 0o600
_TEMP_NAME = re.compile(r"\..*\.(\d+)-\d+\.tmp")  # what write_json_atomic and FileAhead name their files


class FileAhead:
    """A new empty file made ahead of need in ``directory`` by a worker thread, for the next durable
    write there to fill instead of creating one while its caller waits.  Only while making a file
    there is slow: that costs up to ≈ 0.4–0.9 ms of the kernel's time in some ext4 directories, more
    than the write's two fsyncs, but ≈ 10 µs in most, less than handing work to a thread (see
    bench/notes.md).  The file is made unnamed and then named, so that the slow part does not hold
    the directory's lock, which the caller's rename needs.  One at a time; a write that finds none
    begun makes its own."""

    SLOW_NS = 100_000  # a file that took longer to make is worth making ahead

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.slow = False  # did the last file made there take longer than SLOW_NS?
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None  # started when first needed
        self._next: concurrent.futures.Future[tuple[Path, int]] | None = None

    def take(self) -> tuple[Path, int] | None:
        """The file made ahead (its path, and an fd open for writing that is the caller's now), or None
        if none was begun or it could not be made.  One still being made is waited for: making
        another meanwhile would wait for the directory's lock, which that one holds, and then take
        as long again."""
        made, self._next = self._next, None
        if made is None or made.exception() is not None:  # (one not made is tried again)
            return None
        return made.result()

    def create(self, tmp: Path, unnamed_first: bool = False) -> int:
        """:func:`_create` (or :func:`_create_unnamed_first`), noting whether that was slow."""
        started = time.monotonic_ns()
        fd = (_create_unnamed_first if unnamed_first else _create)(tmp)
        self.slow = time.monotonic_ns() - started > self.SLOW_NS
        return fd

    def make_next(self) -> None:
        """Begin making the next file, unless one is made or being made, or making one is fast here.
        Called as soon as the caller has its file: the next is made beside its write and rename."""
        if self._next is None and self.slow:
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="file-ahead")
            self._next = self._worker.submit(self._make)

    def close(self) -> None:
        """Remove the file made ahead (after waiting for one being made) and end the worker."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if self._next is not None and self._next.exception() is None:
            tmp, fd = self._next.result()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._next = self._worker = None

    def _make(self) -> tuple[Path, int]:
        tmp = self.directory / f".ahead.{os.getpid()}-{next(_temp_names)}.tmp"
        return tmp, self.create(tmp, unnamed_first=True)


def remove_leftover_temps(directory: Path, of: str | None = None) -> list[Path]:
    """Remove the temporary files left in ``directory`` by processes that are gone (a crash while
    writing, or a file made ahead), or only those for the file ``of``; returns them.  Called before
    this process writes there, so one named with our own pid is an earlier process's (pids are
    reused, as by a restarted container)."""
    removed = []
    for path in directory.glob(f".{glob_escape(of)}.*.tmp" if of else ".*.tmp"):
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or (int(match.group(1)) != os.getpid() and _alive(int(match.group(1)))):
            continue
        with contextlib.suppress(OSError):  # (gone meanwhile, or not ours to remove: kept)
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _create(tmp: Path) -> int:
    """A new file at ``tmp`` (0600, never through a symlink); a leftover of an earlier process that had
    our pid is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(tmp, flags, _CREATED_MODE)
    except FileExistsError:
        os.unlink(tmp)
        return os.open(tmp, flags, _CREATED_MODE)


def _create_unnamed_first(tmp: Path) -> int:
    """As :func:`_create`, but the file is made unnamed first (``O_TMPFILE``) and then linked at ``tmp``:
    making a file is what can be slow, and an unnamed one does not hold its directory's lock
    meanwhile, which a rename there needs.  Where ``O_TMPFILE`` is not supported, :func:`_create`."""
    try:
        fd = os.open(tmp.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, _CREATED_MODE)
    except OSError:
        return _create(tmp)
    try:
        directory = os.open(tmp.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(f"/proc/self/fd/{fd}", tmp.name, dst_dir_fd=directory)  # (linkat, following the link)
        finally:
            os.close(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_json(path: Path) -> Any:
    """A JSON file's value: ValueError for one that is not JSON, or that nests deeper than Python reads."""
    with open(path) as f:
        try:
            return json.load(f)
        except RecursionError:
            raise ValueError(f"{path} nests too deeply") from None
