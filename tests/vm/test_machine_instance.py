# SPDX-License-Identifier: LGPL-2.1-or-later
"""Each VM's control socket (``io.systemd.MachineInstance``, what machinectl ≥ 261 calls), driven
the way machinectl drives it, against a real daemon and real QEMU guests.  The systemd 262 tier
(tests/systemd/test_machinectl.py) drives the same socket through machinectl itself."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from tests.conftest import Daemon, EventFollower
from tests.polling import poll
from tests.systemd.helpers import varlink_call
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = pytest.mark.vm

IFACE = "io.systemd.MachineInstance"


def control(daemon: Daemon, name: str) -> str:
    """The VM's control socket: in the run's records dir, the daemon's alone (not in the VM's directory,
    where its user could put another VM's socket in its place)."""
    path = daemon.runtime / "machines" / f"{name}.run" / "control"
    assert not (daemon.runtime / "machines" / name / "control").exists()
    records = path.parent.stat()
    assert (records.st_uid, records.st_mode & 0o777) == (os.geteuid(), 0o700)
    return str(path)


def bare_call(path: str, method: str) -> dict:
    """A call without a ``parameters`` member, as machinectl sends them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps({"method": method}).encode() + b"\0")
        buf = b""
        while b"\0" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"{path} hung up"
            buf += chunk
    return json.loads(buf.split(b"\0", 1)[0])


def start(daemon: Daemon, guest, name: str, *words: str) -> dict:
    p = daemon.ctl("create", name, f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                   "--console=read-only", "--firmware=bios", *GUEST_WORDS, *words)
    assert p.returncode == 0, p.stderr
    assert daemon.ctl("start", name).returncode == 0
    return daemon.wait_for(name, lambda s: s["ready"])


class Subscription:
    """SubscribeEvents on a thread: every reply, as it comes."""

    def __init__(self, path: str, events: list[str] | None = None) -> None:
        self.replies: list[dict] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        call = {"method": f"{IFACE}.SubscribeEvents", "parameters": {"filter": events}, "more": True}
        self._sock.sendall(json.dumps(call).encode() + b"\0")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while chunk := self._sock.recv(65536):
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self.replies.append(json.loads(msg))

    def events(self) -> list[str]:
        return [r.get("parameters", {}).get("event") or r.get("error") for r in list(self.replies)]

    def close(self) -> None:
        self._sock.close()
        self._thread.join(10)


def test_reboot_pause_resume_and_power_off_through_the_control_socket(daemon: Daemon, guest, tmp_path: Path) -> None:
    disk = tmp_path / "bootcount.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    st = start(daemon, guest, "ctl", f"--extra-drive=raw:{disk}", "test.bootcount=vda", "test.action=acpi")
    path = control(daemon, "ctl")
    assert "(boot 1)" in st["status"], st
    assert bare_call(path, f"{IFACE}.Describe")["parameters"] == {"running": True, "status": "running"}

    sub = Subscription(path, ["RESET", "STOP", "RESUME"])
    ours = EventFollower(daemon, "ctl")
    try:
        poll(sub.events, lambda e: e[:1] == ["READY"], 10)  # subscribed: nothing is missed from here
        assert "error" not in bare_call(path, f"{IFACE}.Reboot")
        # the same QEMU boots again: not ready until the guest says so, then ready with its second boot
        after = daemon.wait_for("ctl", lambda s: s["ready"] and "(boot 2)" in (s["status"] or ""), 90)
        assert after["pid"] == st["pid"] and after["state"] == "running"
        assert disk.read_bytes()[:2] == b"2\n"
        assert "error" not in bare_call(path, f"{IFACE}.Pause")
        assert bare_call(path, f"{IFACE}.Describe")["parameters"] == {"running": False, "status": "paused"}
        assert daemon.wait_for("ctl", lambda s: s["paused"], 10)  # as vmspawnctl shows it
        assert "error" not in bare_call(path, f"{IFACE}.Resume")
        assert bare_call(path, f"{IFACE}.Describe")["parameters"]["running"] is True
        assert daemon.wait_for("ctl", lambda s: not s["paused"], 10)
        # QEMU's events, as QEMU sent them (SeaBIOS resets once more by itself while rebooting)
        seen = poll(sub.events, lambda e: e[-2:] == ["STOP", "RESUME"], 10)
        assert seen[:2] == ["READY", "RESET"] and set(seen[2:-2]) <= {"RESET"}, seen
        # the daemon's own events: reset (with QEMU's reason), then ready again, paused, resumed
        kinds = poll(ours.kinds, lambda k: "resumed" in k, 10)
        assert set(kinds[:kinds.index("ready")]) == {"reset"}, kinds
        assert [k for k in kinds if k in ("paused", "resumed")] == ["paused", "resumed"], kinds
        assert ours.events()[0]["reason"] == "host-qmp-system-reset"
    finally:
        sub.close()
        ours.close()

    assert "error" not in bare_call(path, f"{IFACE}.PowerOff")  # the ACPI power button: the guest powers off
    end = daemon.wait_for("ctl", lambda s: s["state"] != "running", 60)
    assert end["state"] == "stopped" and end["exitStatus"] == 0, end
    assert not Path(path).exists()


def test_terminate_through_the_control_socket_is_reported_as_killed(daemon: Daemon, guest) -> None:
    st = start(daemon, guest, "term", "test.action=hang")
    path = control(daemon, "term")
    reply = bare_call(path, f"{IFACE}.Terminate")
    assert "error" not in reply, reply
    end = daemon.wait_for("term", lambda s: s["state"] != "running", 30)
    assert end["state"] == "failed" and end["exitStatus"] == 1 and "terminated" in end["failure"], end
    poll(lambda: Path(f"/proc/{st['pid']}").exists(), lambda alive: not alive, 15)


def test_the_control_socket_refuses_what_it_does_not_do_and_survives_a_daemon_restart(daemon: Daemon, guest) -> None:
    start(daemon, guest, "keep", "test.action=hang")
    path = control(daemon, "keep")
    (reply,) = varlink_call(path, f"{IFACE}.AddStorage", {"fileDescriptorIndex": 0, "name": "x:y"})
    assert reply["error"] == f"{IFACE}.NotSupported", reply
    (reply,) = varlink_call(path, "org.varlink.service.GetInfo")
    assert {"io.systemd.MachineInstance", "io.systemd.VirtualMachineInstance"} <= set(reply["parameters"]["interfaces"])
    daemon.stop_daemon()  # the VM keeps running; its socket answers again once a daemon adopts it
    daemon.start()
    assert daemon.status("keep")["state"] == "running"
    assert bare_call(path, f"{IFACE}.Describe")["parameters"]["status"] == "running"
    assert "error" not in bare_call(path, f"{IFACE}.Terminate")
    assert daemon.wait_for("keep", lambda s: s["state"] != "running", 30)["state"] == "failed"
