# SPDX-License-Identifier: LGPL-2.1-or-later
"""Shared fixtures: the test guest (built once per session) and a vmspawn runner."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import rawvarlink
from tests.polling import poll
from vmspawnd.proc import process_state, processes_mentioning, processes_using
from vmspawnd.qemu.accel import VERSION_CACHE
from vmspawnd.qemu.vsock import BACKEND_ENV, find_backend
from vmspawnd.testing.guest import STEADY_CLOCK, TestGuest, build_guest

VMSPAWN = [sys.executable, "-m", "vmspawnd.cli.vmspawn"]

# With vhost-device-vsock installed, --vsock=auto gives every guest a vsock and its notifications go
# there.  The VM tests keep them on virtio-serial, as they were written; tests/vm/test_vsock.py
# turns the backend on for its VMs (and daemons) with the ``vsock_backend`` fixture.
os.environ.setdefault(BACKEND_ENV, "")


#: where the daemons of tests live (pytest's base directories, and public_daemon's)
TEST_DAEMON_ROOTS = (f"{tempfile.gettempdir()}/pytest-of-", f"{tempfile.gettempdir()}/vmspawnd-public-")


def pytest_sessionstart(session: pytest.Session) -> None:
    """End what the daemons of an earlier, killed test run left running (a failed run cleans up;
    a killed one cannot, and its daemons have sessions of their own): a test daemon whose pytest is
    gone, and the VMs and helpers under its directory.  Another run's daemons are its children."""
    for pid in processes_mentioning("vmspawnd.cli.vmspawnd --socket="):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_argv = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        sockets = [a.decode(errors="replace").removeprefix("--socket=") for a in argv if a.startswith(b"--socket=")]
        if not sockets or not sockets[0].startswith(TEST_DAEMON_ROOTS) or b"pytest" in parent_argv:
            continue
        base = str(Path(sockets[0]).parent)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for left in processes_mentioning(base):
            if left != pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(left, signal.SIGKILL)


@pytest.fixture
def vsock_backend(monkeypatch) -> Path:
    """vhost-device-vsock for the VMs (and daemons) this test starts; skipped where it is not installed."""
    monkeypatch.delenv(BACKEND_ENV)
    found = find_backend()
    if found is None:
        pytest.skip("vhost-device-vsock is not installed (make setup installs it)")
    monkeypatch.setenv(BACKEND_ENV, str(found))
    return found


@pytest.fixture
def no_tmpfile(monkeypatch) -> None:
    """``os.open`` in this process refuses ``O_TMPFILE`` as a file system without it does (vfat, some
    network file systems; every one this machine has supports it, so the answer is simulated)."""
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


@pytest.fixture(scope="session")
def guest() -> TestGuest:
    """The busybox test guest (Debian cloud kernel + initramfs), built or taken from the cache."""
    return build_guest(log=lambda *a: None)


class NotifyListener:
    """A $NOTIFY_SOCKET like a service manager's: records every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _receive_pending(self) -> None:
        """Record every datagram waiting in the socket (under the lock: no message is half-recorded)."""
        with self._lock:
            while True:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    return
                for line in data.decode(errors="replace").splitlines():
                    self.messages.append((time.monotonic(), line))

    def _run(self) -> None:
        while not self._stop:
            try:
                select.select([self.sock], [], [], 0.2)
                self._receive_pending()
            except (OSError, ValueError):  # closed
                return

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def settle(self) -> None:
        """Once the sender has exited: record what it sent that is still waiting in the socket."""
        self._receive_pending()

    def wait_for(self, line: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.lines():
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def _drain(stream, into: bytearray) -> threading.Thread:
    """Read ``stream`` into ``into`` as it comes, so a chatty guest never blocks on a full pipe."""
    def run() -> None:
        while chunk := stream.read1(65536):
            into.extend(chunk)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@dataclass
class VmRun:
    """A vmspawn process started by a test, with its notify socket and runtime dir."""

    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    runtime_dir: Path
    output: bytearray = field(default_factory=bytearray)
    errors: bytearray = field(default_factory=bytearray)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._readers = [_drain(self.proc.stdout, self.output), _drain(self.proc.stderr, self.errors)]

    def wait(self, timeout: float = 60) -> int:
        """Wait for the exit and for the last output and notify messages."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            for reader in self._readers:
                reader.join(10)
        self.notify.settle()
        return self.proc.returncode

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace") + self.errors.decode(errors="replace")

    def leader_pid(self) -> int | None:
        for line in self.notify.lines():
            if line.startswith("X_VMSPAWN_LEADER_PID="):
                return int(line.split("=", 1)[1])
        return None


