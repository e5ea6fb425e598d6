# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fork early, exec late: the launcher keeps its PID and gets exactly the fds we send."""

import asyncio
import os
import socket

from vmspawnd.launcher import QemuProcess


async def test_exec_late_keeps_the_pid_and_places_the_fds():
    proc = QemuProcess.fork_early(die_with_parent=True)
    pid = proc.pid
    a, b = socket.socketpair()
    stray = os.open("/dev/null", os.O_RDONLY)  # not sent: the child must not see it
    script = ("import os,sys; "
              f"os.write(int(sys.argv[1]), f'{{os.getpid()}} {{os.path.exists(\"/proc/self/fd/{stray}\")}}'.encode())")
    proc.exec(["/usr/bin/env", "python3", "-c", script, str(b.fileno())], [b.fileno()])
    b.close()
    assert await proc.wait() == 0
    reported_pid, stray_visible = a.recv(1000).decode().split(" ", 1)
    a.close()
    os.close(stray)
    assert int(reported_pid) == pid  # the launcher became the program: same PID, so same cgroup
    assert stray_visible == "False"


async def test_cancel_before_exec_ends_the_launcher_quietly():
    proc = QemuProcess.fork_early(die_with_parent=True)
    await asyncio.sleep(0.05)
    proc.cancel()
    assert await asyncio.wait_for(proc.wait(), 10) == 0
