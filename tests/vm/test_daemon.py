# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon for real: a vmspawnd process, varlink clients, real QEMU guests."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from asyncvarlink import VarlinkClientProtocol, VarlinkInterfaceProxy, connect_unix_varlink

from tests.conftest import Daemon, EventFollower, process_gone, processes_mentioning, processes_using, tempdir_daemon
from tests.polling import poll
from tests.systemd.helpers import unwanted_libraries
from tests.vm.clients import at_once
from vmspawnd.interface import ManagerInterface
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = pytest.mark.vm

def create(daemon: Daemon, guest, name: str, *words: str, console: str = "read-only") -> None:
    p = daemon.ctl("create", name, f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                   f"--console={console}", "--firmware=bios", *GUEST_WORDS, *words)
    assert p.returncode == 0, p.stderr


def test_socket_is_open_to_local_users_but_not_executable(daemon):
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)  # every call is authorized by its caller
    assert mode == 0o666, oct(mode)


def test_where_nothing_is_done_to_qemus_process_first_the_daemon_spawns_it_with_none_of_its_fds(tmp_path, guest):
    """No systemd here (no scope to put QEMU in first) and QEMU runs as the daemon's user: the daemon
    spawns QEMU itself once all is ready, keeps no launcher ahead of need, and QEMU gets none of the
    descriptors the daemon was started with (as systemd's socket, or what a shell left open)."""
    inherited, other_end = os.pipe()
    os.set_inheritable(inherited, True)
    daemon = Daemon(tmp_path)
    daemon.pass_fds = (inherited,)
    try:
        daemon.start()
        assert daemon.proc is not None
        pipe = os.readlink(f"/proc/self/fd/{inherited}")
        assert pipe in fd_targets(daemon.proc.pid)  # the daemon has it
        create(daemon, guest, "direct", "test.action=hang")
        assert daemon.ctl("start", "direct").returncode == 0
        pid = daemon.status("direct")["pid"]
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1] == str(daemon.proc.pid)
        assert pipe not in fd_targets(pid)
        assert daemon.wait_for("direct", lambda s: s["ready"])["state"] == "running"
        assert daemon.spare_launchers() == []  # none was needed, so none waits
        assert daemon.ctl("kill", "direct").returncode == 0
    finally:
        daemon.clean_up()
        os.close(inherited)
        os.close(other_end)


def fd_targets(pid: int) -> set[str]:
    """What the descriptors of process ``pid`` lead to."""
    targets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # (closed meanwhile)
            targets.add(os.readlink(fd))
    return targets


def test_two_vms_in_parallel_and_events_up_to_ready_and_stopped(daemon, guest):
    with EventFollower(daemon) as follower:  # every machine's
        create(daemon, guest, "par1", "test.action=acpi", "test.exit=4")
        create(daemon, guest, "par2", "test.action=acpi")
        for name in ("par1", "par2"):
            assert daemon.ctl("start", name).returncode == 0
        for name in ("par1", "par2"):
            st = daemon.wait_for(name, lambda s: s["ready"])
            assert st["state"] == "running" and st["pid"] > 0
        listed = json.loads(daemon.ctl("--json", "list").stdout)
        assert {m["name"]: m["state"] for m in listed} == {"par1": "running", "par2": "running"}
        assert daemon.ctl("stop", "par1", "--timeout=60").returncode == 0
        assert daemon.ctl("stop", "par2", "--timeout=60").returncode == 0
        assert daemon.status("par1")["exitStatus"] == 4  # the guest's EXIT_STATUS, after a graceful power-off
        assert daemon.status("par2")["state"] == "stopped"
        seen = poll(lambda: [(e["machine"], e["event"]) for e in follower.events()],
                    lambda seen: ("par2", "stopped") in seen, 10)
    for name in ("par1", "par2"):
        for kind in ("created", "starting", "running", "ready", "stopping", "stopped"):
            assert (name, kind) in seen, (name, kind, seen)
        assert seen.index((name, "running")) < seen.index((name, "ready")) < seen.index((name, "stopped"))


def test_forced_stop_of_a_guest_that_ignores_the_power_button(daemon, guest):
    create(daemon, guest, "deaf", "test.action=hang")
    assert daemon.ctl("start", "deaf").returncode == 0
    daemon.wait_for("deaf", lambda s: s["ready"])
    with EventFollower(daemon, "deaf") as follower:
        started = time.monotonic()
        outcomes = at_once(daemon, *[["stop", "deaf", "--timeout=1"]] * 2)  # two clients at once
        assert time.monotonic() - started < 15
        forced = "the guest did not power off within 1 s; it was forced off"
        for outcome in outcomes:  # each is told why the exit status is 1, and it is said once
            assert outcome == (0, f"Stopped deaf (exit status 1): {forced}.\n", ""), outcome
        stopped = poll(lambda: [e for e in follower.events() if e["event"] == "stopped"], bool, 10)
        assert stopped[0]["reason"] == forced, stopped  # a follower of its events is told too
    st = daemon.status("deaf")
    assert st["state"] == "stopped" and st["exitStatus"] == 1 and st["warnings"] == [forced], st
    assert processes_using(daemon.runtime / "machines" / "deaf") == []
    daemon.stop_daemon()
    daemon.start()
    assert daemon.status("deaf")["warnings"] == [forced]  # kept for the next daemon
    assert daemon.ctl("start", "deaf").returncode == 0
    assert daemon.status("deaf")["warnings"] == []  # until the next start
    assert daemon.ctl("kill", "deaf").returncode == 0