@pytest.fixture
def vmspawn(guest: TestGuest, tmp_path: Path) -> Iterator:
    """Start ``vmspawn --linux=<guest> …`` (without ``kernel``: no --linux, no --initrd) in the background;
    everything is cleaned up after."""
    runs: list[VmRun] = []

    def start(*args: str, name: str = "testvm", ram: str = "256M", console: str | None = "read-only",
              env: dict[str, str] | None = None, firmware: str = "bios", kernel: bool = True) -> VmRun:
        rundir = tmp_path / f"run-{len(runs)}"
        rundir.mkdir(mode=0o700)
        notify = NotifyListener(tmp_path / f"notify-{len(runs)}.sock")
        environ = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "RUNTIME_DIRECTORY": str(rundir),
                   **(env or {})}
        environ.pop("TERM", None)
        argv = [*VMSPAWN, *([f"--linux={guest.kernel}", f"--initrd={guest.initrd}"] if kernel else []), f"--ram={ram}",
                *([f"--console={console}"] if console else []), f"--firmware={firmware}", "-M", name, "panic=-1",
                *STEADY_CLOCK, *args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=environ)
        run = VmRun(proc, notify, rundir)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        run.notify.close()


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie whose parent is not ours to reap counts as gone)."""
    return process_state(pid) in (None, "Z", "X")


def assert_clean(run: VmRun) -> None:
    """No QEMU or helper left (killed ones may take a moment to go), and the machine's runtime dir removed
    (what stays in the runtime base is the host's QEMU version, kept for the next run)."""
    poll(lambda: processes_using(run.runtime_dir), lambda pids: pids == [], 10)
    assert [p.name for p in run.runtime_dir.iterdir() if p.name != VERSION_CACHE] == []


CTL = [sys.executable, "-m", "vmspawnd.cli.vmspawnctl"]


class Daemon:
    """A vmspawnd started on private paths, restartable, with a vmspawnctl helper."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "vmspawnd.sock"
        self.state = base / "state"
        self.runtime = base / "run"
        self.log = base / "vmspawnd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # extra environment for the next start()
        self.args: list[str] = []  # extra options for the next start()
        self.nofile: int | None = None  # RLIMIT_NOFILE (soft and hard) for the next start()
        self.pass_fds: tuple[int, ...] = ()  # descriptors the next start() leaves open (inherited)

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmspawnd.cli.vmspawnd", f"--socket={self.socket}",
                 f"--state-dir={self.state}", f"--runtime-dir={self.runtime}", *self.args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **self.env}, preexec_fn=self._limit_fds if self.nofile else None,
                pass_fds=self.pass_fds)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.socket.exists() and self.ctl("list").returncode == 0:
                return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError("vmspawnd did not come up: " + self.log.read_text())

    def _limit_fds(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def fds(self) -> int:
        """How many file descriptors the daemon holds."""
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def spare_launchers(self) -> list[int]:
        """The daemon's exec-late launchers waiting for a QEMU to become."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children if "execlate.py" in Path(f"/proc/{pid}/cmdline").read_text()]

    def rss(self) -> int:
        """The daemon's resident memory, in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def ctl_argv(self) -> list[str]:
        return [*CTL, f"--address={self.socket}"]

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ctl_argv(), *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def status(self, name: str) -> dict:
        p = self.ctl("--json", "status", name)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def wait_for(self, name: str, predicate, timeout: float = 60) -> dict:
        return poll(lambda: self.status(name), predicate, timeout)

    def clean_up(self) -> None:
        """Leave nothing behind: kill every running VM, stop the daemon, end what is left of them."""
        if self.proc is not None and self.proc.poll() is None:
            listed = self.ctl("--json", "list").stdout
            for machine in json.loads(listed) if listed else []:
                if machine["state"] == "running":
                    self.ctl("kill", machine["name"])
            self.stop_daemon()
        for pid in processes_mentioning(str(self.base)):
            os.kill(pid, signal.SIGKILL)

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.clean_up()


@contextlib.contextmanager
def tempdir_daemon(*args: str, prefix: str = "vmspawnd-", public: bool = False) -> Iterator[Daemon]:
    """A daemon (started with ``args``) in a new directory of /tmp, whose paths are as long in every run
    (pytest's tmp_path grows with its run counter); ``public``: one every user may enter (pytest's
    tmp_path sits in a 0700 one, where a VM running as another user could not reach its runtime
    directory)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    if public:
        base.chmod(0o755)
    d = Daemon(base)
    d.args = list(args)
    d.start()
    try:
        yield d
    finally:
        d.clean_up()
        shutil.rmtree(base, ignore_errors=True)


def public_daemon(*args: str) -> contextlib.AbstractContextManager[Daemon]:
    """A daemon (started with ``args``) in a directory every user may enter."""
    return tempdir_daemon(*args, prefix="vmspawnd-public-", public=True)


class EventFollower:
    """``vmspawnctl --json events [NAME]`` in the background (``with``), subscribed once made: the
    events it printed so far, parsed."""

    def __init__(self, daemon: Daemon, name: str | None = None) -> None:
        self._proc = subprocess.Popen([*daemon.ctl_argv(), "--json", "events", *([name] if name else [])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self._proc.stdout or ()), daemon=True)
        said = self._proc.stderr.readline() if self._proc.stderr else ""
        if "Watching" not in said:  # (from here on nothing is missed)
            self.close()
            raise AssertionError(f"vmspawnctl events did not subscribe: {said}")
        self._reader.start()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self._lines)]

    def kinds(self) -> list[str]:
        return [event["event"] for event in self.events()]

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)
        if self._reader.is_alive():
            self._reader.join(10)

    def __enter__(self) -> EventFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()




# ----------------------------------------------------------------------------- other callers
def call_as(uid: int, socket_path: Path, method: str, parameters: dict | None = None,
            gid: int | None = None) -> dict:
    """One varlink call on ``socket_path`` by a process of ``uid`` (setpriv, no supplementary groups)."""
    gid = uid if gid is None else gid
    p = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "/usr/bin/python3", "-c",
                        Path(rawvarlink.__file__).read_text(), str(socket_path), method,
                        json.dumps(parameters or {})],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path sits in a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="vmspawnd-public-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
