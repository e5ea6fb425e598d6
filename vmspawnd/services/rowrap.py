# SPDX-License-Identifier: LGPL-2.1-or-later
"""Run a command with one directory made read-only in a private mount namespace.

``python -I -S rowrap.py SRC -- COMMAND ARGS…`` (or ``python -m vmspawnd.services.rowrap``):

1. ``unshare(CLONE_NEWNS)``: a mount namespace of our own (copies the host's mounts);
2. make every mount in it private, so nothing propagates back to the host;
3. bind-mount SRC onto itself and make that mount read-only (with its submounts, through
   ``mount_setattr(AT_RECURSIVE)`` where the kernel has it; otherwise a non-recursive bind,
   which hides submounts instead of exposing them writable);
4. ``execv`` COMMAND: it, and any namespace it creates later, sees SRC read-only.

This is how a ``--bind-ro`` share is enforced on the host side for a virtiofsd that has no
read-only option of its own (QEMU's C virtiofsd): whatever the guest does, even
``mount -o remount,rw``, writes end in EROFS in virtiofsd.  Standard library only, no shell,
so it starts fast and runs as a transient unit's ExecStart too.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2
#: statvfs ST_* flags have the same values as the MS_* flags they report.
KEPT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME

SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the table unification)
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x00000001
EXIT_SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    rc = _libc.mount(os.fsencode(source) if source else None, os.fsencode(target), None, flags, None)
    _check(rc, f"mount {source or ''} {target} (flags {flags:#x})")


def _unshare_mount_namespace() -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(CLONE_NEWNS)
    else:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")


def _recursive_readonly(path: str) -> bool:
    """mount_setattr(path, AT_RECURSIVE, MOUNT_ATTR_RDONLY); False if the kernel lacks it."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    rc = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-100), os.fsencode(path),
                       ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if rc == 0:
        return True
    if ctypes.get_errno() in (38, 22):  # ENOSYS (old kernel), EINVAL (unknown flag)
        return False
    _check(rc, f"mount_setattr {path} read-only")
    return False


def make_read_only(source: str, legacy: bool = False) -> None:
    """In a new private mount namespace, make ``source`` (and what is mounted below it) read-only.

    ``legacy`` forces the path taken on kernels without mount_setattr (before 5.12), for tests.
    """
    _unshare_mount_namespace()
    _mount(None, "/", MS_REC | MS_PRIVATE)
    _mount(source, source, MS_BIND | MS_REC)
    if not legacy and _recursive_readonly(source):
        return
    # Old kernel: a plain bind hides submounts (so none can stay writable), then remount it
    # read-only, keeping the flags a remount must not drop (nosuid, nodev, ... may be locked).
    _check(_libc.umount2(os.fsencode(source), MNT_DETACH), f"umount {source}")
    _mount(source, source, MS_BIND)
    kept = os.statvfs(source).f_flag & KEPT_FLAGS
    _mount(None, source, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--" or not argv[1].startswith("/") or not argv[3].startswith("/"):
        print(f"usage: {argv[0]} /ABSOLUTE/SOURCE -- /ABSOLUTE/COMMAND [ARGS...]", file=sys.stderr)
        return 2
    source, command = os.path.realpath(argv[1]), argv[3:]
    try:
        make_read_only(source, legacy=os.environ.get("VMSPAWND_ROWRAP_LEGACY") == "1")
    except OSError as e:
        print(f"rowrap: cannot make {source} read-only: {e}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    try:
        os.execv(command[0], command)
    except OSError as e:
        print(f"rowrap: cannot execute {command[0]}: {e.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
