# SPDX-License-Identifier: LGPL-2.1-or-later
"""Reboot, Pause and Resume of a daemon's machine (``vmspawnctl reboot|pause|resume``) on real QEMU
guests: what the guest does, what clients see, and a Stop racing them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.conftest import Daemon, EventFollower
from tests.polling import poll
from tests.vm.clients import at_once
from tests.vm.test_daemon import create
from tests.vm.test_machine_instance import IFACE, bare_call, control
from vmspawnd.guest.channel import NotifyParser
from vmspawnd.qemu.qmp import Qmp
from vmspawnd.testing.bare import bare_qemu_argv
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = pytest.mark.vm


def test_a_paused_guest_does_not_run_until_resumed_and_a_stop_powers_it_off_cleanly(daemon: Daemon, guest) -> None:
    create(daemon, guest, "nap", "test.action=acpi", "test.delay=2")  # READY=1 two seconds into the guest's init
    assert daemon.ctl("pause", "nap").returncode == 1  # (not running yet)
    with EventFollower(daemon, "nap") as follower:
        assert daemon.ctl("start", "nap").returncode == 0
        assert at_once(daemon, ["pause", "nap"], ["pause", "nap"]) == [(0, "Paused nap.\n", "")] * 2
        assert bare_call(control(daemon, "nap"), f"{IFACE}.Describe")["parameters"] == {
            "running": False, "status": "paused"}  # what QEMU says
        shown = daemon.status("nap")
        assert (shown["state"], shown["paused"], shown["ready"]) == ("running", True, False), shown
        assert "running (paused)" in daemon.ctl("status", "nap").stdout
        assert daemon.ctl("--no-legend", "list").stdout.split()[:2] == ["nap", "paused"]
        time.sleep(8)  # long enough to boot and say READY=1 (≈ 3 s here): a paused guest does not
        assert not daemon.status("nap")["ready"]
        kinds = poll(follower.kinds, lambda k: "paused" in k, 10)
        assert kinds.count("paused") == 1, kinds  # two clients' pauses: one pause

    daemon.stop_daemon()  # the VM stays paused; the next daemon finds it so
    daemon.start()
    assert daemon.wait_for("nap", lambda s: s["state"] == "running")["paused"] is True
    assert daemon.ctl("resume", "nap").stdout == "Resumed nap.\n"
    shown = daemon.wait_for("nap", lambda s: s["ready"], 60)
    assert shown["paused"] is False and shown["status"] == "test guest ready", shown

    assert daemon.ctl("pause", "nap").returncode == 0
    p = daemon.ctl("stop", "nap", "--timeout=30")  # a paused guest cannot see the power button: resumed first
    assert (p.returncode, p.stdout) == (0, "Stopped nap (exit status 0).\n"), (p.stdout, p.stderr)
    shown = daemon.status("nap")
    assert (shown["exitStatus"], shown["warnings"], shown["paused"]) == (0, [], False), shown
    p = daemon.ctl("resume", "nap")
    assert p.returncode == 1 and "nap is stopped; only a running machine can be resumed" in p.stderr, p.stderr


def test_a_guest_that_suspends_itself_is_shown_suspended_and_resume_or_stop_wakes_it(daemon: Daemon, guest) -> None:
    create(daemon, guest, "sleepy", "test.action=suspend")  # S3 once ready; once woken: STATUS=woke up
    with EventFollower(daemon, "sleepy") as follower:
        assert daemon.ctl("start", "sleepy").returncode == 0
        shown = daemon.wait_for("sleepy", lambda s: s["suspended"], 60)
        assert (shown["state"], shown["paused"], shown["ready"]) == ("running", False, True), shown
        assert "running (ready, suspended)" in daemon.ctl("status", "sleepy").stdout
        assert daemon.ctl("--no-legend", "list").stdout.split()[:2] == ["sleepy", "suspended"]
        assert follower.kinds().count("suspended") == 1, follower.kinds()

    daemon.stop_daemon()  # the next daemon finds it suspended (QEMU says so)
    daemon.start()
    assert daemon.wait_for("sleepy", lambda s: s["state"] == "running")["suspended"] is True
    with EventFollower(daemon, "sleepy") as follower:
        assert daemon.ctl("resume", "sleepy").stdout == "Resumed sleepy.\n"
        shown = daemon.wait_for("sleepy", lambda s: s["status"] == "woke up", 60)  # the guest's own word
        assert shown["suspended"] is False and shown["ready"], shown  # (it goes on: no new boot)
        assert poll(follower.kinds, lambda k: "woke" in k, 10).count("woke") == 1 and "reset" not in follower.kinds()
    assert daemon.ctl("kill", "sleepy").returncode == 0

    # a suspended guest cannot see the power button: a Stop wakes it first.  (Woken, this test guest
    # cannot power off by ACPI on QEMU 7.2's q35, see its init: here the Stop ends by forcing it off.)
    assert daemon.ctl("start", "sleepy").returncode == 0
    daemon.wait_for("sleepy", lambda s: s["suspended"], 60)
    with EventFollower(daemon, "sleepy") as follower:  # a reboot boots it again (it suspends again once ready)
        assert daemon.ctl("reboot", "sleepy").returncode == 0
        kinds = poll(follower.kinds, lambda k: k.count("suspended") == 1, 60)
        assert kinds[:2] == ["woke", "reset"], kinds  # (woken first: a reset in S3 would only wake it)
        assert daemon.wait_for("sleepy", lambda s: s["ready"] and s["suspended"], 60)["status"] == "test guest ready"
    with EventFollower(daemon, "sleepy") as follower:
        p = daemon.ctl("stop", "sleepy", "--timeout=5")
        assert p.returncode == 0 and p.stdout.startswith("Stopped sleepy ("), (p.stdout, p.stderr)
        kinds = poll(follower.kinds, lambda k: "stopped" in k or "failed" in k, 10)
        said = [e.get("status") for e in follower.events() if e["event"] == "status"]
        assert "woke" in kinds and said == ["woke up"], follower.events()
    assert daemon.status("sleepy")["suspended"] is False


def test_a_pause_that_qemu_does_not_answer_fails_with_why_and_what_clients_see_follows_qemu(
        daemon: Daemon, guest) -> None:
    create(daemon, guest, "stuck", "test.action=acpi")
    assert daemon.ctl("start", "stuck").returncode == 0
    pid = daemon.wait_for("stuck", lambda s: s["ready"], 60)["pid"]
    os.kill(pid, signal.SIGSTOP)  # (a hung QEMU: its monitor does not answer)
    try:
        p = daemon.ctl("pause", "stuck")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert p.returncode == 1 and ("stuck could not be paused: QEMU's monitor did not answer stop within 5 s; "
                                  "QEMU may still do it once it answers") in p.stderr, p.stderr
    # it did, once it ran again: the machine shows what QEMU did, and answers the next command
    assert daemon.wait_for("stuck", lambda s: s["paused"], 10)["state"] == "running"
    assert daemon.ctl("resume", "stuck").stdout == "Resumed stuck.\n"
    assert daemon.status("stuck")["paused"] is False
    p = daemon.ctl("stop", "stuck", "--timeout=30")
    assert (p.returncode, p.stdout) == (0, "Stopped stuck (exit status 0).\n"), (p.stdout, p.stderr)


def test_reboot_boots_the_guest_again_in_the_same_qemu_even_when_paused(daemon: Daemon, guest, tmp_path: Path) -> None:
    disk = tmp_path / "bootcount.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    create(daemon, guest, "again", "test.action=acpi", f"--extra-drive=raw:{disk}", "test.bootcount=vda")
    assert daemon.ctl("start", "again").returncode == 0
    first = daemon.wait_for("again", lambda s: s["ready"], 60)
    assert "(boot 1)" in first["status"], first

    assert daemon.ctl("reboot", "again").stdout == "Rebooted again.\n"
    second = daemon.wait_for("again", lambda s: s["ready"] and "(boot 2)" in (s["status"] or ""), 90)
    assert second["pid"] == first["pid"] and disk.read_bytes()[:2] == b"2\n"

    assert daemon.ctl("pause", "again").returncode == 0
    assert daemon.ctl("reboot", "again").returncode == 0  # a paused machine boots again, not paused
    third = daemon.wait_for("again", lambda s: s["ready"] and "(boot 3)" in (s["status"] or ""), 90)
    assert third["pid"] == first["pid"] and third["paused"] is False, third

    # a pause racing a stop: whichever comes first, the guest powers off by itself
    outcomes = at_once(daemon, ["stop", "again", "--timeout=30"], ["pause", "again"])
    assert outcomes[0] == (0, "Stopped again (exit status 0).\n", ""), outcomes
    assert outcomes[1] == (0, "Paused again.\n", "") or (  # (a pause after the stop's start is refused)
        outcomes[1][0] == 1 and "only a running machine can be paused" in outcomes[1][2]), outcomes
    end = daemon.status("again")
    assert (end["state"], end["exitStatus"], end["warnings"]) == ("stopped", 0, []), end


@contextlib.contextmanager
def started_on_a_full_disk(daemon: Daemon, guest, where: Path) -> Iterator[tuple[Path, Path]]:
    """Machine ``filled`` started, its extra drive a sparse 1 MiB image on a small tmpfs that a filler
    file has filled: the guest's first write (its boot count) needs a block the file system lacks.
    Yields (disk, filler); remove the filler to make room.  The VM is killed, the tmpfs unmounted after."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=True)
    try:
        disk = where / "disk.raw"
        disk.write_bytes(b"")
        os.truncate(disk, 1 << 20)
        filler = where / "filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):  # until the file system is full
            while f.write(b"\0" * 1024):
                pass
        create(daemon, guest, "filled", "test.action=acpi", f"--extra-drive=raw:{disk}", "test.bootcount=vda")
        assert daemon.ctl("start", "filled").returncode == 0
        yield disk, filler
    finally:
        daemon.ctl("kill", "filled")
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def qemu_status(qmp: Path) -> str:
    """The VM's run state as QEMU says it on its monitor socket (while no daemon holds it)."""
    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        reply = monitor.cmd("query-status")  # (its "return")
        assert isinstance(reply, dict), reply
        return reply["status"]
    finally:
        monitor.close()


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root only)")


