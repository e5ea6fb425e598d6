# SPDX-License-Identifier: LGPL-2.1-or-later
"""Reload (SIGHUP, ``systemctl reload vmspawnd``, io.systemd.service.Reload): the definitions on disk
are read again by a real daemon; no VM is needed, since a running VM is never touched by it."""

from __future__ import annotations

import json
import signal

from tests.conftest import Daemon
from tests.polling import poll
from tests.systemd.helpers import varlink_call


def names(daemon: Daemon) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads(daemon.ctl("--json", "list").stdout or "[]")}


def test_sighup_and_reload_read_the_definitions_again(daemon: Daemon, tmp_path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    assert daemon.ctl("create", "one", f"--linux={kernel}", "--ram=256M").returncode == 0
    assert daemon.ctl("create", "gone", f"--linux={kernel}").returncode == 0
    machines = daemon.state / "machines"
    one = json.loads((machines / "one.json").read_text())

    two = {"name": "two", "config": {**one["config"], "ram": "512M"}}  # written by hand (or config management)
    (machines / "two.json").write_text(json.dumps(two))
    (machines / "one.json").write_text(json.dumps({"name": "one", "config": {**one["config"], "cpus": "2"}}))
    (machines / "gone.json").unlink()
    (machines / "bad.json").write_text("{not json")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)

    listed = poll(lambda: names(daemon), lambda m: "two" in m and "gone" not in m, 15)
    assert set(listed) == {"one", "two", "bad"}, listed
    assert daemon.status("two")["config"]["ram"] == str(512 << 20)
    assert daemon.status("one")["config"]["cpus"] == "2"  # takes effect at its next start
    bad = daemon.status("bad")
    assert bad["state"] == "failed" and "cannot be used" in bad["definitionError"], bad
    assert daemon.proc.poll() is None  # the daemon lives on

    (machines / "bad.json").write_text(json.dumps({"name": "bad", "config": one["config"]}))  # fixed
    (reply,) = varlink_call(str(daemon.socket), "io.systemd.service.Reload")
    assert "error" not in reply, reply
    fixed = daemon.status("bad")  # Reload answers once the definitions are read
    assert fixed["state"] == "stopped" and fixed["definitionError"] is None, fixed
    assert "machine definitions re-read" in daemon.log.read_text()
