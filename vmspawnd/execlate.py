# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fork early, exec late: the launcher that becomes QEMU.

vmspawnd starts this tiny program first (``python -I -S execlate.py FD``: stdlib only, no site
packages), moves its PID into the VM's scope, and only then sends it, over the SOCK_SEQPACKET
socket FD, one message: JSON ``{"argv": [...], "targets": [n, ...]}`` (and ``"user": [uid, gid,
[groups]]`` for a VM that runs as a user) plus the file descriptors QEMU must inherit
(SCM_RIGHTS), in the order of ``targets``.  The launcher puts each fd at its target number, closes
everything else, becomes the user if one is named, and execs QEMU — same PID, already in the
right cgroup.
If the socket closes without a message (setup failed), it exits quietly.
"""

import json
import os
import socket
import sys

MAX_MESSAGE = 1 << 20
MAX_FDS = 64


def main() -> int:
    channel = socket.socket(fileno=int(sys.argv[1]))
    try:
        data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, MAX_FDS)
    except OSError:
        return 0
    channel.close()
    if not data:
        return 0
    message = json.loads(data)
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
    os.execv(argv[0], argv)
    return 127


if __name__ == "__main__":
    sys.exit(main())
