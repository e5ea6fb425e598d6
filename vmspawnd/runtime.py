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

Both dirs hold unix sockets, whose paths must fit 107 bytes: where ``<base>/<name>/`` is too long for
them (a long name under ``$XDG_RUNTIME_DIR``, or a long ``$RUNTIME_DIRECTORY``), both are named after
``<the name's start>_<hash of the name>`` instead (:func:`vm_dir_name`; no machine's name has a '_',
and ``run.json`` says whose records they are).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import threading
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.identity import ROOT, Identity
from vmspawnd.proc import SUN_PATH_MAX
from vmspawnd.values import sha256

BASE_MODE = 0o711
RECORDS_SUFFIX = ".run"
#: how a discarded dir is named (hidden: ``.<name>.<random>.gone``) while it is removed
DISCARDED_SUFFIX = ".gone"
#: how many times a discarded dir is sealed and emptied before it is left (for :func:`sweep_discarded`)
DISCARD_PASSES = 64
#: how many entries of a discarded dir are removed at once, before the rest goes to a thread
DISCARD_AT_ONCE = 1000
#: how deep a discarded dir is walked at once (deeper dirs are moved up for the next pass)
DISCARD_DEPTH = 32
#: the longest name of a socket the VM's dir holds (virtiofsd's for the 100th --bind)
LONGEST_SOCKET = "fs-mnt99.sock"
#: hex digits of the name's hash in a shortened VM dir name
NAME_HASH_DIGITS = 16
#: the shortest a shortened dir name gets: the name's first character, '_' and the hash
SHORTEST_DIR_NAME = 1 + 1 + NAME_HASH_DIGITS
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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


def vm_dir_name(base: Path, name: str) -> str:
    """The name of machine ``name``'s VM dir under ``base``: the machine's name where its sockets' paths
    fit, else as much of its start as fits, '_' and a hash of the whole name (one name, one dir)."""
    room = _room_for_dir_name(base)
    if len(name) <= room:
        return name
    digest = sha256(name).hex()[:NAME_HASH_DIGITS]
    return f"{name[:max(room, SHORTEST_DIR_NAME) - NAME_HASH_DIGITS - 1]}_{digest}"


def _room_for_dir_name(base: Path) -> int:
    """How long a dir name under ``base`` may be for the longest socket path in it to fit."""
    return SUN_PATH_MAX - len(os.fsencode(base)) - len(f"//{LONGEST_SOCKET}")


class RuntimeDir:
    """A machine's runtime dir (:attr:`path`) and records dir (:attr:`records`): the machine locked by
    :meth:`lock`, the dirs made new for a run by :meth:`renew` (or kept for an adopted run by
    :meth:`keep`), removed by :meth:`remove`."""

    def __init__(self, base: Path, name: str) -> None:
        self.path = base / vm_dir_name(base, name)
        self.records = base / f"{self.path.name}{RECORDS_SUFFIX}"  # (its control socket's path is shorter)
        self._lock_fd = -1
        if _room_for_dir_name(base) < len(self.path.name):  # (a base too long for this name, or any)
            fits_any = SUN_PATH_MAX - len(f"//{LONGEST_SOCKET}") - SHORTEST_DIR_NAME
            raise ConfigError("runtime-directory", str(base), f"too long for the unix sockets of a VM's runtime "
                              f"directory in it ({len(os.fsencode(base))} bytes; up to {fits_any} fits any name)")

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
    entries as fast as we remove them), and may have filled with symlinks, FIFOs and devices.  It is
    renamed aside first, so its name is free at once; then emptied by :func:`_seal_and_empty`: here
    up to :data:`DISCARD_AT_ONCE` entries (a run's own files), the rest in a thread of its own (its
    user chose how big it is: the event loop must not wait for it).  What resists (a tree deeper than
    :data:`DISCARD_DEPTH` levels beyond :data:`DISCARD_PASSES` passes), or was left when our process
    ended, stays under its hidden name for :func:`sweep_discarded`."""
    aside = path.with_name(f".{path.name}.{os.urandom(6).hex()}{DISCARDED_SUFFIX}")  # (no machine's name has a '.')
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if not _remove_discarded(aside, budget=[DISCARD_AT_ONCE]):
        threading.Thread(target=_remove_discarded, args=(aside,), name="discard", daemon=True).start()


def sweep_discarded(base: Path) -> None:
    """Remove what :func:`_discard` left in ``base`` (a daemon killed meanwhile, or a tree that resisted)."""
    with contextlib.suppress(OSError):
        for entry in base.glob(f".*{DISCARDED_SUFFIX}"):
            _remove_discarded(entry)


def _remove_discarded(aside: Path, budget: list[int] | None = None) -> bool:
    """Remove ``aside`` (see :func:`_discard`), looking at no more entries than ``budget[0]`` if given;
    True if it is gone."""
    try:
        fd = os.open(aside, _DIR_FLAGS)
    except OSError:  # not a directory (or gone)
        with contextlib.suppress(OSError):
            aside.unlink()
        return not os.path.lexists(aside)
    try:
        for _ in range(DISCARD_PASSES):
            with contextlib.suppress(OSError):
                if not _seal_and_empty(fd, fd, 0, budget):
                    break
            if budget is not None and budget[0] <= 0:
                return False
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(aside)
    return not os.path.lexists(aside)


def _seal_and_empty(dir_fd: int, top_fd: int, depth: int, budget: list[int] | None) -> bool:
    """Make the directory open at ``dir_fd`` ours and 0700 (so that nothing new can be put in it), then
    remove what is in it, opening each entry only as a directory and never through a symlink (so no
    FIFO, device or other file of the user's is ever opened).  A directory :data:`DISCARD_DEPTH` deep is
    moved up to ``top_fd`` for the next pass instead.  Stops once ``budget[0]`` entries were looked at.
    True if something is left."""
    os.fchown(dir_fd, os.geteuid(), os.getegid())
    os.fchmod(dir_fd, 0o700)
    left = False
    for name in os.listdir(dir_fd):
        if budget is not None:
            budget[0] -= 1
            if budget[0] < 0:
                return True
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError:  # a file, a symlink, a FIFO…: unlinked, never opened
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            except OSError:
                left = True
            continue
        try:
            if depth + 1 >= DISCARD_DEPTH:
                os.rename(name, f"deep.{os.urandom(6).hex()}", src_dir_fd=dir_fd, dst_dir_fd=top_fd)
                left = True
                continue
            left |= _seal_and_empty(child, top_fd, depth + 1, budget)
        finally:
            os.close(child)
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except OSError:
            left = True
    return left


def _remove(entry: Path) -> None:
    with contextlib.suppress(OSError):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
