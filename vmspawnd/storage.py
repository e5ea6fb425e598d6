# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash-safe files: write to a temp file, fsync, rename, fsync the directory (the fsyncs only for
what must survive the machine, not just our process)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON: readers see the old file or the new one, never a torn one.
    ``durable``: also once the machine crashed (fsync); without it, once our process was killed.  A
    durable file is written for people to read (indented); the others compactly (much faster)."""
    text = json.dumps(data, indent=2, sort_keys=True) if durable else json.dumps(data, separators=(",", ":"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{next(_temp_names)}.tmp")  # ours alone: no random name
    try:
        fd = _create(tmp)
        try:
            _write_all(fd, (text + "\n").encode())
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
    if not durable:
        return
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


_temp_names = itertools.count()
_CREATED_MODE = 0o600


def _create(tmp: Path) -> int:
    """A new file at ``tmp`` (0600, never through a symlink); a leftover of an earlier process that had
    our pid is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(tmp, flags, _CREATED_MODE)
    except FileExistsError:
        os.unlink(tmp)
        return os.open(tmp, flags, _CREATED_MODE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)
