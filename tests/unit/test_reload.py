# SPDX-License-Identifier: LGPL-2.1-or-later
"""Reload (SIGHUP, ``systemctl reload vmspawnd``, io.systemd.service.Reload): the definitions on disk
are read again by a real daemon; no VM is needed, since a running VM is never touched by it."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from tests.conftest import Daemon
from tests.polling import poll
from tests.systemd.helpers import varlink_call
from vmspawnd.api import ManagerCalls
from vmspawnd.errors import WrongState
from vmspawnd.interface import WrongStateError
from vmspawnd.machine import State
from vmspawnd.manager import Manager
from vmspawnd.settings import config_from_json


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


def test_a_definition_whose_credential_is_of_the_wrong_type_names_it_but_never_shows_the_secret(daemon: Daemon,
                                                                                                 tmp_path) -> None:
    """(Its error is logged, and Describe shows it: a credential's value written as a string, not a list,
    was echoed in both.)"""
    secret = "hunter2-secret"
    config = {"linux": "/bin/sh", "credentials": f"token:{secret}"}
    (daemon.state / "machines").mkdir(parents=True, exist_ok=True)
    (daemon.state / "machines" / "leaky.json").write_text(json.dumps({"name": "leaky", "config": config}))
    (reply,) = varlink_call(str(daemon.socket), "io.systemd.service.Reload")
    assert "error" not in reply, reply
    error = daemon.status("leaky")["definitionError"]
    assert "invalid credentials=(a string, not shown): expected a list" in error, error
    assert secret not in daemon.ctl("--json", "status", "leaky").stdout and secret not in daemon.log.read_text()


async def test_a_reload_that_waits_for_a_machine_keeps_what_clients_created_and_removed_meanwhile(tmp_path) -> None:
    """A reload waits for each machine's lock (a Start holds it while its VM comes up); a client's Create
    and Remove in that time stand: the new machine is not forgotten, the removed one not brought back."""
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    for name in ("busy", "doomed"):
        manager.create(config_from_json(name, {"linux": "/bin/sh"}))
    lock = manager.machines["busy"].machine.lock
    await lock.acquire()  # as a Start in flight holds it
    (manager.definitions / "busy.json").write_text((manager.definitions / "busy.json").read_text())
    reload = asyncio.create_task(manager.reload())
    await asyncio.sleep(0.1)
    assert not reload.done()  # waiting for busy's lock
    manager.create(config_from_json("newcomer", {"linux": "/bin/sh"}))
    await manager.remove("doomed")
    lock.release()
    assert await reload == []
    assert sorted(manager.machines) == ["busy", "newcomer"]
    assert sorted(p.name for p in manager.definitions.glob("*.json")) == ["busy.json", "newcomer.json"]


async def test_a_command_authorized_before_a_reload_changed_owner_or_user_is_refused(tmp_path) -> None:
    """A command is authorized for the machine's owner and the user it runs as, then may wait (for
    polkit's answer, or for the machine's lock, which a Start holds while its VM comes up).  A reload
    that changes either meanwhile makes it refused, not done as no one authorized it (e.g. a Start of a
    machine that now runs as root); a reload that changes anything else does not."""
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    for name in ("web", "db"):
        config = config_from_json(name, {"linux": "/bin/sh"})
        manager.create(config, owner=1000, run_as=1000, plan=manager.plan(config))
    web, db = manager.machines["web"], manager.machines["db"]
    authorized = {name: manager.machines[name].machine.ownership for name in ("web", "db")}  # (as the API notes)
    for name, change in (("web", {"runAs": 0}), ("db", {"config": {"linux": "/bin/sh", "ram": "512M"}})):
        path = manager.definitions / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    lock = web.machine.lock
    await lock.acquire()  # as a Start in flight holds it
    reload = asyncio.create_task(manager.reload())
    await asyncio.sleep(0.1)  # the reload waits for web's lock, and the commands behind it
    start = asyncio.create_task(manager.start("web", expected=web, authorized=authorized["web"]))
    remove = asyncio.create_task(manager.remove("web", expected=web, authorized=authorized["web"]))
    await asyncio.sleep(0.1)
    lock.release()
    assert sorted(await reload) == ["db: definition changed", "web: definition changed"]
    for command in (start, remove):
        with pytest.raises(WrongState, match="the user it runs as changed .* try again"):
            await command
    assert (web.run_as, web.machine.state, web.machine.run) == (0, State.STOPPED, None)  # not started
    assert "web" in manager.machines and (manager.definitions / "web.json").exists()
    await manager.remove("db", expected=db, authorized=authorized["db"])  # (its ram changed: nothing to refuse)
    await manager.remove("web", expected=web, authorized=web.machine.ownership)  # authorized anew: done
    assert manager.machines == {}
    await manager.shutdown()


async def test_the_api_refuses_a_start_or_remove_authorized_before_a_reload_gave_the_machine_to_root(tmp_path) -> None:
    """The same through the varlink methods' implementations (api.ManagerCalls, as its caller the daemon
    itself): what each notes before it is authorized reaches the machine, which refuses with the
    interface's WrongState once a reload changed the user it runs as."""
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    calls = ManagerCalls(manager)
    config = config_from_json("web", {"linux": "/bin/sh"})
    manager.create(config, owner=1000, run_as=1000, plan=manager.plan(config))
    path = manager.definitions / "web.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "runAs": 0}))
    lock = manager.machines["web"].machine.lock
    await lock.acquire()  # as a Start in flight holds it
    reload = asyncio.create_task(manager.reload())
    await asyncio.sleep(0.1)
    commands = [asyncio.create_task(calls.start("web")), asyncio.create_task(calls.remove("web"))]
    await asyncio.sleep(0.1)  # both authorized, and waiting behind the reload
    lock.release()
    assert await reload == ["web: definition changed"]
    for command in commands:
        with pytest.raises(WrongStateError) as refused:
            await command
        assert "the user it runs as changed" in refused.value.parameters["reason"], refused.value.parameters
    web = manager.machines["web"]
    assert (web.run_as, web.machine.state, web.machine.run) == (0, State.STOPPED, None)
    await calls.remove("web")  # asked again: authorized for what it is now
    assert manager.machines == {} and not path.exists()
    await manager.shutdown()
