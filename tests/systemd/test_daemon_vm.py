# SPDX-License-Identifier: LGPL-2.1-or-later
"""A VM through the socket-activated daemon under the real systemd 257 (one small TCG guest at a time).

The busybox test guest is built on the host (vmspawnd.testing.guest) and bound read-only into the
container by the harness ($VMSPAWND_TEST_GUEST_DIR); without it these tests are skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from tests.polling import poll
from tests.systemd.helpers import (
    GUEST_DIR,
    NAME,
    TPM_UNIT,
    WITH_GUEST,
    Ctl,
    alive,
    console_while_away,
    machined_record,
    pids_of,
    qemu_cgroup,
    service_type,
    sh,
    systemd_version,
    unit_properties,
    unwanted_libraries,
    wait_inactive,
    wait_journal,
)
from vmspawnd import messages
from vmspawnd.faults import CRASH_ENV
from vmspawnd.systemd.unitfile import STORE_PRESERVE_SINCE
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = WITH_GUEST


def test_vm_under_the_activated_daemon_outlives_a_daemon_restart(vm: Ctl) -> None:
    st = vm.status()
    assert st["state"] == "running" and st["pid"] > 0
    pid, units = st["pid"], st["units"]
    # QEMU runs in a unit systemd knows (the daemon's service, or a scope of its own); swtpm as a
    # transient service of its own
    qemu_unit = qemu_cgroup(pid).rsplit("/", 1)[1]
    assert qemu_unit == "vmspawnd.service" or qemu_unit.endswith(".scope"), qemu_cgroup(pid)
    assert unit_properties(qemu_unit, "ActiveState")["ActiveState"] == "active"
    assert TPM_UNIT in units, units
    for unit in units:
        assert unit_properties(unit, "ActiveState")["ActiveState"] == "active", unit
    assert unit_properties("vmspawnd.service", "StatusText")["StatusText"] == "1 VM(s) running"

    sh("systemctl", "stop", "vmspawnd.service")
    assert alive(pid), "QEMU died with the daemon"
    st = vm.status()  # re-activates the daemon through the socket
    assert st["state"] == "running" and st["pid"] == pid, st
    wait_journal("re-adopted running VM", "-o", "cat", "-u", "vmspawnd.service")

    stopped = json.loads(vm("--json", "stop", NAME, "--timeout=1").stdout)
    assert stopped["state"] == "stopped"
    assert not alive(pid)
    for unit in units:
        wait_inactive(unit)


def test_what_an_adopted_qemu_writes_is_logged_by_the_daemon_that_adopted_it(vm: Ctl) -> None:
    """The read end of QEMU's output pipe waits in vmspawnd.service's store across a restart: the
    next daemon logs QEMU's lines (here its last, on SIGTERM), where QEMU's writes failed before."""
    pid = vm.status()["pid"]
    sh("systemctl", "restart", "vmspawnd.service")
    wait_journal("re-adopted running VM", "-o", "cat", "-u", "vmspawnd.service")
    assert vm.status()["pid"] == pid
    os.kill(pid, signal.SIGTERM)  # QEMU says "terminating on signal 15 from pid …" as it exits
    vm.wait(lambda s: s["state"] != "running", timeout=30)
    said = wait_journal("terminating on signal 15", "-o", "json", "-u", "vmspawnd.service", f"MACHINE={NAME}")
    entries = [json.loads(line) for line in said.splitlines() if line.strip()]
    assert any(e["MESSAGE"].startswith("QEMU's output") and "terminating on signal 15" in e.get("OUTPUT", "")
               for e in entries), entries[-5:]
    poll(lambda: unit_properties("vmspawnd.service", "NFileDescriptorStore")["NFileDescriptorStore"],
         lambda n: n == "0", 10)  # the run's end took its pipe and listener out of the store


def test_vm_keeps_its_tpm_across_a_daemon_restart(vm: Ctl) -> None:
    assert TPM_UNIT in vm.status()["units"]
    sh("systemctl", "stop", "vmspawnd.service")
    assert unit_properties(TPM_UNIT, "ActiveState")["ActiveState"] == "active", f"{TPM_UNIT} stopped with the daemon"
    assert TPM_UNIT in vm.status()["units"]


def test_varlinkctl_speaks_to_the_daemon_and_logs_carry_the_machine_field(vm: Ctl) -> None:
    if not shutil.which("varlinkctl"):
        pytest.skip(f"systemd {systemd_version()} has no varlinkctl (new in 255)")
    socket_path = "/run/vmspawnd/io.vmspawnd.Manager"
    described = sh("varlinkctl", "introspect", socket_path, "io.vmspawnd.Manager").stdout
    on_disk = (Path(__file__).resolve().parents[2] / "varlink" / "io.vmspawnd.Manager.varlink").read_text()
    # varlinkctl re-formats and re-orders the description: compare what it declares
    declared = sorted(re.findall(r"^(?:method|error|type) \w+", on_disk, re.M))
    assert sorted(re.findall(r"^(?:method|error|type) \w+", described, re.M)) == declared
    out = sh("varlinkctl", "call", "--more", "--json=short", socket_path, "io.vmspawnd.Manager.List", "{}").stdout
    machines = [json.loads(line)["machine"] for line in out.splitlines() if line.strip()]
    assert [m["name"] for m in machines] == [NAME] and machines[0]["ready"] is True
    one = json.loads(sh("varlinkctl", "call", socket_path, "io.vmspawnd.Manager.Describe",
                        json.dumps({"name": NAME})).stdout)
    assert one["machine"]["state"] == "running"
    bad = sh("varlinkctl", "call", socket_path, "io.vmspawnd.Manager.Describe", '{"name": "../x"}', check=False)
    assert bad.returncode != 0 and "InvalidConfig" in bad.stderr + bad.stdout
    entries = wait_journal("guest is ready", "-o", "json", "-u", "vmspawnd.service", f"MACHINE={NAME}")
    messages = [json.loads(line)["MESSAGE"] for line in entries.splitlines() if line.strip()]
    assert any(m.startswith("guest is ready") for m in messages), messages


def test_an_adopted_vm_whose_tpm_unit_dies_fails_with_the_reason(vm: Ctl) -> None:
    pid = vm.status()["pid"]
    sh("systemctl", "stop", "vmspawnd.service")
    assert vm.status()["state"] == "running"  # re-activated, and the VM re-adopted with its helper units
    wait_journal("re-adopted running VM", "-o", "cat", "-u", "vmspawnd.service")
    sh("systemctl", "kill", "--signal=SIGKILL", TPM_UNIT)
    st = vm.wait(lambda s: s["state"] != "running", timeout=30)
    assert st["state"] == "failed" and "swtpm" in st["failure"], st
    poll(lambda: alive(pid), lambda running: not running, 30)


def test_a_daemon_killed_while_starting_leaves_no_process_or_unit_behind(installed_units: Path) -> None:
    sh("systemctl", "start", "vmspawnd.socket")
    ctl, name = Ctl(installed_units), "crashy"
    tpm_unit = f"vmspawnd-{name}-tpm.service"
    ctl("create", name, f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M",
        "--console=read-only", "--firmware=bios", "--tpm=yes", *GUEST_WORDS, "test.action=hang")
    sh("systemctl", "stop", "vmspawnd.service")
    # the next daemon SIGKILLs itself once QEMU is exec'd, and is not restarted (Restart=on-failure
    # would start one with the same environment 100 ms later, which a slow test did not always beat)
    crash = Path("/run/systemd/system/vmspawnd.service.d/crash.conf")
    crash.parent.mkdir(parents=True, exist_ok=True)
    crash.write_text(f"[Service]\nEnvironment={CRASH_ENV}=exec\nRestart=no\n")
    sh("systemctl", "daemon-reload")
    try:
        assert ctl("start", name, check=False).returncode == 1
    finally:
        crash.unlink()
        sh("systemctl", "daemon-reload")
    try:
        st = ctl.status(name)  # a new daemon, which ends what the killed start left
        assert st["state"] == "failed" and "while starting" in st["failure"], st
        wait_inactive(tpm_unit)
        poll(lambda: pids_of("qemu-system-x86") + pids_of("swtpm"), lambda pids: pids == [], 30)
        ctl("start", name)  # and it starts again
        assert ctl.wait(lambda s: s["ready"], name=name)["state"] == "running"
    finally:
        ctl("kill", name, check=False)
        ctl("remove", name, check=False)
        for comm in ("qemu-system-x86", "swtpm"):
            poll(lambda comm=comm: pids_of(comm), lambda pids: pids == [], 30)


def test_status_shows_the_processes_of_its_units_and_its_journal(vm: Ctl) -> None:
    st = vm.status()
    wait_journal("guest is ready", "-o", "cat", f"MACHINE={NAME}")
    out = vm("status", NAME).stdout
    assert f"CGroup: {TPM_UNIT}" in out and "swtpm" in out, out
    assert f"{st['pid']} " in out and "qemu-system" in out, out  # QEMU, in its scope
    assert "guest is ready" in out, out  # the machine's last journal lines


def test_the_daemon_starts_machined_when_nothing_else_has(installed_units: Path) -> None:
    """On systemd 257 machined is only D-Bus activated: after a boot nothing may have started it."""
    sh("systemctl", "stop", "systemd-machined.service")
    assert unit_properties("systemd-machined.service", "ActiveState")["ActiveState"] == "inactive"
    sh("systemctl", "start", "vmspawnd.socket")
    ctl, name = Ctl(installed_units), "mreg"
    ctl("create", name, f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M",
        "--console=read-only", "--firmware=bios", "--tpm=no", *GUEST_WORDS, "test.action=hang")
    try:
        ctl("start", name)
        pid = ctl.wait(lambda s: s["ready"], name=name)["pid"]
        assert unit_properties("systemd-machined.service", "ActiveState")["ActiveState"] == "active"
        record = machined_record(name)
        assert record is not None and record["leader"]["pid"] == pid, record
        sh("systemctl", "restart", "systemd-machined.service")  # machined keeps what it knew
        poll(lambda: machined_record(name), lambda r: r is not None, 15)
    finally:
        ctl("kill", name, check=False)
        ctl("remove", name, check=False)
        poll(lambda: pids_of("qemu-system-x86"), lambda pids: pids == [], 30)


def test_the_journal_tells_a_vms_story_with_message_ids_and_the_real_code_location(vm: Ctl) -> None:
    ready = wait_journal("guest is ready", "-o", "json", "-u", "vmspawnd.service", f"MACHINE={NAME}",
                         f"MESSAGE_ID={messages.READY}")
    entry = json.loads(ready.splitlines()[0])
    assert entry["CODE_FILE"].endswith("vmspawnd/run.py") and entry["CODE_FUNC"] == "_guest_message", entry
    started = json.loads(wait_journal("VM started", "-o", "json", "-u", "vmspawnd.service",
                                      f"MESSAGE_ID={messages.STARTED}", f"MACHINE={NAME}").splitlines()[0])
    assert started["MACHINE"] == NAME and started["CODE_FILE"].endswith("vmspawnd/machine.py"), started
    created = wait_journal("machine created", "-o", "json", f"MESSAGE_ID={messages.CREATED}", f"MACHINE={NAME}")
    assert json.loads(created.splitlines()[0])["PRIORITY"] == "6"


def test_a_vm_with_every_helper_runs_under_the_hardened_unit(installed_units: Path, tmp_path: Path) -> None:
    report = sh("systemd-analyze", "security", "--no-pager", "vmspawnd.service").stdout
    match = re.search(r"Overall exposure level for vmspawnd\.service: ([0-9.]+)", report)
    assert match and float(match.group(1)) <= 7.6, report[-3000:]
    tree, shared = tmp_path / "tree", tmp_path / "shared"
    (tree / "etc").mkdir(parents=True)
    shared.mkdir()
    (shared / "hello.txt").write_text("hello\n")
    sh("systemctl", "start", "vmspawnd.socket")
    ctl, name = Ctl(installed_units), "hardened"
    ctl("create", name, f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M",
        "--console=read-only", "--firmware=bios", "--tpm=yes", f"--directory={tree}", f"--bind={shared}:/srv/shared",
        "--network-user-mode", *GUEST_WORDS, "test.virtiofs=root", "test.virtiofs=mnt0",
        "test.write=root/etc/written", "test.action=hang")
    try:
        ctl("start", name)
        st = ctl.wait(lambda s: s["ready"], name=name)
        assert f"vmspawnd-{name}-tpm.service" in st["units"], st["units"]
        assert any("virtiofsd-root" in u for u in st["units"]) and any("virtiofsd-0" in u for u in st["units"])
        written = tree / "etc" / "written"  # the guest wrote through its virtiofs root
        poll(lambda: written.read_text() if written.exists() else "", lambda text: text == "written-by-guest\n")
        cmdline = Path(f"/proc/{st['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "user,id=" in cmdline or "-nic user" in cmdline or "netdev user" in cmdline, cmdline
    finally:
        ctl("kill", name, check=False)
        ctl("remove", name, check=False)
        poll(lambda: pids_of("qemu-system-x86"), lambda pids: pids == [], 30)


def test_systemctl_reload_reads_the_definitions_without_touching_the_running_vm(vm: Ctl) -> None:
    pid = vm.status()["pid"]
    machines = Path("/var/lib/vmspawnd/machines")
    definition = json.loads((machines / f"{NAME}.json").read_text())
    (machines / "byhand.json").write_text(json.dumps({"name": "byhand", "config": definition["config"]}))
    try:
        assert unit_properties("vmspawnd.service", "Type")["Type"] == service_type()
        # SIGHUP; with notify-reload systemctl returns once the daemon said READY=1 again, before 253 at once
        sh("systemctl", "reload", "vmspawnd.service")
        wait_journal("machine definitions re-read", "-o", "cat", "-u", "vmspawnd.service")
        assert vm.status("byhand")["state"] == "stopped"
        st = vm.status()
        assert st["state"] == "running" and st["pid"] == pid and st["ready"], st
    finally:
        vm("remove", "byhand", check=False)


def test_systemctl_restart_keeps_since_and_the_guests_status(vm: Ctl) -> None:
    before = vm.status()
    assert before["status"] == "test guest ready", before
    sh("systemctl", "restart", "vmspawnd.service")
    after = vm.status()
    for field in ("state", "since", "pid", "ready", "status"):
        assert after[field] == before[field], (field, before, after)


def test_one_bus_connection_serves_every_vm_and_a_vm_starts_again_at_once(installed_units: Path) -> None:
    """The daemon's runs share its connection to systemd (dbus-daemon allows 256 per user), and what a
    run referenced there (its scope, its helper units) is let go when it ends: the same machine
    starts again right away (a unit still loaded under its name would refuse it)."""
    sh("systemctl", "start", "vmspawnd.socket")
    ctl, names = Ctl(installed_units), ("share1", "share2")
    for name in names:
        ctl("create", name, f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=128M",
            "--console=read-only", "--firmware=bios", "--tpm=yes", *GUEST_WORDS, "test.action=hang")
    try:
        for name in names:
            ctl("start", name)
        for name in names:
            ctl.wait(lambda s: s["ready"], name=name)
        daemon = unit_properties("vmspawnd.service", "MainPID")["MainPID"]
        peers = sh("busctl", "--system", "list", "--unique", "--no-legend", "--no-pager").stdout.splitlines()
        assert sum(1 for line in peers if line.split()[1:2] == [daemon]) == 1, peers
        # nor did D-Bus, or its varlink service's info, load OpenSSL or zstd into it
        assert unwanted_libraries(int(daemon)) == []
        for _ in range(2):
            ctl("kill", names[0])
            ctl.wait(lambda s: s["state"] in ("stopped", "failed"), name=names[0])
            ctl("start", names[0])  # its scope and TPM unit of before are gone: no "already loaded"
            st = ctl.wait(lambda s: s["ready"], name=names[0])
            assert f"vmspawnd-{names[0]}-tpm.service" in st["units"], st
    finally:
        for name in names:
            ctl("kill", name, check=False)
            ctl("remove", name, check=False)
        for comm in ("qemu-system-x86", "swtpm"):
            poll(lambda comm=comm: pids_of(comm), lambda pids: pids == [], 30)


def test_what_a_guest_says_while_no_daemon_runs_reaches_the_next_daemon(installed_units: Path) -> None:
    """The guest's notify listener waits in vmspawnd.service's file-descriptor store while no daemon
    runs: READY=1 sent then is read by the next daemon.  The guest gives a write up after 2 s, and
    the daemon stays away for longer (over vsock a connection nobody listens for is refused at once).
    systemd < 254 keeps the store across a restart only: there the daemon crashes, and is restarted
    when the client asks (a restart delay of a minute keeps systemd from doing it before)."""
    preserved = systemd_version() >= STORE_PRESERVE_SINCE
    slow_restart = Path("/run/systemd/system/vmspawnd.service.d/slow-restart.conf")
    if not preserved:
        slow_restart.parent.mkdir(parents=True, exist_ok=True)
        slow_restart.write_text("[Service]\nRestartSec=60\n")
        sh("systemctl", "daemon-reload")
    ctl = Ctl(installed_units)
    try:  # (the drop-in goes on every path)
        sh("systemctl", "start", "vmspawnd.socket")
        ctl("create", NAME, f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}",
            "--ram=256M", "--console=read-only", "--firmware=bios", "--tpm=no", *GUEST_WORDS,
            "test.notify_timeout=2", "test.delay=4", "test.status=said_while_away", "test.action=hang")
        ctl("start", NAME)
        st = ctl.status()
        assert not st["ready"], "the guest said READY=1 before the daemon was stopped: make test.delay longer"
        if preserved:
            sh("systemctl", "stop", "vmspawnd.service")
        else:
            os.kill(int(unit_properties("vmspawnd.service", "MainPID")["MainPID"]), signal.SIGKILL)
            poll(lambda: unit_properties("vmspawnd.service", "SubState")["SubState"], lambda s: s == "auto-restart")
        stored = unit_properties("vmspawnd.service", "NFileDescriptorStore")["NFileDescriptorStore"]
        assert stored == "2"  # the guest's notify listener and QEMU's output pipe
        said = console_while_away(Path(st["runtimeDirectory"]), b"ready (uptime", linger=4.0)
        assert b"notify write failed" not in said and b"notify over vsock failed" not in said, said.decode(
            errors="replace")
        again = ctl.wait(lambda s: s["ready"])  # (re-activates the daemon through its socket)
        assert again["pid"] == st["pid"] and again["status"] == "said while away", again
    finally:
        ctl("kill", NAME, check=False)
        ctl("remove", NAME, check=False)
        if slow_restart.exists():
            slow_restart.unlink()
            sh("systemctl", "daemon-reload")
    poll(lambda: unit_properties("vmspawnd.service", "NFileDescriptorStore")["NFileDescriptorStore"],
         lambda n: n == "0", 10)  # the run's end took its listener and output pipe out of the store
