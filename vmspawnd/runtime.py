# SPDX-License-Identifier: LGPL-2.1-or-later
"""Per-machine runtime directories, locked while the machine runs, removed after.

Each machine has two, side by side under the runtime base (0711: reachable, not listable):

* ``<base>/<name>/`` — the VM's own (:attr:`RuntimeDir.path`, 0700): sockets QEMU and its
  helpers use, credentials, the merged initrd.  It belongs to the user the VM runs as, and the
  daemon only touches it acting as that user (see identity.py).  Each run gets a new one: an
  earlier run's, whose user (maybe another) may still be writing to it, is renamed aside to a
  hidden ``.<name>.<random>.gone``, taken from that user and removed, never reused.
* ``<base>/<name>.run/`` — the daemon's record of the run (:attr:`RuntimeDir.records`, root's,
  0700): the lock, ``run.json`` (the processes a later daemon adopts or ends) and the
  ``--ephemeral`` copy's path.  Nothing the VM's user can write is ever trusted.

Machine names have no '.', so no machine's directory is another's records or a discarded dir, nor
the base's one file of its own: ``qemu.version``, the host's QEMU version kept for the next start (qemu/accel.py).
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
#: how many times a dir being discarded is sealed and removed before it is left under its hidden name
DISCARD_PASSES = 8


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
    """A machine's runtime dir (:attr:`path`) and records dir (:attr:`records`): the machine locked by
    :meth:`lock`, the dirs made new for a run by :meth:`renew` (or kept for an adopted run by
    :meth:`keep`), removed by :meth:`remove`."""

    def __init__(self, base: Path, name: str) -> None:
        self.path = base / name
        self.records = base / f"{name}{RECORDS_SUFFIX}"
        self._lock_fd = -1
        check_socket_path(self.path / "fs-mnt99.sock")  # as long as the socket names we put there get

    def lock(self) -> None:
        """Create the records dir if needed and lock the machine; fail if a live machine holds it.
        The VM's dir is left as it is: :meth:`renew` for a new run, :meth:`keep` for an adopted one."""
        make_base(self.path.parent)
        _make_private_dir(self.records)
        fd = os.open(self.records / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("machine", self.path.name, "a machine of that name is already running") from None
        self._lock_fd = fd

    def renew(self, identity: Identity = ROOT) -> Path:
        """For a new run (the machine locked): empty the records dir but the lock, and replace the VM's
        dir with a new, empty one of ``identity``'s.  Nothing in the old one is kept or trusted: its
        owner (an earlier run's user, maybe another than this run's) may still be writing to it."""
        for entry in self.records.iterdir():
            if entry.name != ".lock":
                _remove(entry)
        _discard(self.path)
        os.mkdir(self.path, 0o700)  # (only we can make it: the base is ours; it fails if someone did)
        if identity.switches:
            os.chown(self.path, identity.uid, identity.gid, follow_symlinks=False)
        return self.path

    def keep(self, identity: Identity) -> Path:
        """The VM's dir of a run being adopted (the machine locked), as ``identity``'s 0700 dir."""
        _make_private_dir(self.path, identity)
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

    def remove(self) -> None:
        self.remove_files()
        self.unlock()

    def remove_files(self) -> None:
        """Remove both directories (the lock, if held, stays held until :meth:`unlock`)."""
        _discard(self.path)
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


def _discard(path: Path) -> None:
    """Remove ``path``, a dir its user may still be writing to (a process of theirs in it can make
    entries as fast as we remove them).  It is renamed aside first, so its name is free at once; then
    every directory in it is made ours and 0700, so that nothing new can be put in it, and removed.
    Never follows a symlink.  What resists :data:`DISCARD_PASSES` passes stays under its hidden name."""
    aside = path.with_name(f".{path.name}.{os.urandom(6).hex()}.gone")  # (no machine's name has a '.')
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(os.lstat(aside).st_mode):
        aside.unlink()
        return
    for _ in range(DISCARD_PASSES):
        with contextlib.suppress(OSError):
            for _dir, _dirs, _files, dir_fd in os.fwalk(aside):  # (top-down: each dir sealed before its children)
                with contextlib.suppress(OSError):
                    os.fchown(dir_fd, os.geteuid(), os.getegid())
                    os.fchmod(dir_fd, 0o700)
        shutil.rmtree(aside, ignore_errors=True)  # (fd-based on Linux, as fwalk)
        if not os.path.lexists(aside):
            return


def _remove(entry: Path) -> None:
    with contextlib.suppress(OSError):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
