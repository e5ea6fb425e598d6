# SPDX-License-Identifier: LGPL-2.1-or-later
"""A machine's ``.state`` file (what the next daemon shows of it) is written at each change of state;
the ``starting`` one once QEMU is exec'd (not on the way to the exec), so what a start that fails
before ends in is what stays."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.manager import Manager
from vmspawnd.settings import config_from_json


@pytest.fixture
async def manager(tmp_path) -> AsyncIterator[Manager]:
    (tmp_path / "run").mkdir(mode=0o700)
    m = Manager(tmp_path / "state", tmp_path / "run")
    yield m
    await m.shutdown()  # (its worker thread ends with it: other tests count theirs)


def failing_machine(manager: Manager, tmp_path, name: str) -> None:
    """A machine whose start fails as it looks at the host, before it waits for anything."""
    kernel = tmp_path / f"{name}-vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    manager.create(config_from_json(name, {"linux": str(kernel)}))
    kernel.unlink()


async def test_a_failed_start_leaves_its_outcome(manager: Manager, tmp_path) -> None:
    failing_machine(manager, tmp_path, "one")
    with pytest.raises(ConfigError, match="vmlinuz"):
        await manager.start("one")
    await asyncio.sleep(0)  # the loop's next turn: a state written later than the start's is written now
    saved = json.loads((manager.definitions / "one.state").read_text())
    assert saved["state"] == "failed", saved  # and what failed: the field and the value, with the reason
    assert saved["failure"] == f"invalid linux={tmp_path / 'one-vmlinuz'}: no such file or directory", saved



async def test_the_state_of_a_definition_deleted_by_hand_does_not_come_back_with_the_name(tmp_path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    first = Manager(tmp_path / "state", tmp_path / "run")
    await first.load()
    failing_machine(first, tmp_path, "one")
    with pytest.raises(ConfigError):
        await first.start("one")
    await asyncio.sleep(0)
    assert (first.definitions / "one.state").exists()
    await first.shutdown()  # (a daemon that stopped: its definitions' log is empty, see test_definition_log.py)
    (first.definitions / "one.json").unlink()  # by hand, while no daemon runs
    second = Manager(tmp_path / "state", tmp_path / "run")
    await second.load()
    assert "one" not in second.machines and not (second.definitions / "one.state").exists()
    kernel = tmp_path / "new-vmlinuz"
    kernel.write_bytes(b"")
    second.create(config_from_json("one", {"linux": str(kernel)}))  # a new machine of the name
    third = Manager(tmp_path / "state", tmp_path / "run")
    await third.load()
    machine = third.machines["one"].machine
    assert (machine.state.value, machine.failure) == ("stopped", None)  # not the old one's failure
    for m in (first, second, third):
        await m.shutdown()
