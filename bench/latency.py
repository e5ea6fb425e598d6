#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmark: the moments vmspawnd adds around QEMU, measured without ptrace.

An exec-stamping wrapper (bench/stamps.py) stands first in $PATH under QEMU's name: it writes its
pid and CLOCK_MONOTONIC, then execs the real QEMU.  Rows:

* daemon: Start request → QEMU exec (target ≤ 3 ms), and what a fresh (transient) TPM adds to it
  (target ≤ 5 ms);
* ``vmspawn``: its own exec → QEMU exec (target ≤ 40 ms);
* ``vmspawn``: QEMU exit → vmspawn gone (target ≤ 5 ms), QEMU's exit seen through a pidfd;
* a daemon with 1,000 machines: how fast one client creates them (definitions on disk, durable;
  target ≥ 1,000/s), one List (target ≤ 20 ms), and Describe's p99 while 4 other
  clients List all the time (target ≤ 15 ms: a List must not block the others);
* the same daemon: Describe from 100 clients at once, each on its own connection asking again as
  soon as it is answered (calls per second, target ≥ 12,000; p99, target ≤ 15 ms);
* its memory (resident): idle, before its first VM and once VMs have run (target ≤ 25 MB), per
  defined machine (target ≤ 8 KB) and per running VM (4 at once, in rounds after a first one; target
  ≤ 150 KB), and what the first round left (what a daemon loads once, at its first start);
* spawn → guest READY=1 and boot → poweroff, ``vmspawn`` over bare QEMU with the same argv
  (bench/boot_ratio.py), the median of pairwise ratios, each the geometric mean of two pairs run in
  mirrored order (``boot_ratio.balanced``: boots here alternate slow and fast from run to run)
  (target ≤ 1.02); and 16 VMs spawned at once, until the last is READY=1 (target ≤ 1.02);
* in Debian forky's environment (the systemd tier's tree, as root; bench/peer.py): boot → poweroff
  with ``vmspawn`` and with systemd-vmspawn 262, each over bare QEMU there, and ``vmspawn`` over
  systemd-vmspawn (target ≤ 1: faster), pairwise, the order rotating and mirrored in the next
  round (balanced as above); and the daemon's Start →
  QEMU exec under systemd 262, where it also makes QEMU's scope, beside what the scope alone
  takes systemd (no target: the ≤ 3 ms above is for a host without systemd); and ``vmspawn``'s
  QEMU exit → vmspawn gone there with a fresh TPM, whose swtpm is a transient unit it stops
  (no target: the ≤ 5 ms above is for a host without systemd);
* floors, with no target (bench/floors.py): what this machine allows, beside the rows they bound.

    .venv/bin/python -m bench.latency [--runs N] [--json FILE] [--markdown FILE]

The daemon's runtime directory is on a tmpfs, as /run is on a host the daemon is installed on (as
root a private one is mounted: in a container /run may be a disk, where replacing a file by
rename costs ≈ 0.2 ms); its state directory (the definitions) on a disk, in /var/tmp.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from bench import boot_ratio, floors
from bench import peer as bench_peer
from bench.daemon import bench_daemon, daemon_start, guest_config, resident_kb, settled
from bench.stamps import Stamps, vmspawn_runs
from tests.rawvarlink import call, list_all
from vmspawnd.qemu.accel import find_qemu
from vmspawnd.testing.guest import build_guest

