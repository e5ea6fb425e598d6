# SPDX-License-Identifier: LGPL-2.1-or-later
"""A Create is durable once answered, through the definitions' log (one write to a file whose blocks
exist) rather than fsyncs of its own file: a crash before the files are durable loses no machine a
client was told it created, and brings back none it removed.  A power loss cannot be made here; what
it may do to files written without fsync (lose them, tear them, undo a removal) is done by hand to the
files of a real daemon that was killed while only the log held its latest commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading

import pytest

from tests.conftest import Daemon
from tests.rawvarlink import call
from vmspawnd import definitionlog
from vmspawnd.definitionlog import FILE_NAME, DefinitionLog
from vmspawnd.errors import HostError
from vmspawnd.faults import CRASH_ENV
from vmspawnd.manager import Manager
from vmspawnd.settings import config_from_json


def create(daemon: Daemon, name: str, ram: str = "256M") -> None:
    config = {"linux": "/bin/sh", "ram": ram}
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": name, "config": config})
    assert "error" not in reply, reply


def listed(daemon: Daemon) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads(daemon.ctl("--json", "list").stdout or "[]")}


def test_a_crash_before_the_files_are_durable_loses_no_created_machine_and_brings_back_no_removed_one(
        tmp_path) -> None:
    daemon = Daemon(tmp_path)
    daemon.env = {CRASH_ENV: "definitions-checkpoint"}  # it dies where it would make the files durable
    daemon.start()
    try:
        kept: dict[str, str] = {}
        removed: list[str] = []

        def client(number: int) -> None:  # four at once: their records interleave in the log
            for i in range(25):
                name, ram = f"c{number}m{i}", f"{256 + number * 32 + i}M"
                create(daemon, name, ram)
                if i % 5 == 4:
                    reply = call(daemon.socket, "io.vmspawnd.Manager.Remove", {"name": name})
                    assert "error" not in reply, reply
                    removed.append(name)
                else:
                    kept[name] = ram

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=30) == -9  # a second after the last command, before any file was synced
        machines = daemon.state / "machines"
        assert sorted(p.stem for p in machines.glob("*.json")) == sorted(kept)
        # what a power loss may leave of files written without fsync
        first, second, *rest = sorted(kept)
        (machines / f"{first}.json").unlink()  # a new file that never reached the disk
        data = (machines / f"{second}.json").read_bytes()
        (machines / f"{second}.json").write_bytes(data[:len(data) // 2])  # torn
        for name in removed:  # a removal that never reached the disk
            (machines / f"{name}.json").write_bytes(data)

        daemon.env = {}
        daemon.start()
        machines_now = listed(daemon)
        assert sorted(machines_now) == sorted(kept)
        for name, ram in kept.items():
            config = daemon.status(name)["config"]
            assert config["ram"] == str(int(ram[:-1]) << 20), (name, config)
        assert sorted(p.stem for p in machines.glob("*.json")) == sorted(kept)
        assert "wrote a definition again from the log" in daemon.log.read_text()
    finally:
        daemon.clean_up()


def test_a_daemon_that_stopped_leaves_nothing_in_the_log_so_a_file_removed_by_hand_stays_gone(tmp_path) -> None:
    daemon = Daemon(tmp_path)
    daemon.start()
    try:
        create(daemon, "one")
        create(daemon, "two")
        daemon.stop_daemon()
        (daemon.state / "machines" / "one.json").unlink()  # by hand, while no daemon runs
        daemon.start()
        assert sorted(listed(daemon)) == ["two"]
    finally:
        daemon.clean_up()


def test_a_torn_record_ends_the_log_and_a_new_epoch_forgets_the_records_before_it(tmp_path) -> None:
    log = DefinitionLog.open(tmp_path)
    log.created("a", b'{"v": 1}\n')
    log.created("b", b'{"v": 2}\n')
    log.removed("a")
    end = log._end
    log.created("c", b'{"v": 3}\n' * 100)
    with open(tmp_path / FILE_NAME, "r+b") as f:  # c's record torn: its last bytes never written
        f.seek(log._end - 10)
        f.write(bytes(10))
    log.close()
    again = DefinitionLog.open(tmp_path)
    assert again.replay() == {"a": None, "b": b'{"v": 2}\n'}
    assert again._end == end  # the next record overwrites the torn one
    (tmp_path / "b.json").write_bytes(b'{"v": 2}\n')
    asyncio.run(again.checkpoint())
    again.close()
    assert DefinitionLog.open(tmp_path).replay() == {}  # b's record is of the last epoch


def test_a_log_whose_header_is_broken_is_made_anew(tmp_path) -> None:
    log = DefinitionLog.open(tmp_path)
    log.created("a", b"{}\n")
    log.close()
    with open(tmp_path / FILE_NAME, "r+b") as f:
        f.write(b"garbage!")
    assert DefinitionLog.open(tmp_path).replay() == {}
    assert (tmp_path / FILE_NAME).stat().st_size == definitionlog.SIZE


async def test_creates_go_on_durably_while_the_log_is_full_and_it_is_emptied_once_they_pause(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(definitionlog, "SIZE", 64 << 10)
    monkeypatch.setattr(definitionlog, "_RESERVED", 16 << 10)
    monkeypatch.setattr(definitionlog, "IDLE_CHECKPOINT", 0.2)
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    names = [f"m{i}" for i in range(100)]  # ≈ 1 KB each: more than the log holds
    for name in names:
        manager.create(config_from_json(name, {"linux": "/bin/sh"}))
    log_path = manager.definitions / FILE_NAME
    full = DefinitionLog.open(manager.definitions).replay()
    assert 0 < len(full) < len(names)  # the first ones logged, the rest written durably
    await asyncio.sleep(1)  # a pause: the files are made durable and the log emptied
    assert DefinitionLog.open(manager.definitions).replay() == {}
    assert log_path.stat().st_size == definitionlog.SIZE
    manager.create(config_from_json("after", {"linux": "/bin/sh"}))
    assert list(DefinitionLog.open(manager.definitions).replay()) == ["after"]  # logged again
    await manager.shutdown()
    assert sorted(p.stem for p in manager.definitions.glob("*.json")) == sorted([*names, "after"])


@pytest.mark.parametrize("where", ["log", "file"])
async def test_a_create_that_cannot_be_saved_leaves_nothing(tmp_path, monkeypatch, where) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    real = os.fdatasync if where == "log" else os.write

    def failing(fd: int, *args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync" if where == "log" else "write", failing)
    with pytest.raises(HostError, match="cannot save the definition of one: Input/output error"):
        manager.create(config_from_json("one", {"linux": "/bin/sh"}))
    monkeypatch.setattr(os, "fdatasync" if where == "log" else "write", real)
    assert "one" not in manager.machines
    assert not (manager.definitions / "one.json").exists()
    manager.create(config_from_json("one", {"linux": "/bin/sh"}))  # and the name is free again
    await manager.shutdown()
    assert DefinitionLog.open(manager.definitions).replay() == {}


async def test_a_removal_that_finds_the_log_full_empties_it_first(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(definitionlog, "SIZE", 16 << 10)
    monkeypatch.setattr(definitionlog, "_RESERVED", 0)
    monkeypatch.setattr(definitionlog, "IDLE_CHECKPOINT", 3600)
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    await manager.load()
    for i in range(30):
        manager.create(config_from_json(f"m{i}", {"linux": "/bin/sh"}))
    logged = DefinitionLog.open(manager.definitions).replay()
    assert "m0" in logged and len(logged) < 30
    assert manager._log is not None
    monkeypatch.setattr(definitionlog, "SIZE", manager._log._end)  # not even a removal's record fits now
    await manager.remove("m0")
    monkeypatch.setattr(definitionlog, "SIZE", 16 << 10)
    assert "m0" not in manager.machines and not (manager.definitions / "m0.json").exists()
    assert DefinitionLog.open(manager.definitions).replay() == {}  # emptied: nothing can bring m0 back
    await manager.shutdown()


async def test_a_state_dir_without_room_for_the_log_still_serves_and_makes_it_once_there_is(tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(state)], check=True)
    try:
        (tmp_path / "run").mkdir(mode=0o700)
        manager = Manager(state, tmp_path / "run")
        await manager.load()  # (the log's 4 MiB do not fit)
        assert not (manager.definitions / FILE_NAME).exists()  # nothing half-made takes the room
        manager.create(config_from_json("one", {"linux": "/bin/sh"}))  # durable the slower way
        await manager.remove("one")
        manager.create(config_from_json("two", {"linux": "/bin/sh"}))
        await manager.shutdown()
        subprocess.run(["mount", "-o", "remount,size=8m", str(state)], check=True)
        again = Manager(state, tmp_path / "run")
        await again.load()
        assert list(again.machines) == ["two"]
        assert (again.definitions / FILE_NAME).stat().st_size == definitionlog.SIZE
        await again.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
