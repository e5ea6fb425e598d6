# SPDX-License-Identifier: LGPL-2.1-or-later
"""The systemd tier's environment is real: systemd 257+ as PID 1, machined over varlink, transient
units, the project's venv, QEMU, and the project's socket-activated daemon under real systemd.

Run inside the container of ``make test-systemd``; skipped elsewhere (see conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.polling import poll
from tests.systemd.container import SUITES
from tests.systemd.helpers import (
    MACHINED_VARLINK,
    json_stream,
    service_type,
    sh,
    unit_properties,
    varlink_call,
    varlinkctl,
    wait_journal,
)

pytestmark = pytest.mark.systemd

MANAGER_SOCKET = "/run/vmspawnd/io.vmspawnd.Manager"


# ---- the manager itself

def test_pid1_is_the_suites_systemd() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    first = sh("systemctl", "--version").stdout.splitlines()[0]
    m = re.match(r"systemd (\d+)", first)
    assert m and m.group(1) in SUITES.values(), first  # bookworm's 252, trixie's 257 or forky's 262
    state = sh("systemctl", "is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded"), state


def test_machined_list_over_varlink_with_varlinkctl(machined: None) -> None:
    p = sh("varlinkctl", "call", "--more", MACHINED_VARLINK, "io.systemd.Machine.List", "{}")
    machines = json_stream(p.stdout)
    assert ".host" in [m.get("name") for m in machines], p.stdout


def test_machined_list_over_raw_varlink(machined: None) -> None:
    replies = varlink_call(MACHINED_VARLINK, "io.systemd.Machine.List", more=True)
    assert all("error" not in r for r in replies), replies
    names = [r["parameters"]["name"] for r in replies]
    assert ".host" in names
    host = next(r["parameters"] for r in replies if r["parameters"]["name"] == ".host")
    assert host["class"] == "host"


def test_machined_interface_is_introspectable(machined: None) -> None:
    p = sh("varlinkctl", "introspect", MACHINED_VARLINK, "io.systemd.Machine")
    for method in ("method Register(", "method List(", "method Kill(", "method Terminate("):
        assert method in p.stdout


def test_transient_service_shows_in_systemctl() -> None:
    unit = f"vmspawnd-envtest-{uuid.uuid4().hex[:8]}.service"
    sh("systemd-run", f"--unit={unit}", "--property=Description=environment test", "--service-type=exec",
       "sleep", "infinity")
    try:
        props = unit_properties(unit, "ActiveState", "SubState", "Type", "MainPID", "ControlGroup", "Description")
        assert props["ActiveState"] == "active" and props["SubState"] == "running", props
        assert props["Type"] == "exec" and props["Description"] == "environment test"
        pid = int(props["MainPID"])
        assert pid > 1 and Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
        assert Path(f"/proc/{pid}/cgroup").read_text().strip().endswith(f"/{unit}")
        assert props["ControlGroup"].endswith(f"/{unit}")
    finally:
        sh("systemctl", "stop", unit)
    assert unit_properties(unit, "ActiveState")["ActiveState"] in ("inactive", "")


# ---- the project's venv and what it drives

def test_project_venv_imports() -> None:
    import asyncvarlink
    import dbus_fast
    import systemd.daemon
    import systemd.journal

    import vmspawnd

    assert sys.prefix != sys.base_prefix, "not running in a venv"
    # the editable install resolves to the live (read-only) checkout, not a copy
    assert Path(vmspawnd.__file__).is_relative_to("/src"), vmspawnd.__file__
    assert systemd.daemon.booted()
    assert asyncvarlink and dbus_fast and systemd.journal


def test_console_scripts_are_in_the_venv() -> None:
    bindir = Path(sys.executable).parent
    for script in ("vmspawn", "vmspawnd", "vmspawnctl"):
        assert os.access(bindir / script, os.X_OK), script
    out = sh(str(bindir / "vmspawnd"), "--version").stdout
    import vmspawnd
    assert vmspawnd.__version__ in out


def test_qemu_runs_inside() -> None:
    out = sh("qemu-system-x86_64", "--version").stdout
    assert out.startswith("QEMU emulator version"), out
    sh("qemu-img", "--version")
    sh("swtpm", "--version")


# ---- the project's units under the real manager

def test_socket_activation_starts_the_daemon(installed_units: Path) -> None:
    sh("systemctl", "start", "vmspawnd.socket")
    assert unit_properties("vmspawnd.socket", "ActiveState")["ActiveState"] == "active"
    # nothing started the service yet: the socket alone listens
    assert unit_properties("vmspawnd.service", "ActiveState")["ActiveState"] == "inactive"
    st = os.stat(MANAGER_SOCKET)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666, oct(st.st_mode)

    info = json.loads(sh(*varlinkctl(), "call", MANAGER_SOCKET, "org.varlink.service.GetInfo", "{}").stdout)
    import vmspawnd
    assert info["vendor"] == "vmspawnd" and info["version"] == vmspawnd.__version__, info
    assert "io.vmspawnd.Manager" in info["interfaces"], info

    props = unit_properties("vmspawnd.service", "ActiveState", "SubState", "Type", "ExecMainStatus", "StatusText",
                            "NRestarts", "MainPID")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == service_type(), props
    assert props["StatusText"] == "0 VM(s) running", props
    assert Path(f"/proc/{props['MainPID']}/cmdline").read_bytes().split(b"\0")[1] == str(
        installed_units / "vmspawnd").encode()
    journal = poll(lambda: sh("journalctl", "--no-pager", "-o", "cat", "-u", "vmspawnd.service").stdout,
                   lambda j: re.search(r"^serving\b.*socket=/run/vmspawnd/io\.vmspawnd\.Manager", j, re.M), 15)
    assert "serving" in journal


def test_units_pass_systemd_analyze_verify_and_enable(installed_units: Path) -> None:
    units = ["/etc/systemd/system/vmspawnd.socket", "/etc/systemd/system/vmspawnd.service"]
    p = sh("systemd-analyze", "verify", *units)
    assert p.stderr.strip() == "" and p.stdout.strip() == "", p.stderr + p.stdout
    try:
        sh("systemctl", "enable", "vmspawnd.service")  # Also=vmspawnd.socket
        assert Path("/etc/systemd/system/sockets.target.wants/vmspawnd.socket").exists()
        assert Path("/etc/systemd/system/multi-user.target.wants/vmspawnd.service").exists()
        assert sh("systemctl", "is-enabled", "vmspawnd.socket").stdout.strip() == "enabled"
    finally:
        sh("systemctl", "disable", "vmspawnd.service", "vmspawnd.socket")


def test_client_uses_the_activated_daemon(installed_units: Path) -> None:
    sh("systemctl", "start", "vmspawnd.socket")
    ctl = str(installed_units / "vmspawnctl")
    assert json.loads(sh(ctl, "--json", "list").stdout or "[]") == []
    firmware = varlink_call(MANAGER_SOCKET, "io.vmspawnd.Manager.ListFirmware")
    assert "error" not in firmware[-1], firmware


def test_daemon_restart_reactivates_on_the_same_socket(installed_units: Path) -> None:
    sh("systemctl", "start", "vmspawnd.socket")
    varlink_call(MANAGER_SOCKET, "org.varlink.service.GetInfo")
    first_pid = unit_properties("vmspawnd.service", "MainPID")["MainPID"]
    sh("systemctl", "stop", "vmspawnd.service")
    # the socket unit keeps listening and its file survives the service's RuntimeDirectory handling
    assert unit_properties("vmspawnd.socket", "ActiveState")["ActiveState"] == "active"
    assert stat.S_ISSOCK(os.stat(MANAGER_SOCKET).st_mode)
    reply = varlink_call(MANAGER_SOCKET, "org.varlink.service.GetInfo")
    assert reply[-1]["parameters"]["vendor"] == "vmspawnd"
    props = unit_properties("vmspawnd.service", "ActiveState", "MainPID")
    assert props["ActiveState"] == "active" and props["MainPID"] != first_pid, props
    # and the socket unit itself can be restarted (it re-binds over the file it left behind)
    sh("systemctl", "stop", "vmspawnd.service", "vmspawnd.socket")
    sh("systemctl", "start", "vmspawnd.socket")
    assert varlink_call(MANAGER_SOCKET, "org.varlink.service.GetInfo")[-1]["parameters"]["vendor"] == "vmspawnd"


def test_daemon_stops_cleanly_on_sigterm(installed_units: Path) -> None:
    sh("systemctl", "start", "vmspawnd.socket")
    varlink_call(MANAGER_SOCKET, "org.varlink.service.GetInfo")
    since = time.time() - 1
    sh("systemctl", "stop", "vmspawnd.service")
    props = unit_properties("vmspawnd.service", "ActiveState", "Result", "ExecMainStatus")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    wait_journal("shutting down", "-o", "cat", "-u", "vmspawnd.service", f"--since=@{int(since)}")


def test_machinectl_lists_over_dbus() -> None:
    p = subprocess.run(["machinectl", "list", "--no-legend", "--no-pager"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr


def test_no_host_device_node_is_bound_in_and_src_is_read_only() -> None:
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        mounts[f[4]] = (f[5], f[f.index("-") + 1])
    # nspawn mknod's its own nodes into a tmpfs /dev: a bind of a host node would be a mount here
    bound = [p for p in mounts if p.startswith("/dev/") and p not in ("/dev/pts", "/dev/shm", "/dev/mqueue",
                                                                      "/dev/hugepages")
             and not p.startswith("/dev/pts/")]
    assert bound == [], bound
    assert mounts["/dev"][1] == "tmpfs", mounts["/dev"]
    assert "ro" in mounts["/src"][0].split(","), mounts["/src"]
    assert not os.access("/src/pyproject.toml", os.W_OK)