REPO = Path(__file__).resolve().parents[1]
# floors (bench/floors.py): what this machine allows, beside the rows they bound
FLOOR_WAKE_C = "floor: a woken C program execs a static one"
FLOOR_WAKE_PY = "floor: a woken Python -I -S (as the launcher) execs a static one"
FLOOR_IMPORTS = "floor: Python's exec → asyncio imported (without ssl, as the commands import it)"
FLOOR_COMMAND_LINE = "floor: Python's exec → our modules for QEMU's command line imported, without asyncio"
FLOOR_CREATE = "floor: Create with the definitions on a tmpfs (no disk)"
FIRST_START_MEMORY = "daemon memory: kept from its first VMs' run (loaded once, heap)"
MANY_RUNS_MEMORY = "daemon memory, idle after 172 VM runs (43 rounds of 4)"
FLOOR_MEMORY = "floor: resident, Python with asyncio, structlog, asyncvarlink, sdnotify"
# a systemd host (the forky tree, bench/peer.py): where a Start also makes QEMU's scope, in PID 1
SYSTEMD_START = "forky (systemd 262): daemon Start → QEMU exec, in its scope"
FLOOR_SCOPE = "floor: forky (systemd 262): a transient scope started (StartTransientUnit → job done)"
SYSTEMD_EXIT = "forky (systemd 262): vmspawn with a TPM (a transient unit): QEMU exit → vmspawn gone"
SYSTEMD_MEMORY = "forky (systemd 262): daemon memory, idle once VMs have run (D-Bus in use)"
FLOOR_SYSTEMD_MEMORY = ("floor: forky (systemd 262, Python 3.14): resident, Python with those libraries, "
                        "dbus-fast and systemd-python")
TARGETS = {"daemon Start → QEMU exec": 3.0, "fresh TPM: added to Start → QEMU exec": 5.0,
              "vmspawn exec → QEMU exec": 40.0, "vmspawn: QEMU exit → vmspawn gone": 5.0,
              "List of 1,000 machines": 20.0, "Describe while 4 clients List 1,000 machines (p99)": 15.0,
              "spawn → READY=1, vmspawn ÷ bare QEMU (pairwise)": 1.02,
              "boot → poweroff, vmspawn ÷ bare QEMU (pairwise)": 1.02,
              "16 VMs at once, spawn → all READY=1, vmspawn ÷ bare QEMU (pairwise)": 1.02,
              "forky: boot → poweroff, vmspawn ÷ bare QEMU (pairwise)": 1.02,
              "forky: boot → poweroff, systemd-vmspawn 262 ÷ bare QEMU (pairwise)": None,
              "forky: boot → poweroff, vmspawn ÷ systemd-vmspawn 262 (pairwise)": 1.0,
              "Create (one client, durable definitions on disk)": 1000.0,
              "Describe, 100 clients, 1,000 machines": 12000.0, "Describe, 100 clients, 1,000 machines (p99)": 15.0,
              "daemon memory, idle": 25.0, "daemon memory per defined machine": 8.0,
              "daemon memory per running VM": 150.0, "daemon memory, idle once VMs have run": 25.0,
              MANY_RUNS_MEMORY: 25.0,
              FIRST_START_MEMORY: None,
              FLOOR_WAKE_C: None, FLOOR_WAKE_PY: None, FLOOR_IMPORTS: None, FLOOR_COMMAND_LINE: None,
              FLOOR_CREATE: None, FLOOR_MEMORY: None,
              SYSTEMD_START: None, FLOOR_SCOPE: None, SYSTEMD_EXIT: None,
              SYSTEMD_MEMORY: 25.0, FLOOR_SYSTEMD_MEMORY: None}
AT_LEAST = {"/s"}  # units where more is better: the target is a floor


def summary(samples: list[float], stat: str = "median", unit: str = "ms") -> dict:
    """The figure (``median``, or ``p99``) of ``samples`` (in ``unit``), with their range and count."""
    ordered = sorted(samples)
    value = statistics.median(ordered) if stat == "median" else ordered[int(len(ordered) * 0.99)]
    digits = 3 if unit == "×" else 2
    return {"stat": stat, "unit": unit, "value": round(value, digits), "min": round(ordered[0], digits),
            "max": round(ordered[-1], digits), "runs": len(samples)}


