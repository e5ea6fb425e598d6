# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who a VM runs as, and acting as that user while the daemon touches the VM's files.

A machine owned by an unprivileged user runs as that user: QEMU, swtpm and virtiofsd get the
user's uid, gid and supplementary groups (:meth:`Identity.popen_kwargs`, or ``User=``/``Group=``/
``SupplementaryGroups=`` for a transient unit), so the kernel decides which images, kernels,
directories and state files the VM may use.

What the daemon itself opens or creates for such a VM (reading a GPT, copying NVRAM, creating
the TPM state directory, binding sockets in the VM's runtime directory) happens inside
:func:`acting_as`: the calling *thread* switches its file-system uid and gid and its
supplementary groups to the user's (``setfsuid``/``setfsgid`` and the raw ``setgroups``
system call, all per thread; glibc's ``setgroups()`` would change every thread), which also
drops root's override of file permissions until the block ends.  The block must not ``await``:
the event loop's other work would run with the user's rights.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmspawnd.errors import ConfigError
from vmspawnd.proc import libc, libc_error

#: the setgroups system call's number per architecture (the generic table: aarch64, riscv64, loongarch64)
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "loongarch64": 159, "ppc64le": 81,
                  "ppc64": 81, "s390x": 206}


#: what the service manager (or the caller) gave us for us alone, not for the processes we start
OURS_ALONE = frozenset(("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES",
                        "WATCHDOG_PID", "WATCHDOG_USEC", "MANAGERPID", "MAINPID", "SYSTEMD_EXEC_PID",
                        "INVOCATION_ID", "JOURNAL_STREAM", "FDSTORE", "RUNTIME_DIRECTORY", "STATE_DIRECTORY",
                        "CACHE_DIRECTORY", "LOGS_DIRECTORY", "CONFIGURATION_DIRECTORY", "CREDENTIALS_DIRECTORY",
                        "MEMORY_PRESSURE_WATCH", "MEMORY_PRESSURE_WRITE", "SERVICE_RESULT", "EXIT_CODE",
                        "EXIT_STATUS", "MONITOR_EXIT_CODE", "MONITOR_EXIT_STATUS", "MONITOR_SERVICE_RESULT",
                        "MONITOR_INVOCATION_ID", "MONITOR_UNIT", "TRIGGER_UNIT", "TRIGGER_PATH",
                        "TRIGGER_TIMER_REALTIME_USEC", "TRIGGER_TIMER_MONOTONIC_USEC", "REMOTE_ADDR", "REMOTE_PORT"))
#: what of our environment a process running as another user gets
PASSED_TO_USERS = frozenset(("PATH", "LANG", "LANGUAGE", "TZ"))


@dataclass(frozen=True)
class Identity:
    """A user's credentials: uid, primary gid, supplementary groups (and the name, for messages)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    name: str = ""

    @property
    def root(self) -> bool:
        return self.uid == 0

    @classmethod
    def of_uid(cls, uid: int) -> Identity:
        """The identity of the account with ``uid`` (its groups from the user database)."""
        if uid == 0:
            return ROOT
        try:
            entry = pwd.getpwuid(uid)
        except (KeyError, OverflowError):
            raise ConfigError("owner", str(uid), "no user with this uid exists on this host") from None
        return cls(uid, entry.pw_gid, tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))),
                   entry.pw_name)

    @property
    def switches(self) -> bool:
        """True when acting as this identity means switching (we are root, it is not)."""
        return not self.root and os.geteuid() == 0

    def popen_kwargs(self) -> dict[str, Any]:
        """``subprocess.Popen`` arguments that run a child as this identity, with its :meth:`environment`."""
        if not self.switches:
            return {"env": self.environment()}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups), "env": self.environment()}

    def environment(self) -> dict[str, str]:
        """The environment of a VM's process (QEMU, a helper) running as this identity: ours without
        what our service manager meant for us alone (:data:`OURS_ALONE`); for another user only our
        ``PATH``, locale and time zone, and that user's ``HOME``, ``USER`` and ``LOGNAME``.  A UTF-8
        locale where we name none."""
        env = {name: value for name, value in os.environ.items() if name not in OURS_ALONE}
        if self.switches:
            env = {name: value for name, value in env.items() if name in PASSED_TO_USERS or name.startswith("LC_")}
            try:
                env["HOME"] = pwd.getpwuid(self.uid).pw_dir
            except KeyError:
                env["HOME"] = "/"
            if self.name:
                env["USER"] = env["LOGNAME"] = self.name
        env.setdefault("LANG", "C.UTF-8")
        return env

    def unit_properties(self) -> dict[str, Any]:
        """``User=``, ``Group=``, ``SupplementaryGroups=`` of a transient unit running as this identity."""
        if not self.switches:
            return {}
        return {"User": str(self.uid), "Group": str(self.gid), "SupplementaryGroups": [str(g) for g in self.groups]}

    def __str__(self) -> str:
        return f"{self.name or 'uid'} ({self.uid})" if self.name else f"uid {self.uid}"


ROOT = Identity(0, 0, (), "root")


def _set_thread_groups(libc: Any, groups: tuple[int, ...]) -> None:
    import ctypes  # (loaded with ``libc``: proc.libc says why not at the top)

    number = _SYS_SETGROUPS.get(os.uname().machine)
    if number is None:
        raise OSError(f"cannot switch a thread's groups on {os.uname().machine}")
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if libc.syscall(ctypes.c_long(number), ctypes.c_size_t(len(groups)), array) != 0:
        raise libc_error("setgroups")


def _set_fs_ids(libc: Any, uid: int, gid: int) -> None:
    import ctypes  # (loaded with ``libc``)

    libc.setfsgid(ctypes.c_uint(gid))
    libc.setfsuid(ctypes.c_uint(uid))
    # both return the previous value and report no error: ask again (an invalid id changes nothing)
    if libc.setfsuid(ctypes.c_uint(0xFFFFFFFF)) != uid or libc.setfsgid(ctypes.c_uint(0xFFFFFFFF)) != gid:
        raise OSError(f"cannot switch the thread's file-system ids to {uid}:{gid}")


@contextlib.contextmanager
def acting_as(identity: Identity) -> Iterator[None]:
    """File-system accesses of this thread are ``identity``'s for the block (a no-op unless we are
    root and it is not).  Never ``await`` inside."""
    if not identity.switches:
        yield
        return
    lib = libc()
    saved_groups = tuple(os.getgroups())  # this thread's
    _set_thread_groups(lib, identity.groups)
    try:
        _set_fs_ids(lib, identity.uid, identity.gid)
        try:
            yield
        finally:
            _set_fs_ids(lib, 0, 0)
    finally:
        _set_thread_groups(lib, saved_groups)


def connect_as(identity: Identity, path: str) -> socket.socket:
    """A non-blocking stream socket connected to the unix socket ``path`` as ``identity`` would be:
    a path in a user's directory may lead anywhere that user put it, never where only root may go."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with acting_as(identity):
            sock.connect(path)  # a listening unix socket with room in its backlog answers at once
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
