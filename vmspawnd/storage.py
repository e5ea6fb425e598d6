# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash-safe files: write to a temp file, fsync, rename, fsync the directory (the fsyncs only for
what must survive the machine, not just our process)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON: readers see the old file or the new one, never a torn one.
    ``durable``: also once the machine crashed (fsync); without it, once our process was killed.  A
    durable file is written for people to read (indented); the others compactly (much faster)."""
    text = json.dumps(data, indent=2, sort_keys=True) if durable else json.dumps(data, separators=(",", ":"))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.write("\n")
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)