def boot_ratios(guest, tmp: Path, blocks: int, at_once: int = 1) -> dict[str, list[float]]:
    """vmspawn's spawn → READY=1 and spawn → gone over bare QEMU's (same argv), one ratio per
    balanced block of two pairs in mirrored order (boot_ratio.balanced); with ``at_once`` VMs
    spawned together (until the last one)."""
    if at_once == 1:
        found = boot_ratio.pairs(lambda: boot_ratio.vmspawn(guest, tmp), lambda: boot_ratio.bare_qemu(guest, tmp),
                                 2 * blocks)
    else:
        found = boot_ratio.pairs(lambda: boot_ratio.at_once(boot_ratio.vmspawn, guest, tmp, at_once),
                                 lambda: boot_ratio.at_once(boot_ratio.bare_qemu, guest, tmp, at_once), 2 * blocks)
    return {"ready": boot_ratio.balanced([ours.ready / bare.ready for ours, bare in found]),
            "gone": boot_ratio.balanced([ours.gone / bare.gone for ours, bare in found])}


def describe_load(sock: Path, clients: int = 100, seconds: float = 3.0) -> tuple[float, list[float]]:
    """``clients`` connections, each calling Describe again as soon as it is answered: calls per second
    and each call's latency (ms)."""
    async def client(i: int, until: float, latencies: list[float]) -> None:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        try:
            while time.monotonic() < until:
                start = time.monotonic_ns()
                request = {"method": "io.vmspawnd.Manager.Describe", "parameters": {"name": f"m{(i * 37) % 1000}"}}
                writer.write(json.dumps(request).encode() + b"\0")
                await reader.readuntil(b"\0")
                latencies.append((time.monotonic_ns() - start) / 1e6)
        finally:
            writer.close()

    async def run() -> list[float]:
        latencies: list[float] = []
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(i, until, latencies) for i in range(clients)))
        return latencies

    started = time.monotonic()
    latencies = asyncio.run(run())
    return len(latencies) / (time.monotonic() - started), latencies


def many_machines(runs: int) -> dict[str, list[float]]:
    """Creates per second (definitions on disk, durable, one client, in batches of 100); List of the
    1,000 machines; Describe while others List; Describe from 100 clients; memory idle and per machine."""
    state = Path(tempfile.mkdtemp(prefix="vmspawnd-bench-", dir="/var/tmp"))  # a disk, as /var/lib is
    try:
        with bench_daemon(state) as (daemon, sock):
            return _many_machines(daemon, sock, runs)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def create_rates(sock: Path, batches: int = 10) -> list[float]:
    """Creates per second, one client, in ``batches`` of 100 (machines m0, m1, …)."""
    rates = []
    for batch in range(batches):
        start = time.monotonic_ns()
        for i in range(batch * 100, batch * 100 + 100):
            reply = call(sock, "io.vmspawnd.Manager.Create", {"name": f"m{i}", "config": {"linux": "/bin/sh"}})
            assert "error" not in reply, reply
        rates.append(100 / ((time.monotonic_ns() - start) / 1e9))
    return rates


def _many_machines(daemon: subprocess.Popen[bytes], sock: Path, runs: int) -> dict[str, list[float]]:
    settled(daemon.pid)  # what it makes ahead of need is made
    idle = resident_kb(daemon.pid)
    creates = create_rates(sock)
    lists = []
    for _ in range(runs):
        start = time.monotonic_ns()
        assert list_all(sock) == 1000
        lists.append((time.monotonic_ns() - start) / 1e6)
    stop = threading.Event()
    listers = [threading.Thread(target=lambda: [list_all(sock) for _ in iter(stop.is_set, True)]) for _ in range(4)]
    for t in listers:
        t.start()
    describes = []
    for _ in range(runs * 20):
        start = time.monotonic_ns()
        assert "error" not in call(sock, "io.vmspawnd.Manager.Describe", {"name": "m500"})
        describes.append((time.monotonic_ns() - start) / 1e6)
    stop.set()
    for t in listers:
        t.join()
    rates, latencies = [], []
    for _ in range(runs):
        rate, some = describe_load(sock, seconds=1.0)
        rates.append(rate)
        latencies += some
    defined = (resident_kb(daemon.pid) - idle) / 1000
    return {"creates": creates, "lists": lists, "describes": describes, "describe rates": rates,
            "describe latencies": latencies, "idle MB": [idle / 1024], "per defined KB": [defined]}


