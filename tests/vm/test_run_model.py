# SPDX-License-Identifier: LGPL-2.1-or-later
"""The run model under concurrent clients and faults: a real daemon, real QEMU guests, real helpers.

Each command on a machine is serialized and acts only on the run it was issued against; a
daemon killed at any point of a start leaves nothing the next daemon does not end; an adopted
VM's helpers are watched like a fresh one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import VMSPAWN, Daemon, processes_using
from tests.polling import poll
from tests.vm.clients import TYPED, Client, hammer, settle
from vmspawnd.faults import CRASH_ENV
from vmspawnd.interface import Config
from vmspawnd.machine import State
from vmspawnd.manager import Manager
from vmspawnd.settings import config_from_json
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = pytest.mark.vm


def guest_config(guest, *words: str, tpm: str = "auto", linux: Path | None = None, **fields) -> Config:
    return Config(linux=str(linux or guest.kernel), initrds=[str(guest.initrd)], ram="256M", console="headless",
                  firmware="bios", tpm=tpm, kernelCommandLine=[*GUEST_WORDS, *words], **fields)


def daemon_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def machine_dir(daemon: Daemon, name: str) -> str:
    return str(daemon.runtime / "machines" / name) + "/"


def test_concurrent_clients_hammering_three_machines(daemon, guest):
    """20 clients × Start/Stop/Kill/Remove/Create/Describe/Pause/Resume/Reboot on 3 names for 30 s: every
    call answered with success or a typed error, nothing stuck, nothing orphaned, no fd kept."""
    names = ["c0", "c1", "c2"]
    warm = daemon.ctl("create", "warm", f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                      "--console=headless", "--firmware=bios", *GUEST_WORDS)
    assert warm.returncode == 0, warm.stderr
    assert daemon.ctl("start", "warm").returncode == 0  # warm up: lazily imported modules, caches
    daemon.wait_for("warm", lambda s: s["state"] == "stopped")
    assert daemon.ctl("remove", "warm").returncode == 0
    baseline = daemon_fds(daemon)
    def next_call(rnd: random.Random, seed: int) -> tuple[str, dict]:
        name = rnd.choice(names)
        op = rnd.choices(["Create", "Start", "Stop", "Kill", "Remove", "Describe", "Pause", "Resume", "Reboot"],
                         [3, 4, 2, 2, 2, 1, 1, 1, 1])[0]
        params: dict = {"name": name}
        if op == "Create":
            params["config"] = guest_config(guest, "test.action=poweroff" if seed % 2 else "test.action=acpi")
        elif op == "Stop":
            params["timeout"] = rnd.choice([0.0, 1.0, 5.0])
        return op, params

    outcomes = hammer(daemon, clients=20, seconds=30, next_call=next_call)
    results = {result for _, result in outcomes}
    assert results <= TYPED | {"ok"}, outcomes
    assert outcomes[("Start", "ok")] >= 3 and outcomes[("Create", "ok")] >= 3, outcomes  # it really ran VMs
    settle(daemon, names)
    for name in names:
        poll(lambda n=name: processes_using(Path(machine_dir(daemon, n))), lambda pids: pids == [], 20)
    poll(lambda: daemon_fds(daemon), lambda n: n <= baseline + 2, 20)
    log = daemon.log.read_text()
    assert "Task was destroyed" not in log and "InternalError" not in log and "Traceback" not in log, log[-3000:]


def test_a_stop_never_touches_the_run_that_a_later_start_began(daemon, guest):
    """Stop(timeout=0) of run N while a burst of Starts is in flight: a run that starts afterwards
    keeps running, and the Stop returns."""
    async def hammer_start(b: Client) -> list[str]:
        """Start again and again across the old run's end (where a stale Stop used to strike)."""
        results: list[str] = []
        until = time.monotonic() + 3
        while time.monotonic() < until and "ok" not in results:
            results.append(await b.call("Start", name="sb"))
        return results

    async def round_(c: Client, burst: list[Client]) -> None:
        first = daemon.status("sb")["pid"]
        stop = asyncio.ensure_future(c.call("Stop", name="sb", timeout=0.0))
        starts = [asyncio.ensure_future(hammer_start(b)) for b in burst]
        assert await stop == "ok"
        results = [r for rs in await asyncio.gather(*starts) for r in rs]
        assert set(results) <= {"ok", "WrongState"} and results.count("ok") == 1, results
        st = daemon.wait_for("sb", lambda s: s["ready"])
        assert st["pid"] != first
        await asyncio.sleep(2)
        again = daemon.status("sb")
        assert again["state"] == "running" and again["pid"] == st["pid"], again  # not killed by the old Stop

    async def main() -> None:
        c = await Client.connect(daemon)
        burst = [await Client.connect(daemon) for _ in range(8)]
        try:
            assert await c.call("Create", name="sb", config=guest_config(guest, "test.action=hang", tpm="no")) == "ok"
            assert await c.call("Start", name="sb") == "ok"
            daemon.wait_for("sb", lambda s: s["ready"])
            for _ in range(5):
                await round_(c, burst)
        finally:
            for client in (c, *burst):
                client.close()

    asyncio.run(main())
    daemon.ctl("kill", "sb")


