# SPDX-License-Identifier: LGPL-2.1-or-later
"""Small process and path facts shared by the launcher, the helpers and the machine."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vmspawnd.errors import ConfigError

if TYPE_CHECKING:
    import ctypes

PR_SET_PDEATHSIG = 1
SUN_PATH_MAX = 107  # bytes of a unix socket path, without the NUL
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, for the calls Python's os module lacks (errors in :func:`libc_error`).  Loaded at the
    first call: :mod:`ctypes` took ≈ 2 ms of each command's start, for calls that most runs never make."""
    global _libc
    if _libc is None:
        import ctypes  # (here, not at the top: see above)

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; nothing where the C
    library lacks it).  A run's peak (its start, its QMP traffic) takes heap that glibc keeps after
    it is freed: ≈ 1.4 MB after a daemon's first VMs (bench/notes.md, session 25)."""
    try:
        libc().malloc_trim(0)
    except AttributeError:
        pass


def libc_error(what: str) -> OSError:
    """The OSError for the last failed :func:`libc` call, naming ``what`` it was about."""
    import ctypes  # (loaded by the call that failed)

    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def parent_death_signal() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when we die.  The C library is loaded here, before the fork
    (the function runs between fork and exec, where nothing may be imported)."""
    prctl = libc().prctl
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def has_capability(bit: int, status: Path = Path("/proc/self/status")) -> bool:
    """Whether we hold a capability (CapEff); False when it cannot be read."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def check_socket_path(path: Path, field: str = "runtime-directory") -> None:
    """A unix socket path must fit sun_path."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(field, str(path), f"path too long for a unix socket (over {SUN_PATH_MAX} bytes)")


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (identifies it across pid reuse).  (Read
    with plain system calls: every start asks, and a file object costs ten times as much.)"""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)  # one line of a few hundred bytes, read whole by one read()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(stat.rsplit(b")", 1)[1].split()[19])


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not us) whose command line contains ``text``, e.g. a runtime dir."""
    return _live_processes_where(lambda pid: text.encode() in _read_cmdline(pid).replace(b"\0", b" "))


def processes_using(directory: Path) -> list[int]:
    """Live processes (not us) whose command line names a path in ``directory``, or that hold a socket
    bound there: a socket-activated helper (virtiofsd ``--fd=0``) names no path of it."""
    prefix = f"{directory}/"
    found = set(processes_mentioning(prefix))
    sockets = _sockets_bound_under(prefix)
    if sockets:
        found.update(_live_processes_where(lambda pid: any(link in sockets for link in _fd_links(pid))))
    return sorted(found)


def _live_processes_where(matches: Callable[[int], bool]) -> list[int]:
    """The live processes (not us, not zombies) that ``matches``; those that cannot be looked at (gone,
    or not ours to look at: an OSError) do not."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            if not matches(pid):
                continue
        except OSError:
            continue
        if process_state(pid) not in (None, "Z", "X"):
            found.append(pid)
    return found


def _read_cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _fd_links(pid: int) -> Iterator[str]:
    """What ``pid``'s descriptors point at (``socket:[INODE]``, a path…); those closed meanwhile are left out."""
    with os.scandir(f"/proc/{pid}/fd") as fds:
        for fd in fds:
            with contextlib.suppress(OSError):
                yield os.readlink(fd.path)


def _sockets_bound_under(prefix: str) -> set[str]:
    """The ``socket:[INODE]`` links of the unix sockets bound (listening, or accepted from one) at a
    path that starts with ``prefix`` (those of our network namespace, where ours are made)."""
    try:
        with open("/proc/net/unix", "rb") as table:
            rows = table.read().decode(errors="surrogateescape").splitlines()[1:]
    except OSError:
        return set()
    return {f"socket:[{fields[6]}]" for fields in (row.split(None, 7) for row in rows)
            if len(fields) == 8 and fields[7].startswith(prefix)}


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z``…), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
