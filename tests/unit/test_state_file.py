# SPDX-License-Identifier: LGPL-2.1-or-later
"""A machine's ``.state`` file (what the next daemon shows of it) is written at each change of state;
the ``starting`` one once the start first waits (after QEMU's exec), so what a start ends in is what
stays."""

from __future__ import annotations

import asyncio
import json

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.manager import Manager
from vmspawnd.settings import config_from_json


@pytest.fixture
def manager(tmp_path) -> Manager:
    (tmp_path / "run").mkdir(mode=0o700)
    return Manager(tmp_path / "state", tmp_path / "run")


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