def running_vm_memory(guest, vms: int = 4, rounds: int = 2, short_rounds: int = 40) -> dict[str, list[float]]:
    """What each of ``vms`` VMs running at once adds to the daemon's resident memory (KB), per round
    after a first one; what that first round left behind once its VMs ended (KB: what a daemon
    loads at its first start, as QMP's client with ``ssl``, and heap it keeps); and the daemon's
    resident memory once the last round's VMs ended (MB: idle, after VMs); and that again after
    ``short_rounds`` more rounds, each VM killed 2.5 s after its Start (MB: what the daemon keeps
    over many runs; a leak, or the allocators' fragmentation, shows there)."""
    with bench_daemon() as (daemon, sock):
        config = guest_config(guest, ram="128M")
        for i in range(vms):
            assert "error" not in call(sock, "io.vmspawnd.Manager.Create", {"name": f"vm{i}", "config": config})

        def one_round() -> float:
            """KB per VM while all run; they are killed after."""
            before = resident_kb(daemon.pid)
            for i in range(vms):
                assert "error" not in call(sock, "io.vmspawnd.Manager.Start", {"name": f"vm{i}"}, timeout=60)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(
                    call(sock, "io.vmspawnd.Manager.Describe", {"name": f"vm{i}"})["parameters"]["machine"]["ready"]
                    for i in range(vms)):
                time.sleep(0.5)
            per_vm = (resident_kb(daemon.pid) - before) / vms
            for i in range(vms):
                call(sock, "io.vmspawnd.Manager.Kill", {"name": f"vm{i}"}, timeout=60)
            settled(daemon.pid)
            return per_vm

        settled(daemon.pid)
        before_any = resident_kb(daemon.pid)
        one_round()
        first_start = resident_kb(daemon.pid) - before_any
        samples = [one_round() for _ in range(rounds)]
        idle_after = resident_kb(daemon.pid) / 1024
        for _ in range(short_rounds):
            for i in range(vms):
                assert "error" not in call(sock, "io.vmspawnd.Manager.Start", {"name": f"vm{i}"}, timeout=60)
            time.sleep(2.5)
            for i in range(vms):
                call(sock, "io.vmspawnd.Manager.Kill", {"name": f"vm{i}"}, timeout=60)
            time.sleep(1)
        settled(daemon.pid)
        return {"per VM KB": samples, "first start KB": [first_start], "idle after MB": [idle_after],
                "idle after many MB": [resident_kb(daemon.pid) / 1024]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--markdown", type=Path, help="write a report (machine, versions, date, rows) here")
    args = parser.parse_args()
    guest = build_guest(log=lambda *a: None)
    # as an installed copy has them (pip compiles at install): bytecode of our modules, so that no run
    # compiles them (with $PYTHONDONTWRITEBYTECODE set, as in some shells, every run would).  Forced:
    # compileall keeps a .pyc whose source has the same mtime in seconds (a file edited within the
    # second it was compiled), which the import system still finds stale by its size, so every daemon
    # compiled that module again (≈ 350 KB of heap kept once it had: the memory rows)
    compileall.compile_dir(REPO / "vmspawnd", quiet=1, force=True)
    # and the caches of the commands' start an install writes (vmspawnd/precompile.py)
    subprocess.run([sys.executable, *bench_peer.PRECOMPILE], check=True, cwd="/")
    tmp = Path(tempfile.mkdtemp(prefix="vmspawnd-bench-"))
    stamps = Stamps.build(tmp)

    def daemon_rows() -> dict[str, dict]:
        plain = daemon_start(stamps, guest, args.runs)
        with_tpm = daemon_start(stamps, guest, args.runs, tpm=True)
        return {"daemon Start → QEMU exec": summary(plain),
                "fresh TPM: added to Start → QEMU exec": summary([t - statistics.median(plain) for t in with_tpm])}

    def vmspawn_rows() -> dict[str, dict]:
        to_exec, to_gone = vmspawn_runs(stamps, guest, args.runs)
        waiter = tmp / "wakeexec"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(waiter), str(REPO / "bench/wakeexec.c")], check=True)
        return {FLOOR_WAKE_C: summary(floors.wake_exec([str(waiter)], stamps, args.runs)),
                FLOOR_WAKE_PY: summary(floors.wake_exec([sys.executable, "-I", "-S", "-c", floors.PY_WAITER],
                                                        stamps, args.runs)),
                "vmspawn exec → QEMU exec": summary(to_exec),
                FLOOR_IMPORTS: summary(floors.python_imports(args.runs)),
                FLOOR_COMMAND_LINE: summary(floors.python_imports(args.runs, floors.COMMAND_LINE_WITHOUT_ASYNCIO)),
                "vmspawn: QEMU exit → vmspawn gone": summary(to_gone)}

    def many_machine_rows() -> dict[str, dict]:
        many = many_machines(args.runs)
        rows = {"Create (one client, durable definitions on disk)": summary(many["creates"], unit="/s")}
        with bench_daemon() as (_, sock):  # its state on the tmpfs
            rows[FLOOR_CREATE] = summary(create_rates(sock), unit="/s")
        return rows | {
            "List of 1,000 machines": summary(many["lists"]),
            "Describe while 4 clients List 1,000 machines (p99)": summary(many["describes"], "p99"),
            "Describe, 100 clients, 1,000 machines": summary(many["describe rates"], unit="/s"),
            "Describe, 100 clients, 1,000 machines (p99)": summary(many["describe latencies"], "p99"),
            "daemon memory, idle": summary(many["idle MB"], unit="MB"),
            FLOOR_MEMORY: summary([floors.libraries_resident_mb()], unit="MB"),
            "daemon memory per defined machine": summary(many["per defined KB"], unit="KB")}

    def running_memory_rows() -> dict[str, dict]:
        running = running_vm_memory(guest)
        return {"daemon memory per running VM": summary(running["per VM KB"], unit="KB"),
                FIRST_START_MEMORY: summary(running["first start KB"], unit="KB"),
                "daemon memory, idle once VMs have run": summary(running["idle after MB"], unit="MB"),
                MANY_RUNS_MEMORY: summary(running["idle after many MB"], unit="MB")}

    def boot_rows() -> dict[str, dict]:
        one = boot_ratios(guest, tmp, args.runs)
        return {"spawn → READY=1, vmspawn ÷ bare QEMU (pairwise)": summary(one["ready"], unit="×"),
                "boot → poweroff, vmspawn ÷ bare QEMU (pairwise)": summary(one["gone"], unit="×")}

    def forky_rows() -> dict[str, dict]:
        peer = bench_peer.measure(guest.kernel.parent, 2 * args.runs)  # rounds in mirrored order
        bare, ours, theirs = peer["bare QEMU"], peer["vmspawn"], peer["systemd-vmspawn"]
        balanced = boot_ratio.balanced
        starts = bench_peer.measure_starts(guest.kernel.parent, args.runs)
        return {"forky: boot → poweroff, vmspawn ÷ bare QEMU (pairwise)": summary(
                    balanced([o / b for o, b in zip(ours, bare, strict=True)]), unit="×"),
                "forky: boot → poweroff, systemd-vmspawn 262 ÷ bare QEMU (pairwise)": summary(
                    balanced([t / b for t, b in zip(theirs, bare, strict=True)]), unit="×"),
                "forky: boot → poweroff, vmspawn ÷ systemd-vmspawn 262 (pairwise)": summary(
                    balanced([o / t for o, t in zip(ours, theirs, strict=True)]), unit="×"),
                SYSTEMD_START: summary(starts["start"]),
                FLOOR_SCOPE: summary(starts["scope"]),
                SYSTEMD_EXIT: summary(starts["exit with a TPM"]),
                SYSTEMD_MEMORY: summary(starts["memory"], unit="MB"),
                FLOOR_SYSTEMD_MEMORY: summary(starts["libraries"], unit="MB")}

    def sixteen_rows() -> dict[str, dict]:
        many = boot_ratios(guest, tmp, args.runs, at_once=16)
        return {"16 VMs at once, spawn → all READY=1, vmspawn ÷ bare QEMU (pairwise)": summary(many["ready"],
                                                                                              unit="×")}

    groups = [daemon_rows, vmspawn_rows, many_machine_rows, running_memory_rows, boot_rows]
    groups += [forky_rows] if os.geteuid() == 0 else []  # the forky tree runs in a container
    groups += [sixteen_rows]
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}  # a group of rows that failed: why (the others still run, and are reported)
    try:
        for group in groups:
            try:
                results |= group()
            except Exception as e:  # noqa: BLE001 - reported in the results, and the run fails at the end
                where = traceback.extract_tb(e.__traceback__)[-1]  # (an assert may have no message)
                failures[group.__name__] = f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
                print(f"{group.__name__}: FAILED:", file=sys.stderr)
                traceback.print_exc()  # (where it failed; the report keeps the one line above)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row, f in results.items():
        f["target"] = TARGETS[row]
        if f["target"] is None:  # a reference figure (the peer's, a floor)
            f["met"] = None
        else:
            f["met"] = f["value"] >= f["target"] if f["unit"] in AT_LEAST else f["value"] <= f["target"]
        print(f"{row:52} {f['stat']:6} {f['value']:8.3f} {f['unit']}  (min {f['min']:.3f}, max {f['max']:.3f}, "
              f"{f['runs']} runs)  {verdict(f)}")
    if args.json:
        found = results | {"failed": failures, "repeated": boot_ratio.REPEATED}
        args.json.write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")
    if args.markdown:
        args.markdown.write_text(report(results, failures))
    return 1 if failures else 0


