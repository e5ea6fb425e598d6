# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon the benchmarks drive: a vmspawnd on private paths (its runtime directory on a tmpfs,
as /run is on a host), the test guest's definition, and Start → QEMU exec timed with the exec stamp
(bench/stamps.py).  Used on the host (bench/latency.py) and inside the forky tree (bench/peer.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.stamps import Stamps
from tests.rawvarlink import call
from tests.systemd.container import children
from vmspawnd.testing.guest import GUEST_WORDS

IDLE = 0.3  # s before each Start: the daemon idles between requests
TPM_SETTLE = 4.0  # the daemon makes its next spare TPM state 2 s after a start; swtpm_setup takes ≈ 0.5 s


def runtime_base() -> Path:
    """A fresh directory on a tmpfs (mounted for it when we are root), else in /run or /tmp."""
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="vmspawnd-bench-"))
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", str(base)], check=True)
        return base
    return Path(tempfile.mkdtemp(prefix="vmspawnd-bench-", dir="/run" if os.access("/run", os.W_OK) else None))


def release_runtime_base(base: Path) -> None:
    if os.path.ismount(base):
        subprocess.run(["umount", "--lazy", str(base)], check=False)
    shutil.rmtree(base, ignore_errors=True)


def poll_call(sock: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            call(sock, "org.varlink.service.GetInfo")
            return
        time.sleep(0.05)
    raise TimeoutError("the daemon did not answer")


@contextlib.contextmanager
def bench_daemon(state: Path | None = None, env: dict[str, str] | None = None
                 ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A vmspawnd answering on a socket, its runtime dir on a tmpfs (and its state too, unless ``state``);
    stopped and its runtime base released after."""
    base = runtime_base()
    sock = base / "vmspawnd.sock"
    daemon = subprocess.Popen([str(Path(sys.executable).with_name("vmspawnd")), f"--socket={sock}",  # (as installed)
                               f"--state-dir={state or base / 'state'}", f"--runtime-dir={base / 'run'}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        poll_call(sock)
        yield daemon, sock
    except BaseException:
        for child in children(daemon.pid):  # (QEMU, helpers, launchers) a stopping daemon leaves its VMs
            with contextlib.suppress(ProcessLookupError):  # for the next one to adopt: none is left here
                os.kill(child, signal.SIGKILL)
        raise
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        release_runtime_base(base)


def settled(pid: int, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait (≥ 1 s) until the process ``pid`` used no CPU for ``quiet`` seconds (or ``limit`` passed): a
    daemon has then made what it makes ahead of need, and trimmed its heap after (a fixed second was
    too short in a slow hour, and caught it still at work: 1–2 MB more)."""
    def cpu() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    time.sleep(1)
    deadline, last, since = time.monotonic() + limit, cpu(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        if (now := cpu()) != last:
            last, since = now, time.monotonic()


def resident_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def guest_config(guest, **settings: str) -> dict:
    """A daemon's definition of the test guest (BIOS, no TPM, no vsock, READY=1, then it idles)."""
    return {"linux": str(guest.kernel), "initrds": [str(guest.initrd)], "ram": "256M", "firmware": "bios", "tpm": "no",
            "vsock": "no", "kernelCommandLine": [*GUEST_WORDS, "test.action=hang"],
            **settings}


def daemon_start(stamps: Stamps, guest, runs: int, tpm: bool = False,
                 before_each: Callable[[int], None] | None = None, memory: list[float] | None = None) -> list[float]:
    """ms from a Start (after idling, as between requests) to QEMU's exec, ``runs`` times;
    ``before_each(i)`` runs before the idling that precedes start ``i``; ``memory``: the daemon's
    resident MB, idle after those runs, is added to it."""
    with bench_daemon(env=stamps.env) as (daemon, sock):
        config = guest_config(guest, tpm="yes" if tpm else "no", tpmState="off")
        assert "error" not in call(sock, "io.vmspawnd.Manager.Create", {"name": "bench", "config": config})
        samples = []
        if tpm:  # the first start with a transient TPM makes the daemon keep one ready
            assert "error" not in call(sock, "io.vmspawnd.Manager.Start", {"name": "bench"}, timeout=60)
            call(sock, "io.vmspawnd.Manager.Kill", {"name": "bench"}, timeout=60)
        for i in range(runs):
            if before_each is not None:
                before_each(i)
            time.sleep(TPM_SETTLE if tpm else IDLE)  # what the daemon makes ahead is ready (as between requests)
            stamps.clear()
            start = time.monotonic_ns()
            reply = call(sock, "io.vmspawnd.Manager.Start", {"name": "bench"}, timeout=60)
            assert "error" not in reply, reply
            samples.append((stamps.qemu_exec()[1] - start) / 1e6)
            call(sock, "io.vmspawnd.Manager.Kill", {"name": "bench"}, timeout=60)
        if memory is not None:
            settled(daemon.pid)
            memory.append(resident_kb(daemon.pid) / 1024)
        return samples