@ROOT_ONLY
def test_a_vm_whose_disk_fills_up_is_paused_with_the_reason_and_runs_on_once_resumed(
        daemon: Daemon, guest, tmp_path: Path) -> None:
    with started_on_a_full_disk(daemon, guest, tmp_path / "full") as (disk, filler):
        why = f"a write of its disk {disk} failed (No space left on device): QEMU paused the VM until it is resumed"
        shown = daemon.wait_for("filled", lambda s: s["paused"], 60)
        assert (shown["state"], shown["ready"], shown["warnings"]) == ("running", False, [why]), shown
        assert f"Warning: {why}" in daemon.ctl("status", "filled").stdout

        daemon.stop_daemon()  # the next daemon finds it paused by QEMU, and shows the same warning
        daemon.start()
        shown = daemon.wait_for("filled", lambda s: s["state"] == "running")
        assert shown["paused"] and shown["warnings"] == [why], shown

        filler.unlink()  # room again: resumed, QEMU writes what failed, and the guest goes on
        assert daemon.ctl("resume", "filled").returncode == 0
        shown = daemon.wait_for("filled", lambda s: s["ready"], 60)
        assert "(boot 1)" in shown["status"] and not shown["paused"], shown
        assert disk.read_bytes()[:2] == b"1\n"
        assert daemon.ctl("stop", "filled").returncode == 0
        assert daemon.status("filled")["warnings"] == shown["warnings"]  # kept until the next start


