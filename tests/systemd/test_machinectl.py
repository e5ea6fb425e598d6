# SPDX-License-Identifier: LGPL-2.1-or-later
"""machinectl on the daemon's VMs, as a user types it, under the container's real systemd.

systemd ≥ 261 (the forky tree, 262): machined keeps each VM's ``controlAddress`` and machinectl
drives the VM through it (``io.systemd.MachineInstance``): poweroff is the ACPI power button,
reboot a reset the guest boots again from, pause/resume stop the vCPUs.  systemd 257 (trixie) has
no control sockets: machinectl poweroff sends QEMU SIGRTMIN+4 and reboot SIGINT, and the daemon
says so.  machined is not started by the harness: the daemon has to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import poll
from tests.systemd.helpers import (
    CONTROL_SOCKETS,
    GUEST_DIR,
    MACHINED_VARLINK,
    WITH_GUEST,
    Ctl,
    alive,
    machined_record,
    pids_of,
    sh,
    systemd_version,
    varlink_call,
)
from tests.systemd.test_integration import vmspawn
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = WITH_GUEST

NAME = "mctl"
with_control = pytest.mark.skipif(systemd_version() < CONTROL_SOCKETS,
                                  reason="machinectl uses control sockets from systemd 261 on (run with --suite=forky)")
without_control = pytest.mark.skipif(systemd_version() >= CONTROL_SOCKETS,
                                     reason="systemd < 261 only (the trixie and bookworm trees)")


def machined_entry(name: str = NAME) -> dict:
    record = machined_record(name)
    assert record is not None, f"machined does not know {name}"
    return record


@pytest.fixture
def acpi_vm(installed_units: Path, tmp_path: Path) -> Iterator[tuple[Ctl, Path]]:
    """A ready VM whose guest powers off on the ACPI button and counts its boots on a small disk."""
    disk = tmp_path / "bootcount.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    sh("systemctl", "start", "vmspawnd.socket")
    ctl = Ctl(installed_units)
    ctl("create", NAME, f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M",
        "--console=read-only", "--firmware=bios", "--tpm=no", f"--extra-drive=raw:{disk}", *GUEST_WORDS,
        "test.bootcount=vda", "test.action=acpi")
    ctl("start", NAME)
    try:
        assert "(boot 1)" in ctl.wait(lambda s: s["ready"], name=NAME)["status"]
        yield ctl, disk
    finally:
        ctl("kill", NAME, check=False)
        ctl("remove", NAME, check=False)
        poll(lambda: pids_of("qemu-system-x86"), lambda pids: pids == [], 30)


@with_control
def test_machined_knows_the_vms_control_socket(acpi_vm: tuple[Ctl, Path]) -> None:
    ctl, _ = acpi_vm
    entry = machined_entry()
    assert entry["controlAddress"] == f"/run/vmspawnd/machines/{NAME}.run/control", entry  # (the daemon's dir)
    assert entry["leader"]["pid"] == ctl.status(NAME)["pid"]
    out = sh("varlinkctl", "introspect", entry["controlAddress"], "io.systemd.MachineInstance").stdout
    for method in ("PowerOff", "Reboot", "Terminate", "Pause", "Resume", "Describe", "SubscribeEvents"):
        assert f"method {method}(" in out, out


@with_control
def test_machinectl_poweroff_powers_the_guest_off_through_acpi(acpi_vm: tuple[Ctl, Path]) -> None:
    ctl, _ = acpi_vm
    pid = ctl.status(NAME)["pid"]
    sh("machinectl", "poweroff", NAME)
    st = ctl.wait(lambda s: s["state"] != "running", name=NAME, timeout=60)
    assert st["state"] == "stopped" and st["exitStatus"] == 0 and st["failure"] is None, st
    poll(lambda: alive(pid), lambda running: not running, 15)
    poll(lambda: machined_record(NAME), lambda record: record is None, 15)  # unregistered


@with_control
def test_a_vm_registered_by_an_older_daemon_is_registered_again_with_the_new_control_address(
        acpi_vm: tuple[Ctl, Path]) -> None:
    """A daemon older than the records dir's control socket registered ``<runtime dir>/control``, where
    nothing listens now (and the VM's user may write): the daemon that adopts the VM tells machined anew."""
    ctl, _ = acpi_vm
    pid = ctl.status(NAME)["pid"]
    legacy = f"/run/vmspawnd/machines/{NAME}/control"
    sh("systemctl", "stop", "vmspawnd.service")
    assert alive(pid)
    record = Path(f"/run/vmspawnd/machines/{NAME}.run/run.json")  # as the older daemon wrote it
    data = json.loads(record.read_text())
    data.pop("control_address", None)
    record.write_text(json.dumps(data))
    (reply,) = varlink_call(MACHINED_VARLINK, "io.systemd.Machine.Unregister", {"name": NAME})
    assert "error" not in reply, reply
    register = {"name": NAME, "class": "vm", "service": "vmspawnd", "leaderProcessId": {"pid": pid},
                "controlAddress": legacy}
    # (machined drops the machine after its reply to Unregister: until then the name exists)
    reply = poll(lambda: varlink_call(MACHINED_VARLINK, "io.systemd.Machine.Register", register)[0],
                 lambda r: r.get("error") != "io.systemd.Machine.MachineExists", 5, interval=0.02)
    assert "error" not in reply, reply
    assert machined_entry()["controlAddress"] == legacy

    assert ctl.status(NAME)["pid"] == pid  # the daemon, activated again, adopted the VM
    entry = poll(machined_entry, lambda e: e["controlAddress"] != legacy, 15)
    assert entry["controlAddress"] == f"/run/vmspawnd/machines/{NAME}.run/control", entry
    assert entry["leader"]["pid"] == pid
    sh("machinectl", "poweroff", NAME)  # through the control socket the daemon serves
    st = ctl.wait(lambda s: s["state"] != "running", name=NAME, timeout=60)
    assert st["state"] == "stopped" and st["exitStatus"] == 0, st


@with_control
def test_machinectl_reboot_boots_the_guest_again_and_it_stays_registered(acpi_vm: tuple[Ctl, Path]) -> None:
    ctl, disk = acpi_vm
    pid = ctl.status(NAME)["pid"]
    sh("machinectl", "reboot", NAME)
    st = ctl.wait(lambda s: s["ready"] and "(boot 2)" in (s["status"] or ""), name=NAME, timeout=90)
    assert st["state"] == "running" and st["pid"] == pid, st  # the same QEMU, reset
    assert disk.read_bytes()[:2] == b"2\n"  # the guest counted its second boot
    assert machined_entry()["leader"]["pid"] == pid
    assert "VM reset" in sh("journalctl", "--no-pager", "-o", "cat", f"MACHINE={NAME}").stdout


@with_control
def test_machinectl_pause_and_resume_stop_and_continue_the_vcpus(acpi_vm: tuple[Ctl, Path]) -> None:
    ctl, _ = acpi_vm
    address = machined_entry()["controlAddress"]
    sh("machinectl", "pause", NAME)
    (reply,) = varlink_call(address, "io.systemd.MachineInstance.Describe")
    assert reply["parameters"] == {"running": False, "status": "paused"}, reply
    assert ctl.wait(lambda s: s["paused"], name=NAME, timeout=10)  # vmspawnctl shows what machinectl did
    sh("machinectl", "resume", NAME)
    (reply,) = varlink_call(address, "io.systemd.MachineInstance.Describe")
    assert reply["parameters"] == {"running": True, "status": "running"}, reply
    assert ctl.wait(lambda s: not s["paused"], name=NAME, timeout=10)


@with_control
def test_machinectl_resume_wakes_a_guest_that_suspended_itself(installed_units: Path) -> None:
    """A guest in ACPI S3 shows as QEMU's "suspended" through the control socket, and ``machinectl
    resume`` wakes it (the guest goes on where it slept: no new boot)."""
    sh("systemctl", "start", "vmspawnd.socket")
    ctl = Ctl(installed_units)
    ctl("create", "sleepy", f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}",
        "--ram=256M", "--console=read-only", "--firmware=bios", "--tpm=no", *GUEST_WORDS,
        "test.action=suspend")  # S3 once ready; once woken: STATUS=woke up
    ctl("start", "sleepy")
    try:
        pid = ctl.wait(lambda s: s["suspended"], name="sleepy", timeout=90)["pid"]
        address = machined_entry("sleepy")["controlAddress"]
        (reply,) = varlink_call(address, "io.systemd.MachineInstance.Describe")
        assert reply["parameters"]["status"] == "suspended", reply
        sh("machinectl", "resume", "sleepy")
        st = ctl.wait(lambda s: s["status"] == "woke up", name="sleepy", timeout=60)  # the guest's own word
        assert st["suspended"] is False and st["pid"] == pid and st["state"] == "running", st
        (reply,) = varlink_call(address, "io.systemd.MachineInstance.Describe")
        assert reply["parameters"] == {"running": True, "status": "running"}, reply
    finally:
        ctl("kill", "sleepy", check=False)
        ctl("remove", "sleepy", check=False)
        poll(lambda: pids_of("qemu-system-x86"), lambda pids: pids == [], 30)


