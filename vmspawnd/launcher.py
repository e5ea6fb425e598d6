# SPDX-License-Identifier: LGPL-2.1-or-later
"""Start QEMU and watch it: a child we reap, or (after a daemon restart) a process we adopt.

QEMU is exec'd late by a launcher (execlate.py) where something must be done to its process before
its first instruction (moved into a scope, switched to another user, bound to die with us), and
spawned at once where nothing must (:meth:`QemuProcess.spawn`: a launcher's wake-up and exec cost
≈ 0.9 ms here, a spawn ≈ 0.5)."""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import signal
import socket
from collections.abc import Sequence

from vmspawnd.execlate import spawn
from vmspawnd.futures import resolve
from vmspawnd.identity import ROOT, Identity


class SpawnedChild:
    """A child we started (``execlate.spawn``), reaped as :class:`subprocess.Popen` reaps its own."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        returncode = self._reap(0)
        assert returncode is not None
        return returncode

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped by someone else: its status is lost (as Popen says, 0)
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class QemuProcess:
    """A running QEMU: its pid, a pidfd to wait on, and (for our own child) its exit status."""

    def __init__(self, pid: int, child: SpawnedChild | None) -> None:
        self.pid = pid
        self._child = child  # ours to reap; None for a QEMU we adopted
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # (no fd left, or no pidfds): a child of ours that cannot be watched must not run on
            if child is not None:
                os.kill(pid, signal.SIGKILL)  # (not reaped yet, so the pid is still this child's)
                child.wait()
            raise
        self.returncode: int | None = None
        self._channel: socket.socket | None = None
        self._waiter: asyncio.Task[int | None] | None = None

    @classmethod
    def fork_early(cls, *, die_with_parent: bool) -> QemuProcess:
        """Start the exec-late launcher: a process that waits for QEMU's argv and fds (see execlate.py).
        ``die_with_parent``: it (and QEMU) gets SIGTERM when we die."""
        return cls.spawned(*spawn(parent=os.getpid() if die_with_parent else None))

    @classmethod
    def reuse_or_fork(cls, launcher: QemuProcess | None, *, die_with_parent: bool) -> QemuProcess:
        """``launcher`` (one started ahead of need) if it still waits, else a fresh one (a dead one is
        reaped and let go)."""
        if launcher is not None and launcher.alive:
            return launcher
        if launcher is not None:
            launcher.close()
        return cls.fork_early(die_with_parent=die_with_parent)

    @classmethod
    def spawn(cls, argv: Sequence[str], fds: Sequence[int] = (), keep_stdin: bool = False,
              output: int | None = None) -> QemuProcess:
        """Start QEMU now, without a launcher: in a session of its own, with ``fds`` at the same numbers
        as ours and nothing else of ours (every other fd of ours is close-on-exec), stdin /dev/null unless
        ``keep_stdin``, stdout and stderr ``output`` if given (else ours), and signals at their defaults,
        none blocked.  Raises OSError if it cannot be exec'd."""
        actions: list[tuple] = [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in fds]  # (same number: inherited)
        if not keep_stdin:
            actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        if output is not None:
            actions += [(os.POSIX_SPAWN_DUP2, output, 1), (os.POSIX_SPAWN_DUP2, output, 2)]
        env = ROOT.environment()  # (as we are: a spawned QEMU is never another user's)
        pid = os.posix_spawn(argv[0], list(argv), env, file_actions=actions, setsid=True,
                             setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        return cls(pid, SpawnedChild(pid))

    @classmethod
    def spawned(cls, pid: int, channel_fd: int) -> QemuProcess:
        """The launcher ``execlate.spawn`` started: ``pid``, and ``channel_fd``, our end of its socket."""
        try:
            process = cls(pid, SpawnedChild(pid))
        except OSError:
            os.close(channel_fd)
            raise
        process._channel = socket.socket(fileno=channel_fd)
        return process

    def exec(self, argv: Sequence[str], fds: Sequence[int] = (), identity: Identity = ROOT,
             keep_stdin: bool = False, output: int | None = None) -> None:
        """Make the early-forked launcher exec QEMU with ``fds`` at the same numbers as ours; QEMU's
        stdin is /dev/null unless ``keep_stdin``, its stdout and stderr ``output`` if given (else the
        launcher's, which are ours)."""
        assert self._channel is not None, "exec() is for processes started with fork_early()"
        sent, targets = list(fds), list(fds)
        devnull = -1
        if not keep_stdin:
            devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            sent.append(devnull)
            targets.append(0)
        if output is not None:
            sent += [output, output]
            targets += [1, 2]
        request: dict[str, object] = {"argv": list(argv), "targets": targets, "env": identity.environment()}
        if identity.switches:  # the launcher becomes this user just before it execs QEMU
            request["user"] = [identity.uid, identity.gid, list(identity.groups)]
        try:
            socket.send_fds(self._channel, [marshal.dumps(request)], sent)
        finally:
            self._channel.close()
            self._channel = None
            if devnull >= 0:
                os.close(devnull)

    def cancel(self) -> None:
        """Abandon an early-forked launcher before exec: it exits on its own."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @classmethod
    def adopt(cls, pid: int) -> QemuProcess:
        """Watch a QEMU we did not start (raises ProcessLookupError if it is gone)."""
        return cls(pid, None)

    async def wait(self) -> int | None:
        """Wait for the exit; return the status (negative = signal), None when not ours to reap.
        Any number of callers may wait at once."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_task(self._wait_once())
        return await asyncio.shield(self._waiter)

    async def _wait_once(self) -> int | None:
        if self.returncode is not None or self._pidfd < 0:
            return self.returncode
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pidfd = self._pidfd
        loop.add_reader(pidfd, lambda: resolve(done))
        try:
            await done
        finally:
            if self._pidfd == pidfd:  # else close() already removed it (the number may be reused)
                loop.remove_reader(pidfd)
        if self._child is not None:
            self.returncode = self._child.wait()
        self._close_pidfd()
        return self.returncode

    async def end(self) -> int | None:
        """Kill the process if it still runs (the launcher or QEMU), reap it, return its status."""
        self.cancel()
        if self.alive:
            self.send_signal(signal.SIGKILL)
        return await self.wait()

    def close(self) -> None:
        """Let go of the process without touching it: release the pidfd and the launcher channel."""
        self.cancel()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    @property
    def alive(self) -> bool:
        if self._pidfd < 0:
            return False
        if self._child is not None:
            self.returncode = self._child.poll()
            return self.returncode is None
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
            return True
        except ProcessLookupError:
            return False

    def send_signal(self, sig: int) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)


class SpareLauncher:
    """One exec-late launcher started ahead of need (the daemon's), so a Start never waits for the
    launcher's interpreter to come up: :meth:`take` hands it out and starts the next one.

    A spare is a plain launcher: no parent-death signal (VMs outlive the daemon), the daemon's
    stdout and stderr (QEMU's stdin is /dev/null).  If the daemon dies, the launcher's socket closes
    and it exits.
    """

    def __init__(self) -> None:
        self._spare: QemuProcess | None = None

    def take(self) -> QemuProcess:
        """The spare launcher (a fresh one if there is none)."""
        spare, self._spare = self._spare, None
        return QemuProcess.reuse_or_fork(spare, die_with_parent=False)  # the taker refill()s later

    def refill(self) -> None:
        """Start the next spare (if there is none)."""
        if self._spare is None:
            self._spare = QemuProcess.fork_early(die_with_parent=False)

    def close(self) -> None:
        """Let the spare go: it exits as its socket closes."""
        if self._spare is not None:
            self._spare.close()
            self._spare = None
