# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who may do what: a real daemon whose socket is open to a group, and a caller of another uid
(``nobody``, through setpriv) next to root.  No VM is needed: what is refused never starts one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, call_as, public_daemon
from tests.polling import poll
from vmspawnd.proc import process_start_time
from vmspawnd.server import peer_credentials, peer_start_time

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (to call as another user)")

@pytest.fixture
def shared_daemon() -> Iterator[Daemon]:
    """A daemon whose socket only the group nogroup may use (0660)."""
    with public_daemon("--socket-group=nogroup") as d:
        yield d


def as_nobody(daemon: Daemon, method: str, parameters: dict | None = None) -> dict:
    return call_as(NOBODY, daemon.socket, method, parameters)


def test_a_caller_who_is_not_root_may_look_at_others_machines_but_not_touch_them(shared_daemon: Daemon,
                                                                                 tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    assert shared_daemon.ctl("create", "rootvm", f"--linux={kernel}").returncode == 0  # root may
    listed = as_nobody(shared_daemon, "io.vmspawnd.Manager.Describe", {"name": "rootvm"})
    assert listed["parameters"]["machine"]["owner"] == 0, listed  # and everyone may look
    assert listed["parameters"]["machine"]["runAs"] == 0, listed

    for method in ("Start", "Stop", "Kill", "Reboot", "Pause", "Resume", "Remove", "OpenConsole"):
        reply = as_nobody(shared_daemon, f"io.vmspawnd.Manager.{method}", {"name": "rootvm"})
        assert reply.get("error") == "io.vmspawnd.Manager.PermissionDenied", (method, reply)
        assert reply["parameters"]["action"] == "io.vmspawnd.manage-all"  # no polkit here: no
        assert f"uid {NOBODY}" in reply["parameters"]["reason"]
    assert shared_daemon.status("rootvm")["state"] == "stopped"

    for method, params in [("SetLogLevel", {"level": 7}), ("GetEnvironment", {}), ("Reload", {})]:
        reply = as_nobody(shared_daemon, f"io.systemd.service.{method}", params)
        assert reply.get("error") == "org.varlink.service.PermissionDenied", (method, reply)
    assert "error" not in as_nobody(shared_daemon, "io.systemd.service.Ping")


def test_a_callers_machine_is_checked_with_its_rights_and_is_its_own(shared_daemon: Daemon, public_dir: Path) -> None:
    tmp_path = public_dir
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    kernel.chmod(0o644)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)  # root's, like /root
    efi_kernel = tmp_path / "vmlinuz.efi"  # (only a PE kernel is booted by UEFI firmware)
    efi_kernel.write_bytes(b"MZ" + bytes(0x3A) + (0x40).to_bytes(4, "little") + b"PE\0\0")
    efi_kernel.chmod(0o644)

    refused = [({"linux": "/etc/shadow"}, "linux", "permission denied"),
               ({"linux": str(kernel), "binds": [f"rw:{secret}:/mnt"]}, "binds", "permission denied"),
               ({"linux": str(kernel), "tpmState": str(secret / "tpm")}, "tpmState", "not writable"),
               ({"linux": str(kernel), "tpmState": "/etc/vmspawnd-tpm"}, "tpmState", "not writable"),
               ({"linux": str(kernel), "forwardJournal": "/etc/vmspawnd-journal"}, "forwardJournal", "not writable"),
               ({"linux": str(kernel), "forwardJournal": str(secret / "vm.journal")}, "forwardJournal",
                "not writable"),
               ({"linux": str(efi_kernel), "firmware": str(secret / "fw.json")}, "firmware", "Permission denied")]
    for config, field, reason in refused:
        reply = as_nobody(shared_daemon, "io.vmspawnd.Manager.Create", {"name": "mine", "config": config})
        assert reply.get("error") == "io.vmspawnd.Manager.InvalidConfig", (config, reply)
        assert reply["parameters"]["field"] == field and reason in reply["parameters"]["reason"], reply
    reply = as_nobody(shared_daemon, "io.vmspawnd.Manager.Create",
                      {"name": "mine", "config": {"linux": str(kernel), "network": "tap"}})
    assert reply.get("error") == "io.vmspawnd.Manager.PermissionDenied", reply  # runs as root: polkit says no
    assert reply["parameters"]["action"] == "io.vmspawnd.privileged-features"
    assert "network-tap" in reply["parameters"]["reason"]
    assert not (shared_daemon.state / "machines" / "mine.json").exists()  # nothing was made
    assert not Path("/etc/vmspawnd-tpm").exists() and list(secret.iterdir()) == []

    reply = as_nobody(shared_daemon, "io.vmspawnd.Manager.Create", {"name": "mine", "config": {"linux": str(kernel)}})
    assert "error" not in reply, reply
    machine = reply["parameters"]["machine"]
    assert (machine["owner"], machine["runAs"]) == (NOBODY, NOBODY)
    definition = json.loads((shared_daemon.state / "machines" / "mine.json").read_text())
    assert (definition["owner"], definition["runAs"]) == (NOBODY, NOBODY)
    shown = shared_daemon.ctl("status", "mine")
    assert "Owner: nobody (65534)" in shown.stdout and "runs as" not in shown.stdout, shown.stdout
    assert "error" not in as_nobody(shared_daemon, "io.vmspawnd.Manager.Remove", {"name": "mine"})  # its own
    assert not (shared_daemon.state / "machines" / "mine.json").exists()


