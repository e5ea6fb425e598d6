# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fork early, exec late: the launcher keeps its PID and gets exactly the fds we send."""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import process_gone
from tests.polling import poll
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


REPORT_STDIN = "import os,sys; print(os.getpid(), os.readlink('/proc/self/fd/0'), flush=True); sys.exit(3)"


@pytest.mark.parametrize("keep_stdin", [False, True])
async def test_qemu_gets_our_stdin_only_when_asked(keep_stdin, tmp_path):
    """A launcher starts before anyone knows the console mode (vmspawn starts it first thing) and has
    our stdin: QEMU gets it only for --console=native, else /dev/null."""
    ours = tmp_path / "stdin"
    ours.touch()
    saved, fd = os.dup(0), os.open(ours, os.O_RDONLY)
    os.dup2(fd, 0)
    try:
        proc = QemuProcess.fork_early(die_with_parent=True)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(fd)
    out_r, out_w = os.pipe()
    try:
        proc.exec(["/usr/bin/env", "python3", "-c", f"import os; os.dup2({out_w}, 1); {REPORT_STDIN}"], [out_w],
                  keep_stdin=keep_stdin)
        os.close(out_w)
        assert await asyncio.wait_for(proc.wait(), 10) == 3  # reaped: its exit status is ours to see
        reported_pid, stdin = os.read(out_r, 1000).decode().split()
    finally:
        os.close(out_r)
    assert int(reported_pid) == proc.pid
    assert stdin == (str(ours) if keep_stdin else "/dev/null")


async def test_a_launcher_that_died_before_its_start_is_reaped_and_replaced():
    early = QemuProcess.fork_early(die_with_parent=True)
    os.kill(early.pid, signal.SIGKILL)
    poll(lambda: Path(f"/proc/{early.pid}/stat").read_text().split(") ")[1][0], lambda s: s == "Z", 10)
    proc = QemuProcess.reuse_or_fork(early, die_with_parent=True)
    assert proc is not early and not Path(f"/proc/{early.pid}").exists()  # no zombie left behind
    proc.exec(["/bin/true"])
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    waiting = QemuProcess.fork_early(die_with_parent=True)
    assert QemuProcess.reuse_or_fork(waiting, die_with_parent=True) is waiting  # one that waits is used
    waiting.cancel()
    assert await asyncio.wait_for(waiting.wait(), 10) == 0


PARENT = """
import sys
from vmspawnd.launcher import QemuProcess
proc = QemuProcess.fork_early(die_with_parent=sys.argv[1] == "yes")
proc.exec(["/bin/sleep", "60"])
print(proc.pid, flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_qemu_dies_with_its_parent_only_when_asked(die_with_parent):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "yes" if die_with_parent else "no"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    try:
        poll(lambda: Path(f"/proc/{pid}/cmdline").read_bytes(), lambda c: c.startswith(b"/bin/sleep"), 10)
        parent.kill()
        parent.wait()
        if die_with_parent:
            assert poll(lambda: process_gone(pid), bool, 10)  # SIGTERM when vmspawn died
        else:
            time.sleep(0.5)
            assert not process_gone(pid)  # a daemon's VMs outlive it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("keep_stdin", [False, True])
async def test_a_qemu_spawned_at_once_gets_the_fds_at_our_numbers_a_session_and_default_signals(keep_stdin):
    """Where nothing is done to QEMU's process before it runs, it is spawned without a launcher: it
    must still get what a launched one gets."""
    a, b = socket.socketpair()
    fd = b.fileno()
    report = f"readlink /proc/self/fd/0 >&{fd}; exec cat /proc/self/status >&{fd}"  # (cat: same pid as bash)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        proc = QemuProcess.spawn(["/bin/bash", "-c", report], [fd], keep_stdin=keep_stdin)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    b.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0  # ours to reap, with its exit status
    stdin, *status_lines = a.makefile().read().splitlines()
    a.close()
    status = dict(line.split(":\t", 1) for line in status_lines)
    assert int(status["Pid"]) == proc.pid and int(status["NSsid"]) == proc.pid  # a session of its own
    assert stdin == (os.readlink("/proc/self/fd/0") if keep_stdin else "/dev/null")
    assert not int(status["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1))  # (we ignore SIGPIPE; QEMU must not)
    assert int(status["SigBlk"], 16) == 0  # (nor inherit what the spawning thread blocked)


def test_a_qemu_that_cannot_be_spawned_raises_at_once(tmp_path):
    with pytest.raises(PermissionError):
        QemuProcess.spawn([str(tmp_path)])  # a directory: not executable


def test_a_qemu_that_cannot_be_watched_for_want_of_fds_is_not_left_running():
    # Out of fds, the process is spawned but no pidfd can watch it: it is killed and reaped, and the
    # start fails (else it would run on, unwatched, while its machine is reported failed)
    script = """
import errno, os, resource
from vmspawnd.launcher import QemuProcess
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open('/dev/null', os.O_RDONLY))
except OSError:
    pass
try:
    QemuProcess.spawn(['/bin/sleep', '60'], keep_stdin=True)
    print('watched')
except OSError as e:
    print('failed', errno.errorcode[e.errno])
for fd in held:
    os.close(fd)
children = open(f'/proc/self/task/{os.getpid()}/children').read().split()
print('children:', len(children))
for pid in children:  # (a child left running would also hold our output open)
    os.kill(int(pid), 9)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["failed EMFILE", "children: 0"], out.stdout + out.stderr