def bound(figures: dict) -> str:
    return "≥" if figures["unit"] in AT_LEAST else "≤"


def verdict(f: dict) -> str:
    if f["target"] is None:
        return "reference (no target)"
    return f"target {bound(f)} {f['target']:g} {f['unit']}: {'met' if f['met'] else 'MISSED'}"


def report(results: dict, failures: dict[str, str]) -> str:
    """The Markdown report: where it ran, one row per figure with its target, and the groups of rows
    that failed, with why."""
    qemu = subprocess.run([str(find_qemu()), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [f"# vmspawnd latency ({time.strftime('%Y-%m-%d %H:%M %Z')})", "",
             f"- machine: {' '.join(os.uname()[2:5])}, {os.cpu_count()} CPUs", f"- {qemu}",
             f"- Python {sys.version.split()[0]}; TCG, the test guest; `make bench` to rerun", "",
             "| path | figure | min–max | runs | target | |", "|---|---|---|---|---|---|"]
    for row, f in results.items():
        u = f["unit"]
        target = "–" if f["target"] is None else f"{bound(f)} {f['target']:g} {u}"
        outcome = "reference" if f["met"] is None else "met" if f["met"] else "**missed**"
        lines.append(f"| {row} | {f['stat']} {f['value']:g} {u} | {f['min']:g}–{f['max']:g} {u} "
                     f"| {f['runs']} | {target} | {outcome} |")
    if failures:
        lines += ["", "**Failed in this run** (their rows are missing above):", ""]
        lines += [f"- `{group}`: {why}" for group, why in failures.items()]
    if boot_ratio.REPEATED:
        lines += ["", "**Run again in this run** (a group of VMs at once in which a guest gave no READY=1; the "
                  "figures above are from its second run):", ""]
        lines += [f"- {why}" for why in boot_ratio.REPEATED]
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
