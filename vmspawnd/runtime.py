# SPDX-License-Identifier: LGPL-2.1-or-later
"""Per-machine runtime directories, locked while the machine runs, removed after.

Each machine has two, side by side under the runtime base (0711: reachable, not listable):

* ``<base>/<name>/`` — the VM's own (:attr:`RuntimeDir.path`, 0700): sockets QEMU and its
  helpers use, credentials, the merged initrd.  It belongs to the user the VM runs as, and the
  daemon only touches it acting as that user (see identity.py).
* ``<base>/<name>.run/`` — the daemon's record of the run (:attr:`RuntimeDir.records`, root's,
  0700): the lock, ``run.json`` (the processes a later daemon adopts or ends) and the
  ``--ephemeral`` copy's path.  Nothing the VM's user can write is ever trusted.

Machine names have no '.', so no machine's directory is another's records, nor the base's one
file of its own: ``qemu.version``, the host's QEMU version kept for the next start (qemu/accel.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.identity import ROOT, Identity
from vmspawnd.proc import check_socket_path

BASE_MODE = 0o711
RECORDS_SUFFIX = ".run"


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


def make_base(base: Path) -> None:
    """Create the runtime base (0711: a VM running as a user reaches its own directory, lists none)."""
    base.mkdir(mode=BASE_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(os.stat(base).st_mode) != BASE_MODE:
        os.chmod(base, BASE_MODE)


class RuntimeDir:
    """A machine's runtime dir (:attr:`path`) and records dir (:attr:`records`): created and
    locked by :meth:`lock`, emptied by :meth:`clear_leftovers`, removed by :meth:`remove`."""

    def __init__(self, base: Path, name: str) -> None:
        self.path = base / name
        self.records = base / f"{name}{RECORDS_SUFFIX}"
        self._lock_fd = -1
        check_socket_path(self.path / "fs-mnt99.sock")  # as long as the socket names we put there get

    def lock(self, identity: Identity = ROOT) -> Path:
        """Create both dirs if needed (the VM's as ``identity``'s) and lock the machine; fail if a live
        machine holds it."""
        make_base(self.path.parent)
        _make_private_dir(self.records)
        fd = os.open(self.records / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("machine", self.path.name, "a machine of that name is already running") from None
        self._lock_fd = fd
        try:
            _make_private_dir(self.path, identity)
        except BaseException:
            self.unlock()
            raise
        return self.path

    def migrate(self, names: tuple[str, ...]) -> None:
        """Move the records ``names`` an earlier vmspawnd kept in the VM's directory (always root's
        then) to the records dir, so its running VMs are adopted, not ended."""
        try:
            if self.records.exists() or os.lstat(self.path).st_uid != 0:
                return
        except FileNotFoundError:
            return
        found = [name for name in names if (self.path / name).is_file()]
        if found:
            _make_private_dir(self.records)
            for name in found:
                os.rename(self.path / name, self.records / name)

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
        """Empty both dirs (but the lock) of what a killed run left; never follows a symlink."""
        for directory in (self.path, self.records):
            for entry in directory.iterdir():
                if entry.name != ".lock":
                    _remove(entry)

    def remove(self) -> None:
        self.remove_files()
        self.unlock()

    def remove_files(self) -> None:
        """Remove both directories (the lock, if held, stays held until :meth:`unlock`)."""
        shutil.rmtree(self.path, ignore_errors=True)  # fd-based on Linux: safe in a directory a user owns
        shutil.rmtree(self.records, ignore_errors=True)

    def unlock(self) -> None:
        """Release the lock but keep the directories (the daemon detaching from a running VM)."""
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1


def _make_private_dir(path: Path, identity: Identity = ROOT) -> None:
    """``path`` as a 0700 directory of ``identity`` (its parent is ours: nobody else can put anything there)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        _remove(path)
        os.mkdir(path, 0o700)
        st = os.lstat(path)
    owner = (identity.uid, identity.gid) if identity.switches else (os.geteuid(), os.getegid())
    if (st.st_uid, st.st_gid) != owner:
        os.chown(path, *owner, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _remove(entry: Path) -> None:
    with contextlib.suppress(OSError):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
