# SPDX-License-Identifier: LGPL-2.1-or-later
"""The definitions' log: a Create is made crash-safe by one write to a file whose blocks exist already
(one ``fdatasync``, no metadata for the file system's journal) instead of the two fsyncs of a new file
and its directory.  The definition's own file is written at once, atomically but without those
fsyncs; the log holds its bytes until a *checkpoint* has made the files durable (after a second
without Creates, when the log is full, and when the daemon reloads or stops).  At start,
:meth:`replay` gives back what the log holds, for the files a crash lost or tore to be written again.

The log is a file of :data:`SIZE` bytes, written through once (zeros) so that later writes only
overwrite.  Its first block holds a header with an *epoch*; each record after it carries the epoch,
its length and a CRC, so the first record that does not match ends the log: one torn by a crash (it
was never acknowledged), or one of an earlier epoch.  A checkpoint begins a new epoch, and with it an
empty log.  A removal of a machine whose Create is in the log is written to the log too, so that a
replay never brings it back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from vmspawnd.faults import crash_point

SIZE = 4 << 20  # ≈ 3,000 Creates of a typical definition (1.2 KB) between two checkpoints
IDLE_CHECKPOINT = 1.0  # seconds without a Create after which the files are made durable and the log emptied
FILE_NAME = ".definitions.log"  # (a name no definition, and no temporary file of storage.py, can have)
_RECORDS_AT = 4096
_RESERVED = 64 << 10  # kept for removals, so that a removal finds room in a log Creates have filled
_HEADER = struct.Struct("<8sQI")  # magic, epoch, CRC of the two
_HEADER_MAGIC = b"VMSPDLOG"
_RECORD = struct.Struct("<4sQIIB")  # magic, epoch, payload length, CRC of epoch, kind and payload, kind
_RECORD_MAGIC = b"VDL1"
_CREATED, _REMOVED = 1, 2


class DefinitionLog:
    """The log in ``directory`` (the definitions' own), made or opened by :meth:`open`."""

    def __init__(self, directory: Path, fd: int, epoch: int) -> None:
        self.directory = directory
        self._fd = fd
        self._epoch = epoch
        self._end = _RECORDS_AT  # where the next record goes
        self._logged: set[str] = set()  # the names with a record in this epoch
        self._idle: asyncio.TimerHandle | None = None
        self._checkpoint: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, directory: Path) -> DefinitionLog:
        """The log of ``directory``; one that is missing, of another size or with a broken header is
        made anew (all zeros), since no record in it can then be trusted.  Call :meth:`replay` next.
        OSError where it cannot be opened or made (one not made whole is removed)."""
        path = directory / FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            epoch = _read_header(fd) if os.fstat(fd).st_size == SIZE else None
            if epoch is None:
                try:
                    _fill_with_zeros(fd)
                    epoch = 1
                    _write_header(fd, epoch)
                except OSError:  # (no room for it: it takes none)
                    path.unlink(missing_ok=True)
                    raise
            return cls(directory, fd, epoch)
        except BaseException:
            os.close(fd)
            raise

    def replay(self) -> dict[str, bytes | None]:
        """name → the definition's bytes its last record in the log holds, or None where that record
        is its removal.  The log stays as it is until :meth:`checkpoint`."""
        found: dict[str, bytes | None] = {}
        for kind, name, data in self._records():
            found[name] = data if kind == _CREATED else None
            self._logged.add(name)
        return found

    def has_room(self, name: str, data: bytes) -> bool:
        """Whether :meth:`created` can log ``data`` now; where not (a full log, begun to be emptied, or a
        definition too large for it), the caller writes its file durably itself."""
        if self._end + _RECORD.size + len(name.encode()) + 1 + len(data) <= SIZE - _RESERVED:
            return True
        self._checkpoint_soon(0)
        return False

    def created(self, name: str, data: bytes) -> None:
        """Log the definition ``data`` of ``name`` (:meth:`has_room` said there was room), whose file was
        just written without fsync: it is durable once this returns."""
        if not self._append(_CREATED, name, data, SIZE - _RESERVED):
            raise OSError(f"no room in {self.directory / FILE_NAME}")

    def removed(self, name: str) -> bool:
        """Log the removal of ``name`` before its file is removed, where its Create is in the log (else a
        replay would bring it back).  False if there was no room: then :meth:`checkpoint` first."""
        if name not in self._logged:
            return True
        return self._append(_REMOVED, name, b"", SIZE)

    async def checkpoint(self) -> None:
        """Make every file the log holds a record of durable (in a thread), then begin a new epoch; again,
        while Creates came meanwhile (a full log takes none, so this ends)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        while self._logged:
            if self._checkpoint is None or self._checkpoint.done():  # (one that ended: its callback is due)
                self._start_checkpoint()
            assert self._checkpoint is not None
            await asyncio.shield(self._checkpoint)

    def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        os.close(self._fd)

    # ------------------------------------------------------------------ inside
    async def _make_durable(self) -> None:
        while self._logged:
            end = self._end
            await asyncio.to_thread(_fsync_files, self.directory, set(self._logged))
            if end == self._end:
                self._new_epoch()

    def _append(self, kind: int, name: str, data: bytes, limit: int) -> bool:
        named = name.encode() + b"\n"
        length = len(named) + len(data)
        crc = zlib.crc32(data, zlib.crc32(named, zlib.crc32(struct.pack("<QB", self._epoch, kind))))
        head = _RECORD.pack(_RECORD_MAGIC, self._epoch, length, crc, kind)
        if self._end + _RECORD.size + length > limit:
            self._checkpoint_soon(0)
            return False
        # one call, so a record is never split between two (and the definition's bytes are not copied)
        os.pwritev(self._fd, [head, named, data], self._end)
        try:
            os.fdatasync(self._fd)
        except OSError:  # not acknowledged: not to be replayed either (the next record goes over it)
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, bytes(_RECORD.size), self._end)
            raise
        self._end += _RECORD.size + length
        self._logged.add(name)
        self._checkpoint_soon(IDLE_CHECKPOINT)
        return True

    def _checkpoint_soon(self, delay: float) -> None:
        """Checkpoint ``delay`` seconds after the last record (where an event loop runs)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._idle is not None:
            self._idle.cancel()
        self._idle = loop.call_later(delay, self._begin_checkpoint)

    def _begin_checkpoint(self) -> None:
        crash_point("definitions-checkpoint")  # (tests: a crash while the log alone holds the latest Creates)
        self._idle = None
        if self._checkpoint is None:
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        task = self._checkpoint = asyncio.ensure_future(self._make_durable())
        task.add_done_callback(self._checkpoint_done)

    def _checkpoint_done(self, task: asyncio.Task[None]) -> None:
        if self._checkpoint is task:
            self._checkpoint = None
        if not task.cancelled() and task.exception() is not None:  # (e.g. EIO: tried again after the next Create)
            self._checkpoint_soon(IDLE_CHECKPOINT)

    def _new_epoch(self) -> None:
        self._epoch += 1
        _write_header(self._fd, self._epoch)
        self._end = _RECORDS_AT
        self._logged.clear()

    def _records(self) -> Iterator[tuple[int, str, bytes]]:
        while self._end + _RECORD.size <= SIZE:
            head = os.pread(self._fd, _RECORD.size, self._end)
            magic, epoch, length, crc, kind = _RECORD.unpack(head)
            if magic != _RECORD_MAGIC or epoch != self._epoch or self._end + _RECORD.size + length > SIZE:
                return
            payload = os.pread(self._fd, length, self._end + _RECORD.size)
            if zlib.crc32(payload, zlib.crc32(struct.pack("<QB", epoch, kind))) != crc or b"\n" not in payload:
                return
            name, data = payload.split(b"\n", 1)
            self._end += _RECORD.size + length
            yield kind, name.decode(errors="replace"), data


def _read_header(fd: int) -> int | None:
    magic, epoch, crc = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
    if magic != _HEADER_MAGIC or crc != zlib.crc32(struct.pack("<Q", epoch)):
        return None
    return epoch


def _write_header(fd: int, epoch: int) -> None:
    os.pwrite(fd, _HEADER.pack(_HEADER_MAGIC, epoch, zlib.crc32(struct.pack("<Q", epoch))), 0)
    os.fdatasync(fd)


def _fill_with_zeros(fd: int) -> None:
    """Write the whole log once (its blocks allocated and written, so that later writes change no
    metadata), durably."""
    os.ftruncate(fd, 0)
    zeros = bytes(64 << 10)
    for offset in range(0, SIZE, len(zeros)):
        os.pwrite(fd, zeros[:SIZE - offset], offset)
    os.fsync(fd)


def _fsync_files(directory: Path, names: set[str]) -> None:
    """fsync the definition file of each of ``names`` that exists, then ``directory``."""
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(f"{name}.json", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dirfd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