def test_stale_removes_never_delete_a_newer_machine(daemon, guest):
    """Removes queued behind a failing Start, and another client's Create + Start of the same name:
    exactly one Remove removes the old machine, the others find no machine, the new one survives."""
    async def main() -> None:
        c = await Client.connect(daemon)
        removers = [await Client.connect(daemon) for _ in range(5)]
        creator = await Client.connect(daemon)
        try:
            for round_ in range(3):
                # registration is required and there is no machined here: QEMU comes up, then the start fails
                bad = guest_config(guest, "test.action=hang", tpm="no", register="yes")
                assert await c.call("Create", name="sr", config=bad) == "ok"
                start = asyncio.ensure_future(c.call("Start", name="sr"))
                seen = time.monotonic()
                while await creator.state("sr") != "starting":  # the Removes queue behind this Start
                    assert time.monotonic() - seen < 10
                    await asyncio.sleep(0.002)
                removes = [asyncio.ensure_future(r.call("Remove", name="sr")) for r in removers]

                async def create_new() -> None:
                    good = guest_config(guest, "test.action=hang", tpm="no")
                    while (result := await creator.call("Create", name="sr", config=good)) == "MachineExists":
                        await asyncio.sleep(0.005)
                    assert result == "ok"
                    assert await creator.call("Start", name="sr") == "ok"

                new = asyncio.ensure_future(create_new())
                assert await start == "StartFailed"
                results = await asyncio.gather(*removes)
                await new
                assert sorted(results) == ["NoSuchMachine"] * 4 + ["ok"], results
                st = daemon.wait_for("sr", lambda s: s["ready"])
                assert st["state"] == "running" and st["config"].get("register") != "yes", st  # the new one
                assert (daemon.state / "machines" / "sr.json").exists()
                assert await c.call("Kill", name="sr") == "ok"
                assert await c.call("Remove", name="sr") == "ok", round_
        finally:
            for client in (c, creator, *removers):
                client.close()

    asyncio.run(main())


def test_failed_starts_leak_no_file_descriptors(daemon, guest, tmp_path):
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"garbage")
    assert daemon.ctl("create", "leaky", f"--linux={kernel}", "--ram=256M", "--console=read-only",
                      "--tpm=no").returncode == 0
    assert daemon.ctl("start", "leaky").returncode == 1  # warm up
    baseline = daemon_fds(daemon)

    async def main() -> list[str]:
        c = await Client.connect(daemon)
        try:
            return [await c.call("Start", name="leaky") for _ in range(50)]
        finally:
            c.close()

    assert set(asyncio.run(main())) == {"StartFailed"}
    assert daemon_fds(daemon) <= baseline + 2
    assert processes_using(Path(machine_dir(daemon, "leaky"))) == []


