# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: boot → poweroff of the test guest with systemd-vmspawn 262 and with our vmspawn, each
against bare QEMU, all in Debian forky's environment (its QEMU 11.1), where systemd-vmspawn 262 is.

:func:`measure` runs the forky tree of the systemd tier (``tests/systemd/container.py``) with the
test guest and a small GPT disk image bound in, and this module's ``__main__`` inside it.  There
the three take turns, the order rotating from round to round and mirrored in every second round
(for ``boot_ratio.balanced``): bare QEMU with our argv builder's
argv (no notify channel, no QMP client), ``vmspawn``, and ``systemd-vmspawn``.  All three boot the
same kernel, initrd and disk with 256 MiB, one vCPU, SeaBIOS, no TPM, no vsock, not registered,
no console (``--console=headless``, as in bare QEMU's argv: with a console the guest prints its
boot there, and bare QEMU's would not);
the guest powers off at once (no ``test.notify``: systemd-vmspawn has no notify channel without
vsock).  systemd-vmspawn needs a disk (``--image``; with ``-M`` alone it wants one from the machine
pool), so all three get it.  Printed: one JSON line, ``BENCH-PEER {...}``, seconds per run.

:func:`measure_starts` runs our daemon in the same tree, under systemd 262: ms from a Start to QEMU's
exec (the exec stamp of bench/stamps.py bound in), with the scope it creates around QEMU there, and
ms for systemd to start such a scope alone (the part of a Start that is PID 1's); then ``vmspawn``
with a fresh TPM, whose swtpm runs as a transient unit there: ms from QEMU's exit to vmspawn's (it
stops the unit first).  Printed: ``BENCH-STARTS {...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from types import SimpleNamespace

from bench import floors
from bench.daemon import IDLE, daemon_start
from bench.stamps import Stamps, vmspawn_runs
from vmspawnd.config import ConsoleMode, MachineConfig, Ram, Tristate
from vmspawnd.qemu.accel import find_qemu, qemu_version
from vmspawnd.qemu.argv import Resources, build_qemu_argv
from vmspawnd.systemd.scope import allocate_scope
from vmspawnd.systemd.units import connect_systemd
from vmspawnd.testing.guest import STEADY_CLOCK
from vmspawnd.values import Drive

REPO = Path(__file__).resolve().parents[1]
GUEST_INSIDE, IMAGE_INSIDE = "/var/cache/vmspawnd-bench-guest", "/var/cache/vmspawnd-bench-image"
STAMP_INSIDE = "/var/cache/vmspawnd-bench-stamp"
VENV_PYTHON = "/opt/vmspawnd-venv/bin/python"
#: what an install runs to make the caches of every command's start once (vmspawnd/precompile.py); from "/", so that
#: the current directory's vmspawnd is not the one imported
PRECOMPILE = ["-m", "vmspawnd.precompile"]
WORDS = ("panic=-1", *STEADY_CLOCK)
X86_64_ROOT = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"  # the discoverable-partitions type of a root file system
_keep: list[socket.socket] = []  # sockets bare QEMU inherits, open as long as we run


def make_gpt_image(path: Path, size_mib: int = 16) -> None:
    """An empty disk with a GPT and one x86-64 root partition (systemd-vmspawn looks for a table)."""
    sector, total = 512, size_mib * 2048
    entries = bytearray(128 * 128)
    entries[:128] = (uuid.UUID(X86_64_ROOT).bytes_le + uuid.uuid4().bytes_le + struct.pack("<QQQ", 2048, total - 34, 0)
                     + "root".encode("utf-16-le").ljust(72, b"\0"))
    entries_crc, disk = zlib.crc32(entries), uuid.uuid4().bytes_le

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        h = struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, current, backup, 34, total - 34, disk,
                        entries_lba, 128, 128, entries_crc)
        return h[:16] + struct.pack("<I", zlib.crc32(h)) + h[20:]

    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<BBBBBBBBII", 0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1, total - 1)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(total * sector)
        for offset, data in ((0, bytes(mbr)), (1, header(1, total - 1, 2)), (2, bytes(entries)),
                             (total - 33, bytes(entries)), (total - 1, header(total - 1, 1, total - 33))):
            f.seek(offset * sector)
            f.write(data)


def measure(guest_dir: Path, rounds: int, suite: str = "forky") -> dict[str, list[float]]:
    """Run the rounds inside the ``suite`` tree; seconds per boot → poweroff, per tool."""
    with tempfile.TemporaryDirectory(prefix="vmspawnd-bench-peer-") as tmp:
        os.chmod(tmp, 0o755)
        make_gpt_image(Path(tmp) / "disk.raw")
        p = subprocess.run([sys.executable, "-m", "tests.systemd.container", f"--suite={suite}",
                            f"--bind-ro={guest_dir}:{GUEST_INSIDE}", f"--bind-ro={tmp}:{IMAGE_INSIDE}", "run", "--",
                            VENV_PYTHON, "-m", "bench.peer", f"--rounds={rounds}"],
                           cwd=REPO, capture_output=True, text=True, timeout=3600)
    return _result(p, "BENCH-PEER ")


def measure_starts(guest_dir: Path, rounds: int, suite: str = "forky") -> dict[str, list[float]]:
    """Our daemon's Starts inside the ``suite`` tree: ms to QEMU's exec ("start"), and ms for a scope
    alone ("scope")."""
    with tempfile.TemporaryDirectory(prefix="vmspawnd-bench-starts-") as tmp:
        os.chmod(tmp, 0o755)
        stamps = Stamps.build(Path(tmp))
        p = subprocess.run([sys.executable, "-m", "tests.systemd.container", f"--suite={suite}",
                            f"--bind-ro={guest_dir}:{GUEST_INSIDE}", f"--bind-ro={stamps.dir}:{STAMP_INSIDE}", "run",
                            "--", VENV_PYTHON, "-m", "bench.peer", f"--starts={rounds}"],
                           cwd=REPO, capture_output=True, text=True, timeout=3600)
    return _result(p, "BENCH-STARTS ")


def _result(p: subprocess.CompletedProcess[str], prefix: str) -> dict[str, list[float]]:
    for line in p.stdout.splitlines():
        if line.startswith(prefix):
            return json.loads(line.removeprefix(prefix))
    raise RuntimeError(f"the bench in the tree printed no result (exit {p.returncode}): {p.stderr[-2000:]}")


# ---------------------------------------------------------------- inside the tree

def _bare_argv(tmp: Path, disk: Path) -> tuple[list[str], int]:
    guest = Path(GUEST_INSIDE)
    config = MachineConfig(name="bare", linux=guest / "vmlinuz", initrds=(guest / "initrd.img",), kernel_cmdline=WORDS,
                           image=Drive(disk), ram=Ram(256 << 20), console=ConsoleMode.HEADLESS, kvm=Tristate.NO,
                           firmware="bios").validated()
    qmp = socket.socket(socket.AF_UNIX)  # QEMU wants a listening QMP socket; nobody speaks QMP to it
    qmp.bind(str(tmp / "qmp.sock"))
    qmp.listen(1)
    os.set_inheritable(qmp.fileno(), True)
    _keep.append(qmp)
    resources = Resources(qemu=find_qemu(), kvm=False, qmp_fd=qmp.fileno(), qemu_version=qemu_version(find_qemu()),
                          initrd=guest / "initrd.img")
    return build_qemu_argv(config, resources), qmp.fileno()


def _timed(argv: list[str], pass_fds: tuple[int, ...] = (), cwd: Path | None = None) -> float:
    start = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       pass_fds=pass_fds, cwd=cwd, timeout=300)
    took = time.monotonic() - start
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {p.returncode}: {p.stderr.decode(errors='replace')[-1000:]}")
    return took


def compile_like_an_installed_copy() -> None:
    """Run our modules from a copy with bytecode for this tree's Python, as an installed copy has
    (compiled at its install): the repository is bound read-only here, without it, so each
    ``vmspawn`` had compiled them first (≈ 55 ms).  What we start finds the copy first (``$PYTHONPATH``)."""
    copy = Path(tempfile.mkdtemp(prefix="bench-src-"))
    shutil.copytree(REPO / "vmspawnd", copy / "vmspawnd", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(copy / "vmspawnd")], check=True)
    subprocess.run([sys.executable, *PRECOMPILE], env={**os.environ, "PYTHONPATH": str(copy)}, check=True, cwd="/")
    os.environ["PYTHONPATH"] = str(copy)


