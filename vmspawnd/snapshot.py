"""--ephemeral with --directory: the VM runs on a throw-away copy of the tree, never the original."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

SNAPSHOT_PREFIX = ".#"


class SnapshotError(Exception):
    """The copy could not be made (the message says why)."""


def snapshot_directory(source: Path) -> Path:
    """Copy ``source`` to a hidden sibling ``.#<name>.<random>`` (reflinked where the file system
    can, so cheap on btrfs/XFS; owners, modes and xattrs kept; other file systems below it left out)."""
    target = source.parent / f"{SNAPSHOT_PREFIX}{source.name}.{secrets.token_hex(8)}"
    cp = shutil.which("cp") or "/bin/cp"
    try:
        subprocess.run([cp, "-a", "--reflink=auto", "--one-file-system", "--", str(source), str(target)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        remove_snapshot(target)
        why = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        raise SnapshotError(f"cannot make the --ephemeral copy of {source}: {why}") from None
    return target


def remove_snapshot(path: Path) -> None:
    """Remove a copy made by :func:`snapshot_directory` (and nothing that is not one)."""
    if path.name.startswith(SNAPSHOT_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
