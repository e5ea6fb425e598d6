# SPDX-License-Identifier: LGPL-2.1-or-later
"""The exec-stamping wrapper (bench/execstamp.c, built static): first on ``$PATH`` under QEMU's name,
it writes ``PID NS ARGV1`` (CLOCK_MONOTONIC) to ``$EXECSTAMP_FILE`` and execs the real QEMU
(``$EXECSTAMP_REAL``), so a bench learns the moment of QEMU's exec without ptrace; and
:func:`vmspawn_runs`, which times ``vmspawn`` around QEMU's exec and exit with it."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from vmspawnd.qemu.accel import find_qemu
from vmspawnd.testing.guest import GUEST_WORDS

REPO = Path(__file__).resolve().parents[1]


class Stamps:
    """The exec-stamping wrapper in ``directory`` and what it wrote to ``file``."""

    def __init__(self, directory: Path, file: Path, real: Path) -> None:
        self.dir, self.file = directory, file
        self.binary = directory / real.name
        self.env = {**os.environ, "PATH": f"{directory}:{os.environ['PATH']}", "EXECSTAMP_FILE": str(file),
                    "EXECSTAMP_REAL": str(real)}

    @classmethod
    def build(cls, tmp: Path) -> Stamps:
        """Build the wrapper for this host's QEMU into ``tmp/bin`` (it stamps into ``tmp/stamps``)."""
        real = find_qemu()
        directory = tmp / "bin"
        directory.mkdir()
        subprocess.run(["gcc", "-O2", "-static", "-o", str(directory / real.name), str(REPO / "bench/execstamp.c")],
                       check=True)
        return cls(directory, tmp / "stamps", real)

    def clear(self) -> None:
        self.file.unlink(missing_ok=True)

    def qemu_exec(self, timeout: float = 30) -> tuple[int, int]:
        """(pid, ns) of the QEMU exec (not a ``--version`` probe), waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.file.exists():
                for line in self.file.read_text().splitlines():
                    pid, ns, arg = line.split(" ", 2)
                    if arg != "--version":
                        return int(pid), int(ns)
            time.sleep(0.001)
        raise TimeoutError("QEMU was not exec'd")


def vmspawn_runs(stamps: Stamps, guest, runs: int, tpm: str = "no") -> tuple[list[float], list[float]]:
    """ms from ``vmspawn``'s exec to QEMU's, and from QEMU's exit to vmspawn's, per run
    (``tpm``: its --tpm=, with a fresh state each run where it is on).  A run that fails raises,
    and leaves no ``vmspawn`` behind (its QEMU dies with it)."""
    vmspawn = Path(sys.executable).with_name("vmspawn")
    argv = [str(vmspawn), f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M", "--firmware=bios",
            "--console=headless", f"--tpm={tpm}", *(["--tpm-state=off"] if tpm != "no" else []), "--vsock=no",
            "--machine=benchfg", *GUEST_WORDS, "test.action=poweroff"]
    to_exec, to_gone = [], []
    for _ in range(runs):
        stamps.clear()
        start = time.monotonic_ns()
        proc = subprocess.Popen(argv, env=stamps.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)
        try:
            pid, exec_ns = stamps.qemu_exec()
            to_exec.append((exec_ns - start) / 1e6)
            qemu_fd = os.pidfd_open(pid)
            tool_fd = os.pidfd_open(proc.pid)
            try:
                if not select.select([qemu_fd], [], [], 120)[0]:
                    raise TimeoutError("the guest did not power off within 120 s")
                qemu_gone = time.monotonic_ns()
                if not select.select([tool_fd], [], [], 30)[0]:
                    raise TimeoutError("vmspawn did not exit within 30 s of QEMU")
                to_gone.append((time.monotonic_ns() - qemu_gone) / 1e6)
            finally:
                os.close(qemu_fd)
                os.close(tool_fd)
            assert proc.wait(30) == 0, proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return to_exec, to_gone