@pytest.mark.parametrize("point", ["helpers-started", "exec", "recorded"])
def test_daemon_killed_during_a_start_leaves_nothing_behind(daemon, guest, tmp_path, point):
    shared = tmp_path / "shared"
    shared.mkdir()
    p = daemon.ctl("create", "crashy", f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                   "--console=read-only", "--firmware=bios", "--tpm=yes", f"--bind={shared}:/mnt/shared",
                   *GUEST_WORDS, "test.action=hang")
    assert p.returncode == 0, p.stderr
    daemon.stop_daemon()
    daemon.env = {CRASH_ENV: point}
    daemon.start()
    assert daemon.ctl("start", "crashy").returncode == 1  # the daemon died under the client
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    left = processes_using(Path(machine_dir(daemon, "crashy")))
    if point != "exec":
        assert left, "the crash point came after the helpers started: they must be running now"
    daemon.env = {}
    daemon.start()
    st = daemon.status("crashy")
    if point == "recorded":  # the start was complete: the VM is adopted, helpers and all
        assert st["state"] == "running" and st["pid"] in left, st
        assert daemon.ctl("kill", "crashy").returncode == 0
    else:
        assert st["state"] == "failed" and "while starting" in st["failure"], st
    poll(lambda: processes_using(Path(machine_dir(daemon, "crashy"))), lambda pids: pids == [], 10)
    assert not (daemon.runtime / "machines" / "crashy").exists()
    assert daemon.ctl("start", "crashy").returncode == 0  # and it starts again, cleanly
    assert daemon.wait_for("crashy", lambda s: s["ready"])["state"] == "running"
    assert daemon.ctl("kill", "crashy").returncode == 0


def adopted_vm_with_a_tpm(daemon: Daemon, guest, name: str, *words: str) -> None:
    """``name`` (with a TPM, and ``words``) running, started by a daemon that was then killed, adopted
    by a new one."""
    p = daemon.ctl("create", name, f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                   "--console=read-only", "--firmware=bios", "--tpm=yes", *GUEST_WORDS,
                   "test.action=hang", *words)
    assert p.returncode == 0, p.stderr
    assert daemon.ctl("start", name).returncode == 0
    daemon.wait_for(name, lambda s: s["ready"])
    daemon.stop_daemon(signal.SIGKILL)
    daemon.start()
    assert daemon.status(name)["state"] == "running"