@without_control
def test_machinectl_poweroff_without_control_sockets_is_reported_as_the_signal_it_is(
        acpi_vm: tuple[Ctl, Path]) -> None:
    ctl, _ = acpi_vm
    assert "controlAddress" not in machined_entry()  # 257 does not know the field: registered without it
    sh("machinectl", "poweroff", NAME)  # SIGRTMIN+4 to QEMU, which it does not handle
    st = ctl.wait(lambda s: s["state"] != "running", name=NAME, timeout=30)
    assert st["state"] == "failed" and st["exitStatus"] == 1, st
    assert "SIGRTMIN+4" in st["failure"] and "systemd < 261" in st["failure"], st


@with_control
def test_machinectl_poweroff_ends_a_foreground_vmspawn_cleanly() -> None:
    proc = vmspawn("-M", "fg", "test.action=acpi")
    try:
        entry = poll(lambda: varlink_call(MACHINED_VARLINK, "io.systemd.Machine.List", {"name": "fg"})[0],
                     lambda r: "error" not in r, 60)["parameters"]
        assert entry["controlAddress"].endswith("/fg.run/control"), entry  # vmspawn serves it too
        proc.wait_for("TESTGUEST: ready")
        sh("machinectl", "poweroff", "fg")
        out = proc.wait(60)
    finally:
        proc.stop()
    assert proc.returncode == 0, out
    assert "power button pressed" in out, out


@without_control
def test_machinectl_reboot_without_control_sockets_is_reported_as_a_signal_from_outside(
        acpi_vm: tuple[Ctl, Path]) -> None:
    ctl, _ = acpi_vm
    sh("machinectl", "reboot", NAME)  # SIGINT to QEMU, which it takes as a request to quit
    st = ctl.wait(lambda s: s["state"] != "running", name=NAME, timeout=30)
    assert st["state"] == "failed" and st["exitStatus"] == 1 and "signal from outside" in st["failure"], st
