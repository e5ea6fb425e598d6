# SPDX-License-Identifier: LGPL-2.1-or-later
"""Per-machine runtime directories (0700), locked while the machine runs, removed after."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.proc import check_socket_path


def runtime_base() -> Path:
    """Where vmspawn's per-machine runtime dirs go: $RUNTIME_DIRECTORY (under a service), else
    /run/vmspawnd/machines as root (shared with the daemon, so one name runs once), else
    $XDG_RUNTIME_DIR/vmspawnd/machines."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/vmspawnd/machines")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "vmspawnd" / "machines"
    raise ConfigError("runtime-directory", "", "neither $RUNTIME_DIRECTORY nor $XDG_RUNTIME_DIR is set")


class RuntimeDir:
    """``<base>/<machine>/``: created 0700 and locked by :meth:`create`, removed by :meth:`remove`."""

    def __init__(self, base: Path, name: str) -> None:
        self.path = base / name
        self._lock_fd = -1
        check_socket_path(self.path / "fs-mnt99.sock")  # as long as the socket names we put there get

    def lock(self) -> Path:
        """Create the dir if needed and lock it; fail if a live machine holds it."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("machine", self.path.name, "a machine of that name is already running") from None
        self._lock_fd = fd
        return self.path

    def create(self) -> Path:
        """Lock the runtime dir and clear what a killed earlier run left in it."""
        self.lock()
        try:
            self.clear_leftovers()
        except BaseException:
            self.unlock()
            raise
        return self.path

    def clear_leftovers(self) -> None:
        for entry in self.path.iterdir():  # leftovers of a killed run
            if entry.name != ".lock":
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def remove(self) -> None:
        self.remove_files()
        self.unlock()

    def remove_files(self) -> None:
        """Remove the directory (the lock, if held, stays held until :meth:`unlock`)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def unlock(self) -> None:
        """Release the lock but keep the directory (the daemon detaching from a running VM)."""
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1
