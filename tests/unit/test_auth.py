# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who may do what: a real daemon whose socket is open to a group, and a caller of another uid
(``nobody``, through setpriv) next to root.  No VM is needed: what is refused never starts one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (to call as another user)")

#: a raw varlink call, run by the system python as ``nobody`` (the venv's may sit in a 0700 home)
CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"method": sys.argv[2], "parameters": json.loads(sys.argv[3])}).encode() + b"\0")
data = b""
while not data.endswith(b"\0"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.rstrip(b"\0").decode())
"""


@pytest.fixture
def shared_daemon() -> Iterator[Daemon]:
    """A daemon whose socket the group nogroup may use (0660), in a directory others may enter."""
    base = Path(tempfile.mkdtemp(prefix="vmspawnd-auth-"))
    base.chmod(0o755)
    d = Daemon(base)
    d.args = ["--socket-group=nogroup"]
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop_daemon()
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(daemon: Daemon, method: str, parameters: dict | None = None) -> dict:
    p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/usr/bin/python3", "-c", CLIENT, str(daemon.socket), method, json.dumps(parameters or {})],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_a_caller_who_is_not_root_may_look_but_not_touch(shared_daemon: Daemon, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    assert shared_daemon.ctl("create", "rootvm", f"--linux={kernel}").returncode == 0  # root may
    listed = as_nobody(shared_daemon, "io.vmspawnd.Manager.Describe", {"name": "rootvm"})
    assert listed["parameters"]["machine"]["owner"] == 0, listed  # and everyone may look

    for method, params in [("Create", {"name": "mine", "config": {"linux": "/etc/shadow"}}),
                           ("Start", {"name": "rootvm"}), ("Stop", {"name": "rootvm"}),
                           ("Kill", {"name": "rootvm"}), ("Remove", {"name": "rootvm"}),
                           ("OpenConsole", {"name": "rootvm"})]:
        reply = as_nobody(shared_daemon, f"io.vmspawnd.Manager.{method}", params)
        assert reply.get("error") == "io.vmspawnd.Manager.PermissionDenied", (method, reply)
        assert reply["parameters"]["action"] == "io.vmspawnd.manage"
        assert f"uid {NOBODY}" in reply["parameters"]["reason"]
    assert not (shared_daemon.state / "machines" / "mine.json").exists()  # nothing was made
    assert shared_daemon.status("rootvm")["state"] == "stopped"

    for method, params in [("SetLogLevel", {"level": 7}), ("GetEnvironment", {}), ("Reload", {})]:
        reply = as_nobody(shared_daemon, f"io.systemd.service.{method}", params)
        assert reply.get("error") == "org.varlink.service.PermissionDenied", (method, reply)
    assert "error" not in as_nobody(shared_daemon, "io.systemd.service.Ping")

