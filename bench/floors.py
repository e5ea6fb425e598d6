# SPDX-License-Identifier: LGPL-2.1-or-later
"""Floors: what this machine allows, measured the way the rows that miss their targets are, so a
report shows which part of a figure is the machine's and which is ours.  They have no targets.

* a process blocked on a pipe is woken and execs a small static program (the exec stamp): from a
  C program and from a bare Python interpreter (``-I -S``, as the exec-late launcher runs) — a
  daemon Start has two such wake-ups (client → daemon, daemon → launcher) and this exec;
* Python's start-up until asyncio is imported, without ``ssl`` as the commands import it (what
  `vmspawn` needs of the libraries before QEMU: structlog comes with the first line it logs);
* Python's start-up until our modules that make QEMU's command line are imported, as `vmspawn`
  imports them but without asyncio (none of them needs it): the least a `vmspawn` that imported
  asyncio only after QEMU's exec would still take before it;
* the resident memory of Python with the daemon's libraries imported (asyncio, structlog,
  asyncvarlink, sdnotify), before any module of ours.

(The fourth floor, Create with the definitions on a tmpfs, needs a daemon: bench/latency.py runs it.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.stamps import Stamps

PY_WAITER = "import os, sys; os.read(0, 1); os.execv(sys.argv[1], sys.argv[1:])"
LIBRARIES = "import asyncio, structlog, asyncvarlink, sdnotify"
#: and what the daemon loads on a systemd host: dbus-fast (imported as the daemon does, after hashlib without
#: OpenSSL: vmspawnd/systemd/bus.py) and systemd-python's libsystemd (socket activation, the journal)
SYSTEMD_LIBRARIES = (f"{LIBRARIES}; import vmspawnd.lean; vmspawnd.lean.hashlib(); "
                     "import dbus_fast.aio, systemd.daemon, systemd.journal")


def wake_exec(waiter: list[str], stamps: Stamps, runs: int, idle: float = 0.3) -> list[float]:
    """ms from writing a byte to ``waiter`` (idle for ``idle`` s, as a daemon between requests) to the
    moment the exec stamp runs (it then execs ``true``, not QEMU)."""
    env = {**stamps.env, "EXECSTAMP_REAL": "/bin/true"}
    samples = []
    for _ in range(runs):
        stamps.clear()
        proc = subprocess.Popen([*waiter, str(stamps.binary), "floor"], stdin=subprocess.PIPE, env=env)
        try:
            time.sleep(idle)
            start = time.monotonic_ns()
            assert proc.stdin is not None
            proc.stdin.write(b"x")
            proc.stdin.flush()
            samples.append((stamps.qemu_exec()[1] - start) / 1e6)
        finally:
            proc.stdin.close()
            proc.wait(10)
    return samples


ASYNCIO_WITHOUT_TLS = "import sys; sys.modules['ssl'] = None; import asyncio"
#: the options, the machine's settings, QEMU's argv, firmware and accelerator, the credentials' files, the
#: runtime directory and the launcher's spawn; through the caches of a command's start, with the standard modules
#: without their unused parts, as cli/__init__.py has them, and no garbage collection meanwhile, as cli/vmspawn.py
#: imports (an import of asyncio fails the floor).  The search path is the commands' (their scripts' directory
#: first, where -c puts the current one), as the module cache needs it.
COMMAND_LINE_WITHOUT_ASYNCIO = (
    "import gc, os, sys; gc.disable(); sys.path[0] = os.path.dirname(sys.executable); "
    "from vmspawnd import modulecache; modulecache.install(); from vmspawnd import methodcache, lean; "
    "methodcache.install(); lean.import_lean(*(module for module in lean.UNUSED_PARTS if module != 'asyncio')); "
    "sys.modules['asyncio'] = None; "
    "import vmspawnd.options, vmspawnd.qemu.argv, vmspawnd.qemu.firmware, vmspawnd.qemu.accel, "
    "vmspawnd.guest.credentials, vmspawnd.runtime, vmspawnd.execlate; methodcache.settle(write=False); "
    "modulecache.settle(write=False)")


def python_imports(runs: int, imports: str = ASYNCIO_WITHOUT_TLS) -> list[float]:
    """ms from the exec of ``python`` (with site, as the installed commands) to ``imports`` done."""
    samples = []
    for _ in range(runs):
        start = time.monotonic_ns()
        out = subprocess.run([sys.executable, "-c", f"{imports}; import time; print(time.monotonic_ns())"],
                             capture_output=True, text=True, check=True).stdout
        samples.append((int(out) - start) / 1e6)
    return samples


def libraries_resident_mb(libraries: str = LIBRARIES) -> float:
    """MB resident in a Python that imported the daemon's ``libraries`` (of our modules only vmspawnd.lean)."""
    out = subprocess.run([sys.executable, "-c", f"{libraries}; print(open('/proc/self/status').read())"],
                         capture_output=True, text=True, check=True).stdout
    kb = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024