def test_a_stopped_qemu_is_forced_off_within_the_stops_timeout_and_signals_are_sent_as_asked(daemon, guest):
    create(daemon, guest, "frozen", "test.action=hang")
    assert daemon.ctl("start", "frozen").returncode == 0
    pid = daemon.wait_for("frozen", lambda s: s["ready"])["pid"]
    p = daemon.ctl("kill", "frozen", "--signal=SIGSTOP")  # QEMU now answers nothing, QMP included
    assert p.returncode == 0 and "Sent SIGSTOP to frozen's QEMU; the machine is running." in p.stdout, p
    bad = daemon.ctl("kill", "frozen", "--signal=SIGRTMAX+1")
    assert bad.returncode == 2 and "invalid signal=SIGRTMAX+1" in bad.stderr
    started = time.monotonic()
    stops = [subprocess.Popen([*daemon.ctl_argv(), "stop", "frozen", "--timeout=1"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # two clients at once
    outcomes = [(p.wait(30), *p.communicate()) for p in stops]
    took = time.monotonic() - started
    assert [rc for rc, _, _ in outcomes] == [0, 0], outcomes
    assert took < 8, took  # 1 s for the power button, ≤ 2 s for QMP's quit, then SIGKILL (it was 15 s)
    st = daemon.status("frozen")
    assert st["state"] == "stopped" and process_gone(pid)
    assert st["warnings"] == ["the guest did not power off within 1 s; it was forced off"], st  # said once


@pytest.mark.parametrize("frozen", [False, True])  # (frozen: QMP does not answer the power button either)
def test_a_stop_cut_short_by_the_daemons_shutdown_is_no_success(daemon, guest, frozen):
    create(daemon, guest, "cutshort", "test.action=hang")  # (it ignores the power button)
    assert daemon.ctl("start", "cutshort").returncode == 0
    pid = daemon.wait_for("cutshort", lambda s: s["ready"])["pid"]
    if frozen:
        os.kill(pid, signal.SIGSTOP)
    stop = subprocess.Popen([*daemon.ctl_argv(), "stop", "cutshort", "--timeout=60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    daemon.wait_for("cutshort", lambda s: s["state"] == "stopping")
    daemon.stop_daemon(signal.SIGTERM)
    out, err = stop.communicate(timeout=30)
    assert stop.returncode == 1 and "Stopped" not in out, (out, err)
    assert "vmspawnd stopped before stopping it finished; the VM still runs" in err
    time.sleep(0.5)
    assert not process_gone(pid)  # (the daemon let go of it: nothing was sent to it on the way out)
    os.kill(pid, signal.SIGCONT)
    daemon.start()
    assert daemon.status("cutshort")["pid"] == pid  # taken over again, and stoppable
    assert daemon.ctl("kill", "cutshort").returncode == 0 and process_gone(pid)


def test_a_qemu_terminated_from_outside_is_reported_as_killed(daemon, guest):
    create(daemon, guest, "victim", "test.action=hang")
    assert daemon.ctl("start", "victim").returncode == 0
    pid = daemon.wait_for("victim", lambda s: s["ready"])["pid"]
    os.kill(pid, signal.SIGTERM)  # as machinectl terminate does: QEMU then shuts down and exits 0
    st = daemon.wait_for("victim", lambda s: s["state"] != "running", 30)
    assert st["state"] == "failed" and st["exitStatus"] == 1 and "signal from outside" in st["failure"], st
    create(daemon, guest, "ours", "test.action=hang")  # while our own Kill is no failure
    assert daemon.ctl("start", "ours").returncode == 0
    daemon.wait_for("ours", lambda s: s["ready"])
    assert daemon.ctl("kill", "ours").returncode == 0
    st = daemon.status("ours")
    assert st["state"] == "stopped" and st["exitStatus"] == 1 and st["failure"] is None, st


def test_a_signal_that_does_not_end_qemu_leaves_its_run_as_it_was(daemon, guest):
    """Kill --signal=SIGCONT is no stop: pause still works, and a crash afterwards is still one."""
    create(daemon, guest, "nudged", "test.action=hang")
    assert daemon.ctl("start", "nudged").returncode == 0
    pid = daemon.wait_for("nudged", lambda s: s["ready"])["pid"]
    p = daemon.ctl("kill", "nudged", "--signal=SIGCONT")
    assert p.returncode == 0 and "the machine is running" in p.stdout, p
    for command in ("pause", "resume", "reboot"):
        p = daemon.ctl(command, "nudged")
        assert p.returncode == 0, (command, p.stderr)
    daemon.wait_for("nudged", lambda s: s["ready"])
    os.kill(pid, signal.SIGKILL)  # from outside: a failure, as without the earlier signal
    st = daemon.wait_for("nudged", lambda s: s["state"] != "running", 30)
    assert st["state"] == "failed" and st["failure"] == "QEMU killed by signal SIGKILL", st
    create(daemon, guest, "ended", "test.action=hang")  # while a signal that ends it was asked for
    assert daemon.ctl("start", "ended").returncode == 0
    daemon.wait_for("ended", lambda s: s["ready"])
    assert daemon.ctl("kill", "ended", "--signal=SIGTERM").returncode == 0
    st = daemon.wait_for("ended", lambda s: s["state"] != "running", 30)
    assert st["state"] == "stopped" and st["exitStatus"] == 1 and st["failure"] is None, st


def test_daemon_sigkill_and_restart_readopts_a_running_vm(daemon, guest):
    create(daemon, guest, "survivor", "test.action=acpi", "test.exit=6")
    assert daemon.ctl("start", "survivor").returncode == 0
    pid = daemon.wait_for("survivor", lambda s: s["ready"])["pid"]
    daemon.stop_daemon(signal.SIGKILL)
    assert not process_gone(pid)  # the VM outlived the daemon
    daemon.start()
    st = daemon.status("survivor")
    assert st["state"] == "running" and st["pid"] == pid and st["ready"]
    assert daemon.ctl("stop", "survivor").returncode == 0  # still controllable: QMP reconnected
    assert daemon.status("survivor")["exitStatus"] == 6  # and the notify channel too
    assert process_gone(pid)


def test_a_vm_started_by_the_previous_version_is_adopted_after_an_upgrade(daemon, guest):
    """Before runs had a records dir, run.json sat in the VM's runtime dir (then always root's)."""
    create(daemon, guest, "older", "test.action=acpi")
    assert daemon.ctl("start", "older").returncode == 0
    info = daemon.wait_for("older", lambda s: s["ready"])
    daemon.stop_daemon(signal.SIGKILL)
    runtime = Path(info["runtimeDirectory"])
    records = runtime.with_name("older.run")
    (records / "run.json").rename(runtime / "run.json")  # the layout the previous version left
    shutil.rmtree(records)
    daemon.start()
    st = daemon.status("older")
    assert (st["state"], st["pid"], st["ready"]) == ("running", info["pid"], True)  # adopted, not ended
    assert (records / "run.json").is_file() and not (runtime / "run.json").exists()
    assert daemon.ctl("stop", "older").returncode == 0 and daemon.status("older")["exitStatus"] == 0


def _start_held_in_its_copy(daemon, guest, tmp_path) -> tuple[subprocess.Popen[str], list[int]]:
    """A ``vmspawnctl start`` of a machine whose --ephemeral tree is being copied, its cp held stopped
    (so the copy never ends on its own); and the cp's pids."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20_000):
        (tree / f"f{i}").write_text("x")
    create(daemon, guest, "slow", "test.action=hang", f"--directory={tree}", "--ephemeral", "--tpm=no")
    start = subprocess.Popen([*daemon.ctl_argv(), "start", "slow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True)
    try:
        copy = poll(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".#tree.")], bool, 60, 0.01)[0]
        copying = poll(lambda: processes_mentioning(f"{copy}/"), bool, 60, interval=0.001)
        for pid in copying:
            os.kill(pid, signal.SIGSTOP)
        assert daemon.status("slow")["state"] == "starting"
    except BaseException:
        start.kill()
        raise
    return start, copying


def _undone_and_left_nothing(daemon, copying: list[int], tmp_path) -> None:
    st = daemon.status("slow")
    assert (st["state"], st["exitStatus"], st["failure"], st["pid"]) == ("stopped", 1, None, None), st
    assert all(process_gone(pid) for pid in copying)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".#")] == []
    assert daemon.ctl("start", "slow").returncode == 0  # and it starts again
    assert daemon.wait_for("slow", lambda s: s["ready"])["state"] == "running"
    assert daemon.ctl("kill", "slow").returncode == 0


def test_a_kill_undoes_a_start_that_is_still_setting_up(daemon, guest, tmp_path):
    """Kill while a Start copies an --ephemeral tree undoes that start at once, where it waited for the
    start to finish first: the Start is told, the machine is stopped (no failure, as after a Kill of a
    running VM), no cp or copy is left."""
    start, copying = _start_held_in_its_copy(daemon, guest, tmp_path)
    try:
        killed = daemon.ctl("kill", "slow", timeout=30)
        assert killed.returncode == 0, killed.stderr
        _, said = start.communicate(timeout=30)
    finally:
        start.kill()
    assert start.returncode != 0 and "slow was killed while it was starting" in said, said
    _undone_and_left_nothing(daemon, copying, tmp_path)


def test_a_daemon_that_stops_undoes_a_start_that_is_still_setting_up(daemon, guest, tmp_path):
    """The daemon's own stop (SIGTERM, as systemctl stop sends) during a Start's --ephemeral copy undoes
    that start at once, where it waited for the copy to finish (for ever here; past the unit's stop
    timeout with a large tree, killed with its copy half made).  Nothing is left, and the next daemon
    shows the machine stopped, startable."""
    start, copying = _start_held_in_its_copy(daemon, guest, tmp_path)
    try:
        daemon.stop_daemon()  # (waits 30 s at most)
        start.communicate(timeout=30)
    finally:
        start.kill()
    assert start.returncode != 0
    daemon.start()
    _undone_and_left_nothing(daemon, copying, tmp_path)


def test_daemon_sigterm_leaves_vms_running(daemon, guest, tmp_path):
    tree = tmp_path / "tree"  # an --ephemeral directory VM: its copy must outlive the daemon too
    (tree / "etc").mkdir(parents=True)
    create(daemon, guest, "keeper", "test.action=hang", f"--directory={tree}", "--ephemeral", "--tpm=no")
    assert daemon.ctl("start", "keeper").returncode == 0
    pid = daemon.wait_for("keeper", lambda s: s["ready"])["pid"]
    copies = [p for p in tmp_path.iterdir() if p.name.startswith(".#tree.")]
    assert len(copies) == 1
    daemon.stop_daemon(signal.SIGTERM)
    time.sleep(0.5)
    assert not process_gone(pid) and copies[0].is_dir()
    daemon.start()
    assert daemon.status("keeper")["pid"] == pid
    assert daemon.ctl("kill", "keeper").returncode == 0
    assert daemon.status("keeper")["state"] == "stopped"
    assert not copies[0].exists() and tree.is_dir()  # the re-adopting daemon removed the copy, not the tree


def read_console(daemon: Daemon, name: str, until: bytes = b"ready") -> tuple[str, bytes]:
    """OpenConsole: where the fd it passed leads, and what it shows (scrollback first) up to ``until``."""

    async def read() -> tuple[str, bytes]:
        transport, protocol = await connect_unix_varlink(VarlinkClientProtocol, daemon.socket)
        proxy = VarlinkInterfaceProxy(protocol, ManagerInterface)
        with await proxy.OpenConsole(name=name) as reply:
            fd = os.dup(reply["fileDescriptor"].fileno())
        transport.close()
        target = os.readlink(f"/proc/self/fd/{fd}")
        data = b""
        try:
            while until not in data and select.select([fd], [], [], 5)[0]:
                data += os.read(fd, 65536)
        finally:
            os.close(fd)  # hanging up: the daemon lets go of this viewer
        return target, data

    return asyncio.run(read())


def test_a_transient_tpm_comes_from_a_state_made_ahead_and_is_never_shared(daemon, guest):
    create(daemon, guest, "tpmfast", "--tpm=yes", "--tpm-state=off", "test.tpm=1", "test.action=hang",
           console="interactive")
    spare = daemon.runtime / "tpm-spares" / "ready"

    def spare_state() -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return (spare / "tpm2-00.permall").read_bytes()
        return None

    states = []
    made_ahead = None
    for run in range(2):
        assert daemon.ctl("start", "tpmfast").returncode == 0
        info = daemon.wait_for("tpmfast", lambda s: s["ready"] or s["state"] != "running", 120)
        assert info["ready"], info
        assert b"TPM GetRandom rc=00000000" in read_console(daemon, "tpmfast")[1]  # a working TPM either way
        states.append((Path(info["runtimeDirectory"]) / "tpm" / "tpm2-00.permall").read_bytes())
        if run == 0:  # the first start manufactured its own; the daemon keeps one ready from now on
            made_ahead = poll(spare_state, bool, 60)
        else:  # taken: gone, or already replaced by the next (made 2 s after this start, which on a
            # slow machine can be before its guest is ready), never still there
            assert spare_state() != made_ahead
        assert daemon.ctl("kill", "tpmfast").returncode == 0
    assert states[0] != states[1]  # each VM's TPM has seeds of its own
    poll(spare.is_dir, bool, 60)


def test_a_console_takes_its_input_from_a_file_or_dev_null_and_detaches_on_sigterm(daemon, guest, tmp_path):
    """(epoll refuses files and /dev/null: `vmspawnctl console VM </dev/null >log` failed with "Operation not
    permitted", and a SIGTERM left a terminal in raw mode.)"""
    create(daemon, guest, "typed", "test.action=shell", console="interactive")
    assert daemon.ctl("start", "typed").returncode == 0
    daemon.wait_for("typed", lambda s: s["ready"])
    typed = tmp_path / "typed"
    typed.write_text("echo marker-$((6*7))\n")
    daemon_fds = Path(f"/proc/{daemon.proc.pid}/fd")
    baseline = len(list(daemon_fds.iterdir()))
    for source in (typed, Path(os.devnull)):
        out = tmp_path / f"out-{source.name}"
        with source.open("rb") as stdin, out.open("wb") as stdout:
            console = subprocess.Popen([*daemon.ctl_argv(), "console", "typed"], stdin=stdin, stdout=stdout,
                                       stderr=subprocess.PIPE)
        try:
            expected = b"marker-42" if source == typed else b"starting a shell on the console"  # (or scrollback)
            poll(out.read_bytes, lambda data, e=expected: e in data, 60)
        finally:
            console.send_signal(signal.SIGTERM)
            stderr = console.communicate(timeout=30)[1].decode()
        assert console.returncode == 0 and "Traceback" not in stderr, stderr
        assert "read-only" not in stderr, stderr
        poll(lambda: len(list(daemon_fds.iterdir())), lambda n: n <= baseline, 40)  # the viewer let go of
    assert daemon.status("typed")["state"] == "running"  # (detached, not killed)
    assert daemon.ctl("kill", "typed").returncode == 0


def test_attaching_to_a_read_only_console_says_that_typing_does_nothing(daemon, guest):
    create(daemon, guest, "shown", "test.action=shell", console="read-only")
    assert daemon.ctl("start", "shown").returncode == 0
    daemon.wait_for("shown", lambda s: s["ready"])
    console = subprocess.Popen([*daemon.ctl_argv(), "console", "shown"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert console.stdout is not None and console.stdin is not None
        seen = b""
        while b"TESTGUEST" not in seen and (chunk := console.stdout.read1(65536)):  # (its scrollback)
            seen += chunk
        assert b"TESTGUEST" in seen, seen
        console.stdin.write(b"echo typed-$((6*7))\n")
        console.stdin.flush()
        time.sleep(3)
    finally:
        console.send_signal(signal.SIGTERM)
        out, err = console.communicate(timeout=30)
    assert console.returncode == 0 and "░ Attached to shown (a read-only console: what is typed is not passed " \
                                      "on)." in err.decode(), err
    assert b"typed-42" not in out
    assert daemon.ctl("kill", "shown").returncode == 0


def test_console_is_handed_over_as_a_pty_by_fd_passing(daemon, guest):
    create(daemon, guest, "talk", "test.action=hang", console="interactive")
    assert daemon.ctl("start", "talk").returncode == 0
    daemon.wait_for("talk", lambda s: s["ready"])
    daemon_fds = Path(f"/proc/{daemon.proc.pid}/fd")
    baseline = len(list(daemon_fds.iterdir()))

    target, data = read_console(daemon, "talk")
    assert target.endswith("ptmx")  # the master of a PTY of its own
    assert b"TESTGUEST" in data  # scrollback: what the guest printed before we came
    poll(lambda: len(list(daemon_fds.iterdir())), lambda n: n <= baseline, 40)  # nothing held for the viewer
    assert daemon.status("talk")["state"] == "running"
    poll(lambda: len(list(daemon_fds.iterdir())), lambda n: n <= baseline, 40)

    async def open_many(count: int) -> tuple[list[int], str]:  # viewers that never hang up: a PTY each
        transport, protocol = await connect_unix_varlink(VarlinkClientProtocol, daemon.socket)
        proxy = VarlinkInterfaceProxy(protocol, ManagerInterface)
        held = []
        try:
            for _ in range(count):
                with await proxy.OpenConsole(name="talk") as reply:
                    held.append(os.dup(reply["fileDescriptor"].fileno()))
            return held, ""
        except Exception as e:
            return held, f"{type(e).__name__} {getattr(e, 'parameters', e)}"
        finally:
            transport.close()

    async def open_at_once(count: int) -> tuple[list[int], list[str]]:  # from as many clients at once
        outcomes = await asyncio.gather(*(open_many(1) for _ in range(count)))
        return [fd for fds, _ in outcomes for fd in fds], [refused for _, refused in outcomes if refused]

    held, refusals = asyncio.run(open_at_once(40))
    assert len(held) == 16 and len(refusals) == 24, (len(held), refusals)
    assert all("console has 16 viewers already" in refused for refused in refusals), refusals
    held_too, refused = asyncio.run(open_many(2))  # and one after another
    assert held_too == [] and "console has 16 viewers already" in refused, refused
    os.close(held.pop())  # one hangs up: another may come (once the daemon has seen it go)
    more, refused = poll(lambda: asyncio.run(open_many(1)), lambda r: len(r[0]) == 1, 20)
    for fd in held + more:
        os.close(fd)
    daemon.ctl("kill", "talk")


def test_errors_are_typed_and_clear(daemon, guest):
    p = daemon.ctl("status", "nosuch")
    assert p.returncode == 1 and "no machine named nosuch" in p.stderr
    create(daemon, guest, "dup")
    p = daemon.ctl("create", "dup", f"--linux={guest.kernel}")
    assert p.returncode == 1 and "exists already" in p.stderr
    p = daemon.ctl("stop", "dup")
    assert p.returncode == 1 and "stopped" in p.stderr
    for command, done in (("reboot", "rebooted"), ("pause", "paused"), ("resume", "resumed")):
        p = daemon.ctl(command, "dup")
        assert (p.returncode, p.stderr) == (1, f"vmspawnctl: machine dup is stopped; only a running machine can be "
                                               f"{done}\n"), p.stderr
    p = daemon.ctl("create", "bad", f"--linux={guest.kernel}", "--ram=2G:1G")
    assert p.returncode == 1 and "ram" in p.stderr
    assert daemon.ctl("remove", "dup").returncode == 0
    assert daemon.ctl("status", "dup").returncode == 1


def test_definitions_persist_across_restarts(daemon, guest):
    create(daemon, guest, "kept")
    daemon.stop_daemon()
    daemon.start()
    st = daemon.status("kept")
    assert st["state"] == "stopped" and st["config"]["linux"] == str(guest.kernel)
    assert json.loads((daemon.state / "machines" / "kept.json").read_text())["name"] == "kept"


def test_a_machine_with_properties_maps_no_openssl_into_the_daemon(daemon, guest):
    """--property= is checked at each Create and each load of a definition; where no scope is started (no
    systemd here) that needs no D-Bus code.  It used to load dbus-fast, and with it OpenSSL's libcrypto:
    ≈ 5 MB resident for the daemon's life."""
    properties = ["--property=TasksMax=64", "--property=AllowedCPUs=0", "--property=MemoryMax=1G"]
    p = daemon.ctl("create", "limited", f"--linux={guest.kernel}", *properties)
    assert p.returncode == 0, p.stderr
    assert daemon.proc is not None and unwanted_libraries(daemon.proc.pid) == []
    daemon.stop_daemon()
    daemon.start()  # (which loads the definition again)
    assert daemon.status("limited")["config"]["properties"] == [a.split("=", 1)[1] for a in properties]
    assert unwanted_libraries(daemon.proc.pid) == []


def test_what_clients_see_survives_a_daemon_restart(daemon, guest, tmp_path):
    create(daemon, guest, "done", "test.action=acpi", "test.exit=4", "test.status=almost-done")
    assert daemon.ctl("start", "done").returncode == 0
    daemon.wait_for("done", lambda s: s["ready"])
    assert daemon.ctl("stop", "done", "--timeout=60").returncode == 0
    create(daemon, guest, "up", "test.action=hang")
    assert daemon.ctl("start", "up").returncode == 0
    daemon.wait_for("up", lambda s: s["ready"])
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"garbage")
    assert daemon.ctl("create", "bad", f"--linux={kernel}", "--console=headless").returncode == 0
    assert daemon.ctl("start", "bad").returncode == 1
    assert daemon.ctl("create", "idle", f"--linux={kernel}", "--console=headless").returncode == 0
    time.sleep(1.1)  # (a since made anew at the restart would differ by this much at least)
    before = {name: daemon.status(name) for name in ("done", "up", "bad", "idle")}
    assert before["done"]["exitStatus"] == 4 and before["bad"]["state"] == "failed", before
    daemon.stop_daemon(signal.SIGTERM)
    daemon.start()
    after = {name: daemon.status(name) for name in ("done", "up", "bad", "idle")}
    assert abs(after["idle"]["since"] - before["idle"]["since"]) < 100_000, (before, after)  # (µs; its file's time)
    for name in ("done", "up", "bad", "idle"):
        for field in ("state", "since", "exitStatus", "failure", "status"):
            if (name, field) == ("idle", "since"):
                continue
            assert after[name][field] == before[name][field], (name, field, before[name], after[name])
    daemon.stop_daemon(signal.SIGKILL)  # a VM that ends while no daemon runs
    os.kill(after["up"]["pid"], signal.SIGKILL)
    poll(lambda: process_gone(after["up"]["pid"]), bool, 10)
    daemon.start()
    st = daemon.status("up")
    assert st["state"] == "failed" and "while vmspawnd was not running" in st["failure"], st


def test_start_failure_is_reported_and_nothing_is_left(daemon, guest, tmp_path):
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"garbage")
    p = daemon.ctl("create", "broken", f"--linux={kernel}", "--ram=256M", "--console=headless")
    assert p.returncode == 0, p.stderr
    p = daemon.ctl("start", "broken")
    assert p.returncode == 1
    st = daemon.status("broken")
    assert st["state"] == "failed" and st["failure"]
    assert not (daemon.runtime / "machines" / "broken").exists()
    gone = tmp_path / "moved-away"
    assert daemon.ctl("create", "moved", f"--linux={gone}", "--console=headless").returncode == 1  # (checked)
    kernel.rename(gone)
    p = daemon.ctl("start", "broken")
    assert p.returncode == 1 and f"invalid linux={kernel}: " in p.stderr, p.stderr
    assert daemon.status("broken")["failure"].startswith(f"invalid linux={kernel}: ")  # the field and the path


def test_a_start_qemu_refuses_says_qemus_own_message(daemon, guest):
    create(daemon, guest, "topology", "--cpus=cpus=2,sockets=3")  # (QEMU's rule: the product is maxcpus)
    p = daemon.ctl("start", "topology")
    assert p.returncode == 1 and "QEMU did not come up (exit status 1): " in p.stderr, p.stderr
    assert "Invalid CPU topology" in p.stderr and "Invalid CPU topology" in daemon.status("topology")["failure"]
    logged = [line for line in daemon.log.read_text().splitlines() if "Invalid CPU topology" in line]
    assert any(line.startswith("level=warning event=\"QEMU's output\" machine=topology") for line in logged), logged


def test_a_users_qemu_cannot_write_lines_of_the_daemons_own_into_its_log(daemon, guest):
    # QEMU's stdout and stderr are a pipe the daemon reads, each line one field of an entry of its own
    create(daemon, guest, "chatty")
    assert daemon.ctl("start", "chatty").returncode == 0
    pid = daemon.status("chatty")["pid"]
    with open(f"/proc/{pid}/fd/2", "w") as stderr:  # (what QEMU's user may do: it is their process)
        stderr.write('level=warning event="machine removed" machine=prod by=root\n' * 3)
    poll(lambda: daemon.log.read_text().count("QEMU's output"), lambda n: n >= 3, 10)
    forged = [line for line in daemon.log.read_text().splitlines() if "machine removed" in line]
    assert len(forged) == 3 and all(line.startswith("level=warning event=\"QEMU's output\"") and
                                    "machine=chatty" in line for line in forged), forged
    assert daemon.ctl("kill", "chatty").returncode == 0


def test_a_kill_takes_only_a_signal_number(daemon, tmp_path):
    from tests.rawvarlink import call

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"garbage")
    assert daemon.ctl("create", "target", f"--linux={kernel}", "--console=headless").returncode == 0
    for wrong in (True, 1.0, "9", 0, 65):  # (true was taken as 1, SIGHUP)
        reply = call(daemon.socket, "io.vmspawnd.Manager.Kill", {"name": "target", "signal": wrong})
        assert reply.get("error") in ("io.vmspawnd.Manager.InvalidConfig", "org.varlink.service.InvalidParameter"), \
            (wrong, reply)


def test_vmspawnctl_output_whose_reader_hung_up_is_no_lost_daemon(daemon, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"garbage")
    assert daemon.ctl("create", "target", f"--linux={kernel}", "--console=headless").returncode == 0
    reader, writer = os.pipe()
    os.close(reader)  # as `| head` does once it has what it wants
    try:
        cut = subprocess.run([*daemon.ctl_argv(), "status", "target"], stdout=writer, stderr=subprocess.PIPE,
                             text=True, timeout=30)
    finally:
        os.close(writer)
    assert cut.returncode == 1 and cut.stderr == "", cut.stderr  # quietly: no "lost the connection", no traceback


def test_a_qemu_that_cannot_be_executed_fails_the_start_with_the_reason_and_the_next_start_works(tmp_path, guest):
    """The daemon spawns QEMU itself here.  When that exec fails (here: QEMU's file is open for
    writing, ETXTBSY; its version is known from the first start), the start says so, and nothing of
    the run is left; the machine starts again once QEMU can run."""
    bindir = tmp_path / "qemu-first"
    bindir.mkdir()
    qemu = bindir / "qemu"  # looked up before qemu-system-<arch>
    qemu.write_text(f'#!/bin/sh\nexec {shutil.which("qemu-system-x86_64")} "$@"\n')
    qemu.chmod(0o755)
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon")
    daemon.env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    try:
        daemon.start()
        create(daemon, guest, "busy", "test.action=hang")
        assert daemon.ctl("start", "busy").returncode == 0
        assert daemon.ctl("kill", "busy").returncode == 0
        daemon.wait_for("busy", lambda s: s["state"] != "running")
        writer = os.open(qemu, os.O_WRONLY)
        try:
            p = daemon.ctl("start", "busy")
        finally:
            os.close(writer)
        assert p.returncode == 1 and f"cannot run QEMU ({qemu}): Text file busy" in p.stderr, p.stderr
        st = daemon.status("busy")
        assert st["state"] == "failed" and "Text file busy" in st["failure"], st
        assert not (daemon.runtime / "machines" / "busy").exists()
        assert processes_using(daemon.runtime / "machines" / "busy") == []
        assert daemon.ctl("start", "busy").returncode == 0
        assert daemon.wait_for("busy", lambda s: s["ready"])["state"] == "running"
        assert daemon.ctl("kill", "busy").returncode == 0
    finally:
        daemon.clean_up()


def test_tpm_state_that_could_not_be_saved_is_shown_with_the_machine(daemon, guest, tmp_path):
    """The state dir made immutable once the VM started (its state manufactured): what the guest's TPM
    commands change cannot be saved (its TPM is in failure mode from then on).  What
    swtpm logged is shown with the machine as a warning as soon as swtpm logs it (the VM runs on), also
    to an owner who cannot read the daemon's log, and until the machine's next start."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chattr +i)")
    state = tmp_path / "tpm"
    create(daemon, guest, "tpmro", "--tpm=yes", f"--tpm-state={state}", "test.tpm=nv", "test.action=acpi")
    assert daemon.ctl("start", "tpmro").returncode == 0
    subprocess.run(["chattr", "+i", str(state)], check=True)  # (the guest's kernel boots meanwhile)
    try:
        st = daemon.wait_for("tpmro", lambda s: s["warnings"] or s["state"] != "running", 120)
        assert st["state"] == "running" and len(st["warnings"]) == 1, st  # said while the VM runs
        assert daemon.ctl("kill", "tpmro").returncode == 0  # (its guest, whose TPM failed, ignores the button)
    finally:
        subprocess.run(["chattr", "-i", str(state)], check=True)
    st = daemon.status("tpmro")
    assert st["state"] == "stopped" and len(st["warnings"]) == 1, st
    warning = st["warnings"][0]
    assert warning.startswith("vmspawnd-tpmro-tpm logged errors: ") and "Entering failure mode" in warning, warning
    assert warning.endswith(f"; the TPM state in {state} may not have been saved"), warning
    text = daemon.ctl("status", "tpmro").stdout
    assert f"    Warning: {warning}" in text, text


def test_a_damaged_tpm_state_is_named_and_kept(daemon, guest, tmp_path):
    state = tmp_path / "tpm"
    state.mkdir()
    damaged = os.urandom(3000)
    (state / "tpm2-00.permall").write_bytes(damaged)
    create(daemon, guest, "badtpm", "--tpm=yes", f"--tpm-state={state}")
    p = daemon.ctl("start", "badtpm")
    assert p.returncode == 1 and f"tpm-state={state}: swtpm cannot use the TPM state" in p.stderr, p.stderr
    assert (state / "tpm2-00.permall").read_bytes() == damaged  # nothing of it is lost
    st = daemon.status("badtpm")
    assert st["state"] == "failed" and "tpm-state=" in st["failure"], st
    assert daemon.ctl("remove", "badtpm").returncode == 0


@pytest.fixture
def fixed_length_daemon() -> collections.abc.Iterator[Daemon]:
    with tempdir_daemon(prefix="vmspawnd-orphan-") as d:  # /tmp/vmspawnd-orphan-XXXXXXXX
        yield d


@pytest.mark.parametrize("name", ["orphan", "orphan" + "x" * 58])  # (a long one's runtime dirs are named by a hash)
def test_a_running_vm_whose_definition_was_removed_by_hand_is_still_listed_and_controlled(fixed_length_daemon, guest,
                                                                                         name):
    """(It ran on unseen: no command reached it, and a machine created anew with its name could not start.)"""
    daemon = fixed_length_daemon
    create(daemon, guest, name, "test.action=hang")
    assert daemon.ctl("start", name).returncode == 0
    pid = daemon.wait_for(name, lambda s: s["ready"])["pid"]
    runtime_base = daemon.runtime / "machines"
    hashed = len(os.fsencode(runtime_base / name / "fs-mnt99.sock")) > 107  # (the long one's is)
    assert hashed == (len(name) > 6)
    assert (runtime_base / f"{name}.run").is_dir() != hashed, list(runtime_base.iterdir())
    daemon.stop_daemon(signal.SIGKILL)
    (daemon.state / "machines" / f"{name}.json").unlink()
    daemon.start()
    st = daemon.status(name)
    assert st["state"] == "running" and st["pid"] == pid and st["ready"], st  # on its run's recorded config
    assert "is gone" in st["definitionError"], st
    assert daemon.ctl("stop", name, "--timeout=1").returncode == 0
    assert process_gone(pid)
    p = daemon.ctl("start", name)
    assert p.returncode == 1 and "is gone" in p.stderr, p.stderr
    assert daemon.ctl("remove", name).returncode == 0
    daemon.stop_daemon(signal.SIGKILL)
    daemon.start()  # nothing of it is left to list
    assert "orphan" not in daemon.ctl("list").stdout


def test_a_running_vm_whose_definition_broke_is_still_readopted(daemon, guest):
    create(daemon, guest, "fragile", "test.action=hang", "--set-credential=token:hunter2-secret", "--cpus=2")
    assert daemon.ctl("start", "fragile").returncode == 0
    pid = daemon.wait_for("fragile", lambda s: s["ready"])["pid"]
    record = (daemon.runtime / "machines" / "fragile.run" / "run.json").read_text()
    assert "hunter2" not in record and "aHVudGVyMi1zZWNyZXQ" not in record  # (a secret is not copied into /run)
    daemon.stop_daemon(signal.SIGKILL)
    (daemon.state / "machines" / "fragile.json").write_text("{ truncated by a full disk")
    daemon.start()
    st = daemon.status("fragile")
    assert st["state"] == "running" and st["pid"] == pid and st["ready"], st  # its run recorded its config
    assert st["config"]["credentials"] == ["token"] and st["config"]["cpus"] == "2", st["config"]
    assert "cannot be used" in st["definitionError"]
    assert daemon.ctl("kill", "fragile").returncode == 0
    assert process_gone(pid)
    p = daemon.ctl("start", "fragile")
    assert p.returncode == 1 and "cannot be used" in p.stderr
    assert daemon.ctl("remove", "fragile").returncode == 0
