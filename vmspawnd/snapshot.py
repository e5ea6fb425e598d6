# SPDX-License-Identifier: LGPL-2.1-or-later
"""--ephemeral with --directory: the VM runs on a throw-away copy of the tree, never the original.

The copy is a hidden sibling ``.#<name>.<16 hex digits>`` of the (symlink-resolved) tree, made by
``cp -a --reflink=auto`` (cheap on btrfs/XFS).  Its path and the resolved tree are recorded in the
machine's runtime dir *before* it is made, so a copy is removed even when the run that made it was
killed (a ``cp`` it left is ended first), or the tree was moved or re-pointed since; the record goes
only once the copy has.  Removal only ever touches a real directory with exactly that kind of name,
right next to the tree it was made of.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from vmspawnd.log import get_logger
from vmspawnd.proc import process_state, processes_mentioning

log = get_logger()

_COPY_RE = re.compile(r"^\.#(?P<name>.+)\.[0-9a-f]{16}\Z")


class SnapshotError(Exception):
    """The copy could not be made (the message says why)."""


def copy_path(source: Path) -> Path:
    """Where a new copy of ``source`` goes (a fresh random name next to the resolved tree)."""
    real = source.resolve(strict=True)
    return real.parent / f".#{real.name}.{os.urandom(8).hex()}"


def is_copy_of(path: Path, source: Path) -> bool:
    """True if ``path`` names a copy of ``source`` (by its name and place, and a real directory)."""
    try:
        real = source.resolve()
        match = _COPY_RE.match(path.name)
        return (match is not None and match["name"] == real.name and path.parent == real.parent
                and stat.S_ISDIR(os.lstat(path).st_mode))
    except OSError:
        return False


def snapshot_directory(source: Path, target: Path) -> None:
    """Copy the tree ``source`` into the new directory ``target`` (from :func:`copy_path`)
    with owners, modes and xattrs; other file systems mounted below it are left out."""
    real = source.resolve(strict=True)
    if not real.is_dir():
        raise SnapshotError(f"cannot make the --ephemeral copy of {source}: not a directory")
    try:
        os.mkdir(target, 0o700)  # fails if the name exists: nothing of anyone else's is ever used
    except OSError as e:
        raise SnapshotError(f"cannot make the --ephemeral copy of {source}: {target}: {e.strerror}") from None
    cp = shutil.which("cp") or "/bin/cp"
    try:
        subprocess.run([cp, "-a", "--reflink=auto", "--one-file-system", "--", f"{real}/.", f"{target}/"],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        remove_copy(target, source)
        why = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        raise SnapshotError(f"cannot make the --ephemeral copy of {source}: {why}") from None


def remove_copy(path: Path, source: Path) -> None:
    """Remove a copy of ``source`` (directories a guest locked away are opened up first); anything
    that is not one is left alone."""
    if not os.path.lexists(path):
        return
    if not is_copy_of(path, source):
        log.warning("not removing what is not an --ephemeral copy", path=str(path))
        return
    _end_copying(path)
    for root, dirs, _ in os.walk(path):  # top-down: each directory is opened up before it is entered
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):  # never chmod through a symlink
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)

    def report(_function: object, failed: str, _exc: object) -> None:
        log.warning("could not remove part of an --ephemeral copy", path=failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=report)
    else:
        shutil.rmtree(path, onerror=report)


def _end_copying(path: Path) -> None:
    """End a ``cp`` still filling ``path`` (its run was killed): it would refill what is removed."""
    copying = processes_mentioning(f"{path}/")
    for pid in copying:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(process_state(pid) not in (None, "Z", "X") for pid in copying) and time.monotonic() < deadline:
        time.sleep(0.01)


class EphemeralCopy:
    """The copy one run of ``--ephemeral --directory`` runs on: ``async with`` makes it (recording
    its path in ``record`` first, so even a killed run's copy is found) and removes it after."""

    def __init__(self, source: Path, record: Path) -> None:
        self.source = source
        self.record = record
        self.path: Path | None = None

    @classmethod
    def recorded(cls, record: Path, source: Path | None = None) -> EphemeralCopy | None:
        """The copy an earlier run recorded in ``record`` (to remove or keep), if there is one; of the
        tree recorded with it (``source`` for a record of an older version, which has none)."""
        try:
            lines = record.read_text().splitlines()
        except OSError:
            return None
        recorded_source = Path(lines[1]) if len(lines) > 1 and lines[1] else source
        if not lines or not lines[0] or recorded_source is None:
            return None
        copy = cls(recorded_source, record)
        copy.path = Path(lines[0])
        return copy

    async def __aenter__(self) -> Path:
        self.path = copy_path(self.source)
        self.source = self.source.resolve(strict=True)  # (the tree now: a link to it may be re-pointed)
        self.record.write_text(f"{self.path}\n{self.source}\n")
        copying = asyncio.ensure_future(asyncio.to_thread(snapshot_directory, self.source, self.path))
        try:
            await asyncio.shield(copying)
        except BaseException:
            if not copying.done():  # cancelled (vmspawn's SIGTERM): end the cp, and let its thread finish
                _end_copying(self.path)
                with contextlib.suppress(Exception):
                    await copying
            await self.remove()
            raise
        log.info("running on an ephemeral copy", directory=str(self.source), copy=str(self.path))
        return self.path

    async def __aexit__(self, *exc: object) -> None:
        await self.remove()

    async def remove(self) -> None:
        """Remove the copy (only a real copy of the source, see :func:`remove_copy`), then its record
        (kept while any of the copy is left, for the next run to remove)."""
        if self.path is not None:
            await asyncio.to_thread(remove_copy, self.path, self.source)
            if os.path.lexists(self.path):
                return
            self.path = None
        self.record.unlink(missing_ok=True)