def inside(rounds: int) -> dict[str, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    disk = tmp / "disk.raw"
    disk.write_bytes((Path(IMAGE_INSIDE) / "disk.raw").read_bytes())
    guest = Path(GUEST_INSIDE)
    common = [f"--linux={guest / 'vmlinuz'}", f"--initrd={guest / 'initrd.img'}", f"--image={disk}", "--ram=256M",
              "--console=headless", "--firmware=bios", "--tpm=no", "--register=no"]
    bare_argv, qmp = _bare_argv(tmp, disk)
    tools = {
        "bare QEMU": lambda: _timed(bare_argv, (qmp,)),
        "vmspawn": lambda: _timed([str(Path(VENV_PYTHON).with_name("vmspawn")), *common, "--vsock=no", "-q",
                                   "-M", "benchours", *WORDS], cwd=tmp),
        "systemd-vmspawn": lambda: _timed(["systemd-vmspawn", *common, "-q", "-M", "benchpeer", *WORDS], cwd=tmp),
    }
    names = list(tools)
    results: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        order = names[i // 2 % 3:] + names[:i // 2 % 3]  # the order rotates, so drift hits all alike,
        for name in order[::-1] if i % 2 else order:  # and is mirrored in every second round (balanced)
            results[name].append(tools[name]())
    return results


def inside_starts(rounds: int) -> dict[str, list[float]]:
    """The daemon's Starts here (bench/daemon.py), each after a scope alone, in the same conditions;
    then ``vmspawn``'s exits with a TPM unit."""
    guest = Path(GUEST_INSIDE)
    scopes: list[float] = []

    def scope_first(i: int) -> None:
        time.sleep(IDLE)
        scopes.append(asyncio.run(_scope(f"benchscope{i}")))

    memory: list[float] = []
    starts = daemon_start(Stamps(Path(STAMP_INSIDE), Path(tempfile.mkdtemp(prefix="bench-starts-")) / "stamps",
                                 find_qemu()),
                          SimpleNamespace(kernel=guest / "vmlinuz", initrd=guest / "initrd.img"), rounds,
                          before_each=scope_first, memory=memory)
    stamps = Stamps(Path(STAMP_INSIDE), Path(tempfile.mkdtemp(prefix="bench-exits-")) / "stamps", find_qemu())
    _to_exec, to_gone = vmspawn_runs(stamps, SimpleNamespace(kernel=guest / "vmlinuz", initrd=guest / "initrd.img"),
                                     rounds, tpm="yes")
    return {"start": starts, "scope": scopes, "exit with a TPM": to_gone, "memory": memory,
            "libraries": [floors.libraries_resident_mb(floors.SYSTEMD_LIBRARIES)]}


async def _scope(name: str) -> float:
    """ms for systemd to start a transient scope around a waiting process, as a Start makes it."""
    manager, why = await connect_systemd()
    if manager is None:
        raise RuntimeError(why)
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        begin = time.monotonic_ns()
        unit = await allocate_scope(manager, name, proc.pid, "machine.slice", ())
        took = (time.monotonic_ns() - begin) / 1e6
        await manager.unref_unit(unit)
    finally:
        proc.kill()
        await proc.wait()
        await manager.aclose()
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--starts", type=int, default=0, help="measure this many daemon Starts instead")
    args = parser.parse_args()
    compile_like_an_installed_copy()
    if args.starts:
        print("BENCH-STARTS " + json.dumps(inside_starts(args.starts)), flush=True)
    else:
        print("BENCH-PEER " + json.dumps(inside(args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
