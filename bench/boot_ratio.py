#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: spawn → guest READY=1 and spawn → gone (boot → poweroff) of the test guest, vmspawn
vs bare QEMU, one at a time or many at once.

Both runs use the same QEMU argv (the bare run builds it with vmspawnd's own argv builder and
serves the notify channel itself).  ``bench.latency`` reports the pairwise ratios against their
targets; run alone, this prints them for one VM at a time.

    .venv/bin/python -m bench.boot_ratio [--runs N]
"""

from __future__ import annotations

import argparse
import math
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.guest.channel import NotifyParser
from vmspawnd.testing.bare import bare_qemu_argv
from vmspawnd.testing.guest import GUEST_WORDS, build_guest

WORDS = (*GUEST_WORDS, "test.notify_timeout=120")  # (16 TCG guests on 2 CPUs:
# a guest's READY=1 write once took longer than its default 10 s)


@dataclass(frozen=True)
class Timing:
    """Seconds from the spawn to the guest's READY=1, and to the process being gone (it powered off)."""

    ready: float
    gone: float


def wait_gone(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for ``proc``'s exit, seen the moment it happens through a pidfd: ``Popen.wait`` with a
    timeout polls, sleeping 0.5, 1, 2 … up to 50 ms in between, so a process that exits while it
    sleeps is seen up to that late (it had added 0–32 ms to vmspawn's boot → poweroff here)."""
    fd = os.pidfd_open(proc.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError(f"{proc.args[0]} did not exit within {timeout} s")
    finally:
        os.close(fd)
    return proc.wait()


def bare_qemu(guest, tmp: Path, tag: str = "0", ram_mib: int = 256) -> Timing:
    notify_path, qmp_path = tmp / f"notify-{tag}.sock", tmp / f"qmp-{tag}.sock"
    for p in (notify_path, qmp_path):
        p.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(notify_path))
    listener.listen(1)
    qmp = socket.socket(socket.AF_UNIX)
    qmp.bind(str(qmp_path))
    qmp.listen(1)
    os.set_inheritable(qmp.fileno(), True)
    argv = bare_qemu_argv(guest, WORDS, qmp_fd=qmp.fileno(), notify_path=notify_path, name=f"bench{tag}",
                          ram_mib=ram_mib)
    start = time.monotonic()
    proc = subprocess.Popen(argv, pass_fds=[qmp.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    listener.settimeout(300)
    conn, _ = listener.accept()
    parser, ready = NotifyParser(), None
    while ready is None and (data := conn.recv(65536)):
        if ("READY", "1") in parser.feed(data):
            ready = time.monotonic() - start
    while conn.recv(65536):
        pass
    wait_gone(proc, 300)
    gone = time.monotonic() - start
    for s in (conn, listener, qmp):
        s.close()
    if ready is None:
        raise RuntimeError("bare QEMU: no READY=1")
    return Timing(ready, gone)


def vmspawn(guest, tmp: Path, tag: str = "0", ram_mib: int = 256) -> Timing:
    notify = tmp / f"manager-{tag}.sock"
    notify.unlink(missing_ok=True)
    runtime = tmp / f"run-{tag}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "RUNTIME_DIRECTORY": str(runtime)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, tempfile.TemporaryFile() as errors:
        sock.bind(str(notify))
        start = time.monotonic()
        proc = subprocess.Popen([str(Path(sys.executable).with_name("vmspawn")), f"--linux={guest.kernel}",
                                 f"--initrd={guest.initrd}", f"--ram={ram_mib}M", "--console=headless", "--kvm=no",
                                 "--firmware=bios", "--tpm=no", "--vsock=no", "-q", "-M", f"bench{tag}", *WORDS],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        ready = None
        pidfd = os.pidfd_open(proc.pid)
        try:
            while ready is None:
                readable = select.select([sock.fileno(), pidfd], [], [], 300)[0]
                if sock.fileno() in readable:  # (what it sent is read before its end counts)
                    if b"READY=1" in sock.recv(4096).split(b"\n"):
                        ready = time.monotonic() - start
                else:  # it ended (or hangs) without READY=1: say why (its QEMU dies with it)
                    proc.kill()
                    errors.seek(0)
                    raise RuntimeError(f"vmspawn {tag}: no READY=1 (exit status {proc.wait()} after "
                                       f"{time.monotonic() - start:.1f} s): "
                                       f"{errors.read().decode(errors='replace')[-2000:]}")
        finally:
            os.close(pidfd)
        wait_gone(proc, 300)
        return Timing(ready, time.monotonic() - start)


REPEATED: list[str] = []  # why a group of VMs at once was run again (bench.latency reports it)


def at_once(spawn: Callable[..., Timing], guest, tmp: Path, count: int, ram_mib: int = 128, tries: int = 2) -> Timing:
    """``count`` VMs spawned together: until the last is READY=1, and until the last is gone.  A group
    in which a guest gave no READY=1 is run again (up to ``tries`` in all), and why is kept in
    :data:`REPEATED`: with 16 TCG guests on 2 CPUs, one guest in a few hundred has given none (bare
    QEMU's once, vmspawn's once, bench/notes.md), which would otherwise lose the whole group's rows."""
    for attempt in range(1, tries + 1):
        try:
            return _at_once(spawn, guest, tmp, count, ram_mib)
        except RuntimeError as e:
            if attempt == tries:
                raise
            REPEATED.append(f"{spawn.__name__}, {count} at once: {e}")
            print(f"repeating a group of {count} at once: {e}", file=sys.stderr)
    raise AssertionError("unreachable")


def _at_once(spawn: Callable[..., Timing], guest, tmp: Path, count: int, ram_mib: int) -> Timing:
    timings: list[Timing] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            timings.append(spawn(guest, tmp, f"{i}", ram_mib))
        except BaseException as e:  # noqa: BLE001 - reported after the others finish
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return Timing(max(t.ready for t in timings), max(t.gone for t in timings))


def pairs(run_ours: Callable[[], Timing], run_bare: Callable[[], Timing], count: int) -> list[tuple[Timing, Timing]]:
    """``count`` (ours, bare) pairs, which one goes first alternating from pair to pair (bare, ours;
    ours, bare; …), so that two pairs in a row are a balanced block (see :func:`balanced`)."""
    result = []
    for i in range(count):
        if i % 2:
            ours, bare = run_ours(), run_bare()
        else:
            bare, ours = run_bare(), run_ours()
        result.append((ours, bare))
    return result


def balanced(ratios: Sequence[float]) -> list[float]:
    """One ratio per balanced block of runs: the geometric mean of two ratios in a row, whose runs
    went in mirrored order (A B, B A; or A B C, C B A), so each side ran once at an even and once at
    an odd place in the sequence, and as early as late on average.

    On this machine boots alternate slow and fast from one run to the next (≈ 0.15 s of ≈ 1.7,
    whatever is booted: bare QEMU alone shows it, and a pause of 1 s between runs mostly removes
    it; bench/notes.md), so a single pair's ratio measures mostly its place in the sequence."""
    return [math.sqrt(ratios[i] * ratios[i + 1]) for i in range(0, len(ratios) - 1, 2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="pairs (two make a block)")
    args = ap.parse_args()
    guest = build_guest(log=lambda *a: None)
    with tempfile.TemporaryDirectory(prefix="vmspawnd-bench.") as tmp:
        found = pairs(lambda: vmspawn(guest, Path(tmp)), lambda: bare_qemu(guest, Path(tmp)), args.runs)
    for what in ("ready", "gone"):
        ratios = balanced([getattr(o, what) / getattr(b, what) for o, b in found])
        print(f"spawn → {what}: vmspawn ÷ bare QEMU, median of {len(ratios)} blocks of 2 pairs "
              f"{statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
