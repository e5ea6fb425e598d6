#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: median spawn → guest READY=1 of the test guest, vmspawn vs bare QEMU.

Both runs use the same QEMU argv (the bare run builds it with vmspawnd's own argv builder and
serves the notify channel itself); the target is vmspawn within 5% of bare QEMU.

    .venv/bin/python bench/boot_ratio.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmspawnd.config import ConsoleMode, MachineConfig, Ram, Tristate
from vmspawnd.guest.channel import NotifyParser
from vmspawnd.qemu import qemu_escape
from vmspawnd.qemu.accel import choose_accelerator, find_qemu
from vmspawnd.qemu.argv import Resources, build_qemu_argv
from vmspawnd.testing.guest import build_guest

WORDS = ("panic=-1", "test.notify=1")


def bare_qemu(guest, tmp: Path) -> float:
    config = MachineConfig(name="bench", linux=guest.kernel, initrds=(guest.initrd,), kernel_cmdline=WORDS,
                           ram=Ram(256 << 20), console=ConsoleMode.HEADLESS, kvm=Tristate.NO,
                           firmware="bios").validated()
    notify_path, qmp_path = tmp / "notify.sock", tmp / "qmp.sock"
    for p in (notify_path, qmp_path):
        p.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(notify_path))
    listener.listen(1)
    qmp = socket.socket(socket.AF_UNIX)
    qmp.bind(str(qmp_path))
    qmp.listen(1)
    os.set_inheritable(qmp.fileno(), True)
    res = Resources(qemu=find_qemu(), kvm=choose_accelerator(Tristate.NO).kvm, qmp_fd=qmp.fileno(),
                    notify_args=("-chardev", f"socket,id=notify,path={qemu_escape(str(notify_path))},reconnect=1",
                                 "-device", "virtserialport,chardev=notify,name=io.systemd.notify"),
                    initrd=guest.initrd)
    argv = build_qemu_argv(config, res)
    start = time.monotonic()
    proc = subprocess.Popen(argv, pass_fds=[qmp.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    conn, _ = listener.accept()
    parser, ready = NotifyParser(), None
    while ready is None and (data := conn.recv(65536)):
        if ("READY", "1") in parser.feed(data):
            ready = time.monotonic() - start
    while conn.recv(65536):
        pass
    proc.wait(60)
    for s in (conn, listener, qmp):
        s.close()
    if ready is None:
        raise RuntimeError("bare QEMU: no READY=1")
    return ready


def vmspawn(guest, tmp: Path) -> float:
    notify = tmp / "manager.sock"
    notify.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "RUNTIME_DIRECTORY": str(tmp)}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "vmspawnd.cli.vmspawn", f"--linux={guest.kernel}",
                             f"--initrd={guest.initrd}", "--ram=256M", "--console=headless", "--kvm=no",
                             "--firmware=bios", "--tpm=no", "--vsock=no", "-q", "-M", "bench", *WORDS],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = None
    sock.settimeout(60)
    while ready is None:
        if b"READY=1" in sock.recv(4096).split(b"\n"):
            ready = time.monotonic() - start
    proc.wait(60)
    sock.close()
    return ready


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    guest = build_guest(log=lambda *a: None)
    bare, ours = [], []
    with tempfile.TemporaryDirectory(prefix="vmspawnd-bench.") as tmp:
        for i in range(args.runs):  # interleaved, so drift hits both alike
            bare.append(bare_qemu(guest, Path(tmp)))
            ours.append(vmspawn(guest, Path(tmp)))
            print(f"run {i + 1}: bare {bare[-1]:.3f}s  vmspawn {ours[-1]:.3f}s", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    ratio = o / b
    print(f"median spawn→READY: bare QEMU {b:.3f}s, vmspawn {o:.3f}s, ratio {ratio:.3f} (target ≤ 1.05)")
    return 0 if ratio <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