def test_a_helper_of_an_adopted_vm_that_dies_fails_the_vm(daemon, guest):
    adopted_vm_with_a_tpm(daemon, guest, "adoptee")
    swtpm = [pid for pid in processes_using(Path(machine_dir(daemon, "adoptee")))
             if b"swtpm" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(swtpm) == 1, swtpm
    os.kill(swtpm[0], signal.SIGKILL)
    st = daemon.wait_for("adoptee", lambda s: s["state"] != "running", 30)
    assert st["state"] == "failed" and "swtpm" in st["failure"], st
    poll(lambda: processes_using(Path(machine_dir(daemon, "adoptee"))), lambda pids: pids == [], 10)


def test_what_an_adopted_vms_swtpm_logs_is_reported_as_it_is_logged(daemon, guest, tmp_path):
    """swtpm's log file goes with the runtime dir; a daemon that adopted the run watches it too, and
    shows what it says with the machine at once, and after the run.  The line is written by the test,
    standing for swtpm's (tests/vm/test_daemon.py makes a real swtpm log one)."""
    state = tmp_path / "tpm"
    adopted_vm_with_a_tpm(daemon, guest, "tpmlog", f"--tpm-state={state}")
    line = "SWTPM_NVRAM_StoreData: Error (fatal) opening TMP2-00.permall for write failed"
    with open(Path(machine_dir(daemon, "tpmlog")) / "tpm.log", "a") as log:
        log.write(f"{line}\n")
    warning = f"vmspawnd-tpmlog-tpm logged errors: {line}; the TPM state in {state} may not have been saved"
    st = daemon.wait_for("tpmlog", lambda s: s["warnings"], 10)
    assert st["state"] == "running" and st["warnings"] == [warning], st
    assert daemon.ctl("kill", "tpmlog").returncode == 0
    st = daemon.wait_for("tpmlog", lambda s: s["state"] != "running", 30)
    assert st["warnings"] == [warning], st
    said = [line for line in daemon.log.read_text().splitlines() if "auxiliary service logged errors" in line]
    assert len(said) == 1 and "vmspawnd-tpmlog-tpm" in said[0] and "SWTPM_NVRAM_StoreData" in said[0], said


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_state_disk_is_a_typed_error_and_loses_no_definition(tmp_path, guest):
    d = Daemon(tmp_path)
    d.state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(d.state)], check=True)
    try:
        d.start()
        words = [f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--console=headless"]
        assert d.ctl("create", "first", *words).returncode == 0
        filler = d.state / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        p = d.ctl("create", "second", *words)
        assert p.returncode == 1 and "no space left" in p.stderr, p.stderr
        listed = [m["name"] for m in json.loads(d.ctl("--json", "list").stdout)]
        assert listed == ["first"]  # nothing half-made, nothing lost
        assert json.loads((d.state / "machines" / "first.json").read_text())["name"] == "first"
        filler.unlink()
        assert d.ctl("create", "second", *words).returncode == 0
        assert "Traceback" not in d.log.read_text()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop_daemon()
        subprocess.run(["umount", "-l", str(d.state)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("what, words, file", [
    ("UEFI variables", ["--firmware=uefi"], "efinvram"),
    ("initrds merged", ["--firmware=bios", "--initrd={big}"], "initrd.merged"),
])
def test_a_start_that_fills_the_runtime_dir_says_which_file_and_leaves_nothing(tmp_path, guest, what, words, file):
    """A runtime dir on a small file system (a /run tmpfs): a start that runs out of room there fails
    naming the file it could not write (a full disk's write error names none by itself), in the
    daemon and in ``vmspawn``; nothing of it is left, and a start that fits runs."""
    big = tmp_path / "big.initrd"
    big.write_bytes(os.urandom(400_000))
    words = [w.format(big=big) for w in words]
    d = Daemon(tmp_path)
    d.runtime.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(d.runtime)], check=True)
    try:
        d.start()
        base = [f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M", "--console=headless",
                "--tpm=no", "--vsock=no", *GUEST_WORDS]
        assert d.ctl("create", "full", *base, *words).returncode == 0
        p = d.ctl("start", "full")
        vm_dir = d.runtime / "machines" / "full"
        assert p.returncode == 1, p
        assert f"cannot start full ({vm_dir}/{file}): no space left on the device" in p.stderr, (what, p.stderr)
        assert not vm_dir.exists() and processes_using(vm_dir) == []
        env = {**os.environ, "RUNTIME_DIRECTORY": str(d.runtime / "fg")}
        p = subprocess.run([*VMSPAWN, "-M", "fg", *base, *words], capture_output=True, text=True, env=env,
                           stdin=subprocess.DEVNULL, timeout=60)
        assert p.returncode == 1 and f"cannot start fg ({d.runtime}/fg/fg/{file}): no space left" in p.stderr, p
        assert not (d.runtime / "fg" / "fg").exists() and processes_using(d.runtime / "fg") == []
        assert d.ctl("create", "fits", *base, "--firmware=bios").returncode == 0
        assert d.ctl("start", "fits").returncode == 0, "a start that fits runs"
        assert d.ctl("kill", "fits").returncode == 0
        poll(lambda: processes_using(Path(machine_dir(d, "fits"))), lambda pids: pids == [], 20)
        assert "Traceback" not in d.log.read_text()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop_daemon()
        subprocess.run(["umount", "-l", str(d.runtime)], check=False)


def test_a_start_whose_run_cannot_be_recorded_fails_and_leaves_no_vm(tmp_path, guest):
    """Without its record, a restarted daemon would take a running VM for a start it interrupted
    and end it: such a start fails at once (typed, naming where), and nothing of it runs on."""
    d = Daemon(tmp_path)
    d.start()
    records = d.runtime / "machines" / "norecord.run"
    records.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,nr_inodes=2,mode=0700", "tmpfs", str(records)], check=True)
    try:
        (records / ".lock").touch()  # the last inode: run.json cannot be made
        words = [f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--console=headless", "--tpm=no"]
        assert d.ctl("create", "norecord", *words).returncode == 0
        p = d.ctl("start", "norecord")
        assert p.returncode == 1 and f"cannot record the run in {records}: no space left" in p.stderr, p.stderr
        status = json.loads(d.ctl("--json", "status", "norecord").stdout)
        assert status["state"] == "failed" and "cannot record the run" in status["failure"], status
        assert processes_using(d.runtime / "machines" / "norecord") == []
        assert "Traceback" not in d.log.read_text()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop_daemon()
        subprocess.run(["umount", "-l", str(records)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_start_whose_helper_cannot_be_recorded_stops_it_and_keeps_the_tpm_state(tmp_path, guest):
    """A helper is recorded the moment it is up (a daemon killed later must find it): where that record
    cannot be written, the start fails, typed and naming where, the helper (a real swtpm) is stopped,
    and the VM's TPM state is as it was; the next start, with room again, runs."""
    d = Daemon(tmp_path)
    d.args = ["--verbose"]  # (it logs each helper it starts and stops)
    d.start()
    state = tmp_path / "tpm"
    words = [f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M", "--console=headless",
             "--firmware=bios", "--tpm=yes", f"--tpm-state={state}", *GUEST_WORDS, "test.action=hang"]
    records = d.runtime / "machines" / "tpmrecord.run"
    try:
        assert d.ctl("create", "tpmrecord", *words).returncode == 0
        assert d.ctl("start", "tpmrecord").returncode == 0  # the TPM state is made
        d.wait_for("tpmrecord", lambda s: s["ready"])
        assert d.ctl("kill", "tpmrecord").returncode == 0
        d.wait_for("tpmrecord", lambda s: s["state"] != "running")
        before = {f.name: f.read_bytes() for f in state.iterdir()}
        assert before, "swtpm kept no state"
        records.mkdir(parents=True, exist_ok=True)
        # one page: the run's first record fits; its next one (the helper's) needs a second page beside it
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0700", "tmpfs", str(records)], check=True)
        logged = len(d.log.read_text().splitlines())
        p = d.ctl("start", "tpmrecord")
        assert p.returncode == 1 and f"cannot record the run in {records}: no space left" in p.stderr, p.stderr
        said = [line for line in d.log.read_text().splitlines()[logged:] if "vmspawnd-tpmrecord-tpm" in line]
        events = [e for line in said for e in ("started", "stopped") if f'"service {e}"' in line]
        assert events == ["started", "stopped"], said  # swtpm was started (its record was refused), stopped
        assert not any('"spawning qemu"' in line for line in d.log.read_text().splitlines()[logged:])
        status = d.status("tpmrecord")
        assert status["state"] == "failed" and "cannot record the run" in status["failure"], status
        poll(lambda: processes_using(Path(machine_dir(d, "tpmrecord"))), lambda pids: pids == [], 10)
        assert {f.name: f.read_bytes() for f in state.iterdir()} == before
        subprocess.run(["umount", str(records)], check=True)
        assert d.ctl("start", "tpmrecord").returncode == 0
        assert d.wait_for("tpmrecord", lambda s: s["ready"])["state"] == "running"
        assert d.ctl("kill", "tpmrecord").returncode == 0
        assert "Traceback" not in d.log.read_text()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.clean_up()
        subprocess.run(["umount", "-l", str(records)], check=False, stderr=subprocess.DEVNULL)


async def test_a_vm_that_ends_as_the_daemon_stops_is_cleaned_up_not_left_for_adoption(tmp_path, guest):
    """A daemon that stops lets go of its running VMs for the next one to adopt; one whose QEMU has
    just exited (before its run saw it) is not let go of: its run ends as any ended VM's does, and the
    next daemon finds it stopped, with nothing of it left to adopt."""
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    manager.create(config_from_json("ending", {
        "linux": str(guest.kernel), "initrds": [str(guest.initrd)], "ram": "256M", "console": "headless",
        "firmware": "bios", "tpm": "no", "vsock": "no", "kernelCommandLine": ["panic=-1"]}))
    await manager.start("ending")
    machine = manager.machines["ending"].machine
    run = machine.run
    assert run is not None and run.qemu is not None and machine.state is State.RUNNING
    runtime = run.runtime.path
    os.kill(run.qemu.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while run.qemu.alive and time.monotonic() < deadline:  # (the event loop does not run meanwhile: the run
        time.sleep(0.01)  # has not seen the exit when the daemon stops)
    assert not run.qemu.alive
    await manager.shutdown()
    assert not run.detached and machine.state is not State.RUNNING, machine.state
    assert not runtime.exists()

    again = Manager(tmp_path / "state", tmp_path / "run")
    await again.load()
    after = again.machines["ending"].machine
    assert after.run is None and after.state in (State.STOPPED, State.FAILED), after.state
    await again.shutdown()
