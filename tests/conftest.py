"""Shared fixtures: the test guest (built once per session) and a vmspawn runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmspawnd.testing.guest import TestGuest, build_guest

VMSPAWN = [sys.executable, "-m", "vmspawnd.cli.vmspawn"]


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
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

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


@dataclass
class VmRun:
    """A vmspawn process started by a test, with its notify socket and runtime dir."""

    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    runtime_dir: Path
    output: bytes = b""
    errors: bytes = b""
    extra: dict = field(default_factory=dict)

    def wait(self, timeout: float = 60) -> int:
        try:
            self.output, self.errors = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output, self.errors = self.proc.communicate()
            raise
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
    """Start ``vmspawn --linux=<guest> …`` in the background; everything is cleaned up after."""
    runs: list[VmRun] = []

    def start(*args: str, name: str = "testvm", ram: str = "256M", console: str = "read-only",
              env: dict[str, str] | None = None) -> VmRun:
        rundir = tmp_path / f"run-{len(runs)}"
        rundir.mkdir(mode=0o700)
        notify = NotifyListener(tmp_path / f"notify-{len(runs)}.sock")
        environ = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "RUNTIME_DIRECTORY": str(rundir),
                   **(env or {})}
        environ.pop("TERM", None)
        argv = [*VMSPAWN, f"--linux={guest.kernel}", f"--initrd={guest.initrd}", f"--ram={ram}",
                f"--console={console}", "-M", name, "panic=-1", *args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=environ)
        run = VmRun(proc, notify, rundir)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()
        run.notify.close()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (e.g. a runtime dir): nothing may be left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found