def test_an_owner_starting_its_machine_that_runs_as_root_asks_polkit_again(shared_daemon: Daemon,
                                                                          public_dir: Path) -> None:
    kernel = public_dir / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    kernel.chmod(0o644)
    (shared_daemon.state / "machines" / "tapped.json").write_text(json.dumps(  # allowed once, by an earlier polkit
        {"name": "tapped", "owner": NOBODY, "runAs": 0, "config": {"linux": str(kernel), "network": "tap"}}))
    assert shared_daemon.proc is not None
    shared_daemon.proc.send_signal(signal.SIGHUP)
    info = poll(lambda: as_nobody(shared_daemon, "io.vmspawnd.Manager.Describe", {"name": "tapped"}),
                lambda r: "error" not in r, 15)["parameters"]["machine"]
    assert (info["owner"], info["runAs"]) == (NOBODY, 0)
    reply = as_nobody(shared_daemon, "io.vmspawnd.Manager.Start", {"name": "tapped"})
    assert reply.get("error") == "io.vmspawnd.Manager.PermissionDenied", reply  # no polkit here: no
    assert reply["parameters"]["action"] == "io.vmspawnd.privileged-features"
    assert shared_daemon.status("tapped")["state"] == "stopped"  # nothing started
    assert "error" not in as_nobody(shared_daemon, "io.vmspawnd.Manager.Remove", {"name": "tapped"})  # still its own


def test_a_callers_start_time_is_that_of_the_process_that_connected_and_unknown_once_it_ended(
        tmp_path: Path) -> None:
    """What polkit is told about a caller is read as it connects, and only of the process that did."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen()
    connect = f"import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect({str(tmp_path / 's')!r}); "
    running = subprocess.Popen([sys.executable, "-c", connect + "sys.stdin.read()"], stdin=subprocess.PIPE)
    ended = subprocess.Popen([sys.executable, "-c", connect])
    try:
        conns = [listener.accept()[0], listener.accept()[0]]
        poll(lambda: Path(f"/proc/{ended.pid}/stat").read_text().rsplit(")", 1)[1].split()[0], "Z".__eq__, 10)
        peers = {pid: (pid, start) for pid, start in map(peer_start_time_of, conns)}
        assert peers[running.pid] == (running.pid, process_start_time(running.pid))
        assert peers[ended.pid] == (ended.pid, None)  # ended (not yet reaped): its pid may soon be another's
    finally:
        ended.wait()
        running.kill()
        running.wait()


def peer_start_time_of(conn: socket.socket) -> tuple[int, int | None]:
    creds = peer_credentials(conn)
    assert creds is not None
    return creds[0], peer_start_time(conn, creds[0])