@ROOT_ONLY
def test_a_disk_that_fills_while_no_daemon_runs_is_shown_by_the_next_daemon(
        daemon: Daemon, guest, tmp_path: Path) -> None:
    with started_on_a_full_disk(daemon, guest, tmp_path / "full") as (disk, _):
        daemon.stop_daemon()  # (≈ 2 s before the guest's first write: the kernel boots first)
        qmp = daemon.runtime / "machines" / "filled" / "qmp.sock"  # (no daemon to ask meanwhile: QEMU is)
        poll(lambda: qemu_status(qmp), lambda status: status == "io-error", 60)
        daemon.start()
        shown = daemon.wait_for("filled", lambda s: s["state"] == "running")
        assert shown["paused"] and not shown["ready"], shown
        assert shown["warnings"] == [f"a request of its disk {disk} failed (No space left on device): QEMU paused "
                                     "the VM until it is resumed"], shown  # (QEMU's query-block names it)


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
@pytest.mark.parametrize("forgotten", [True, False], ids=["forgotten", "as-qemu-left-it"])
async def test_a_reset_right_after_a_wake_up_boots_a_suspended_guest_anew_once_its_suspend_is_forgotten(
        tmp_path, guest, forgotten, firmware) -> None:
    """What a reboot of a suspended guest relies on (Run.reboot), on a bare QEMU: with its suspend
    forgotten, the guest boots again even from a wake-up and a reset sent at once (before its firmware
    can run: the worst case).  As QEMU leaves it, a reset before the firmware ran is taken for the
    wake-up and the guest resumes (says "woke up") instead, as a reboot on a loaded host once did:
    shown here without a race, by a reset in S3 (QEMU runs the firmware only at the ``cont``).  Both
    firmwares read the same mark: SeaBIOS and UEFI (OVMF)."""
    notify_path, qmp_path = tmp_path / "notify.sock", tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as notify, socket.socket(socket.AF_UNIX) as monitor:
        notify.bind(str(notify_path))
        notify.listen(1)
        monitor.bind(str(qmp_path))
        monitor.listen(1)
        argv = bare_qemu_argv(guest, (*GUEST_WORDS, "test.action=suspend"),
                              qmp_fd=monitor.fileno(), notify_path=notify_path, firmware=firmware,
                              runtime_dir=tmp_path)
        qemu = subprocess.Popen(argv, pass_fds=[monitor.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            loop = asyncio.get_running_loop()
            notify.setblocking(False)
            channel, _ = await asyncio.wait_for(loop.sock_accept(notify), 60)
            with channel:  # (the guest's notify port)
                said: list[tuple[str, str]] = []
                parser = NotifyParser()

                async def until(pair: tuple[str, str]) -> None:
                    while pair not in said:
                        said.extend(parser.feed(await loop.sock_recv(channel, 65536)))

                async with Qmp("s3") as qmp:
                    await qmp.connect(str(qmp_path))
                    await asyncio.wait_for(until(("STATUS", "test guest ready")), 120)
                    async with asyncio.timeout(60):
                        while (await qmp.query_status())[1] != "suspended":
                            await asyncio.sleep(0.1)
                    del said[:]
                    if forgotten:  # as Run.reboot: forgotten, then the wake-up and the reset at once
                        await qmp.forget_suspend()
                        await asyncio.gather(qmp.wakeup(), qmp.reset())
                    else:  # a reset before the firmware ran, without a race: in S3 (it runs at the cont)
                        await qmp.reset()
                        await qmp.resume()
                    first = ("READY", "1") if forgotten else ("STATUS", "woke up")
                    await asyncio.wait_for(until(first), 60)
                    assert (("STATUS", "woke up") in said) != forgotten, said
        finally:
            qemu.kill()
            qemu.wait()
