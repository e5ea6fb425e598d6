# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fork early, exec late: the launcher that becomes QEMU.

vmspawnd starts this tiny program first (``python -I -S execlate.py FD [PARENT]``: no site
packages, and no Python module beyond those the interpreter starts with, so it is ready about
as soon as a bare interpreter), moves its PID into the VM's scope, and only then sends it, over the SOCK_SEQPACKET
socket FD, one message: a :mod:`marshal`-ed dict ``{"argv": [...], "targets": [n, ...], "env": {...}}``
(and ``"user": [uid, gid, [groups]]`` for a VM that runs as a user) plus the file descriptors QEMU must
inherit (SCM_RIGHTS), in the order of ``targets``.  The launcher puts each fd at its target number,
closes everything else, becomes the user if one is named, and execs QEMU with ``env`` — same PID, already in
the right cgroup.  (marshal, not JSON: both ends are the same interpreter, and importing json took
longer than the rest of the launcher.)

With PARENT (the pid of the process that started it), the launcher, and so QEMU, gets SIGTERM when
that process dies (PR_SET_PDEATHSIG, set here rather than between fork and exec, which would make
the parent fork instead of vfork).
If the socket closes without a message (setup failed), it exits quietly.

:func:`spawn` starts one (``posix_spawn``, without the :mod:`subprocess` module, so that ``vmspawn``
can start one before it imports the rest of its modules: cli/vmspawn.py).
"""

import _signal
import _socket
import array
import marshal
import os
import sys

MAX_MESSAGE = 1 << 20
MAX_FDS = 64
PR_SET_PDEATHSIG = 1


def spawn(parent: int | None = None) -> tuple[int, int]:
    """Start a launcher in a session of its own, with our standard fds and environment (QEMU gets the
    one it is sent), dying with ``parent`` if given: (its pid, the fd of our end of its socket,
    close-on-exec)."""
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        os.set_inheritable(theirs.fileno(), True)
        argv = [sys.executable, "-I", "-S", __file__, str(theirs.fileno())]
        if parent is not None:
            argv.append(str(parent))
        pid = os.posix_spawn(sys.executable, argv, os.environ, setsid=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return pid, ours.detach()


def die_with(parent: int) -> bool:
    """Get SIGTERM when ``parent`` dies; False if it is gone already."""
    import ctypes  # only for a launcher that dies with its parent (vmspawn's)

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, _signal.SIGTERM)
    return os.getppid() == parent  # else it died before the prctl, and nothing will tell us


def receive(fd: int) -> tuple[bytes, list[int]]:
    """The one message on ``fd`` and the descriptors that came with it (b"" once the sender is gone)."""
    channel = _socket.socket(fileno=fd)
    fds = array.array("i")
    try:
        data, ancdata, _, _ = channel.recvmsg(MAX_MESSAGE, _socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    except OSError:
        return b"", []
    finally:
        channel.close()
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def main() -> int:
    if len(sys.argv) > 2 and not die_with(int(sys.argv[2])):
        return 0
    data, fds = receive(int(sys.argv[1]))
    if not data:
        return 0
    message = marshal.loads(data)
    argv, targets = message["argv"], message["targets"]
    if len(fds) != len(targets):
        print(f"execlate: expected {len(targets)} fds, got {len(fds)}", file=sys.stderr)
        return 1
    # move received fds out of the way of every target, then into place
    high = max([*targets, *fds, 2]) + 1
    moved = [os.dup2(fd, high + i, inheritable=False) for i, fd in enumerate(fds)]
    for fd in fds:
        os.close(fd)
    for src, dst in zip(moved, targets, strict=True):
        os.dup2(src, dst, inheritable=True)
    keep = {0, 1, 2, *targets}
    for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    user = message.get("user")
    if user:
        uid, gid, groups = user
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.execve(argv[0], argv, message["env"])
    return 127


if __name__ == "__main__":
    sys.exit(main())
