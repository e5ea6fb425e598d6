# SPDX-License-Identifier: LGPL-2.1-or-later
"""A machine's commands against one another while a start fails, with the start's own failure made
to happen at once (the rest of the run, its clean-up included, is the real one)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmspawnd.config import MachineConfig
from vmspawnd.errors import StartError, WrongState
from vmspawnd.machine import Machine, State
from vmspawnd.manager import Manager
from vmspawnd.run import Run
from vmspawnd.settings import config_from_json
from vmspawnd.values import Tristate


@pytest.fixture
def failing_start(monkeypatch):
    """Each run's start fails, after acquiring something whose release takes 0.3 s; what was done of
    the releases ("releasing", then "released")."""
    released: list[str] = []

    async def start_then_fail(run: Run) -> None:
        async def release() -> None:
            released.append("releasing")
            await asyncio.sleep(0.3)
            released.append("released")
        run.on_cleanup_async(release)
        raise StartError("the helper failed")

    monkeypatch.setattr(Run, "_start", start_then_fail)
    return released


def _machine(tmp_path: Path) -> Machine:
    return Machine(MachineConfig(name="vm", linux=Path("/vmlinuz"), tpm=Tristate.NO), runtime_base=tmp_path)


async def _until(predicate) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_a_kill_lets_a_failing_start_finish_its_clean_up_and_keep_its_error(tmp_path, failing_start):
    machine = _machine(tmp_path)
    start = asyncio.ensure_future(machine.start())
    await _until(lambda: failing_start == ["releasing"])
    await machine.kill()  # (it used to cancel the clean-up under way, and say the start was killed)
    with pytest.raises(StartError, match="the helper failed"):
        await start
    assert failing_start == ["releasing", "released"]
    assert (machine.state, machine.failure) == (State.FAILED, "the helper failed")


async def test_a_start_waiting_while_vmspawnd_stops_is_refused(tmp_path, failing_start):
    machine = _machine(tmp_path)
    first = asyncio.ensure_future(machine.start())
    await _until(lambda: machine.run is not None)
    second = asyncio.ensure_future(machine.start())  # waits for the first's lock
    await asyncio.sleep(0)
    await machine.detach()
    with pytest.raises(StartError):
        await first
    with pytest.raises(WrongState, match="vmspawnd is stopping"):
        await second
    assert failing_start == ["releasing", "released"]  # the second never ran


async def test_a_machine_created_while_vmspawnd_stops_is_not_started(tmp_path, failing_start):
    """The daemon's stop lets go of the machines it has; one a client creates meanwhile (the stop
    waits for a busy machine's lock) must not start either: nothing would let go of its VM."""
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    manager.create(config_from_json("busy", {"linux": "/bin/sh"}))
    lock = manager.machines["busy"].machine.lock
    await lock.acquire()  # as a command in flight holds it
    shutdown = asyncio.create_task(manager.shutdown())
    await asyncio.sleep(0.1)
    assert not shutdown.done()  # waiting for busy's lock
    manager.create(config_from_json("latecomer", {"linux": "/bin/sh"}))
    with pytest.raises(WrongState, match="vmspawnd is stopping"):
        await manager.start("latecomer")
    assert failing_start == []  # (no run was begun)
    lock.release()
    await shutdown


async def test_a_kill_that_undid_a_start_does_not_wait_for_the_start_queued_behind_it(tmp_path, monkeypatch):
    async def start_and_hang(run: Run) -> None:
        run.on_cleanup_async(lambda: asyncio.sleep(0.1))
        await asyncio.sleep(3600)  # (an --ephemeral copy that takes long)

    monkeypatch.setattr(Run, "_start", start_and_hang)
    machine = _machine(tmp_path)
    first = asyncio.ensure_future(machine.start())
    await _until(lambda: machine.run is not None)
    second = asyncio.ensure_future(machine.start())  # another client's, queued behind the first
    await asyncio.sleep(0)
    async with asyncio.timeout(10):  # (it waited for the lock, which the second start then held)
        await machine.kill()
    with pytest.raises(StartError, match="vm was killed while it was starting"):
        await first
    await _until(lambda: machine.state is State.STARTING)
    await machine.kill()  # the second start, undone in its turn
    with pytest.raises(StartError, match="killed while it was starting"):
        await second
    assert machine.state is State.STOPPED
