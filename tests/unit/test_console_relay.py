# SPDX-License-Identifier: LGPL-2.1-or-later
"""The console relay between a viewer's PTY and QEMU's console socket, with a plain unix socket in
QEMU's place (a QEMU whose guest does not read its console: stopped, or busy)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from vmspawnd.console import ConsoleRelay

SENT = 64 * 1024 * 1024


@pytest.mark.asyncio
async def test_a_viewer_typing_into_a_console_qemu_does_not_read_is_held_back_not_buffered(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "console.sock"))
    listener.listen()
    relay = ConsoleRelay(tmp_path / "console.sock", read_only=False)
    await relay.connect()
    qemu, _ = listener.accept()
    master = await relay.open_client()
    chunk = b"x" * 65536
    accepted = 0

    def type_for(seconds: float) -> None:  # a viewer typing as fast as the relay takes it
        nonlocal accepted
        os.set_blocking(master, False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and accepted < SENT:
            try:
                accepted += os.write(master, chunk)
            except BlockingIOError:
                time.sleep(0.001)

    await asyncio.to_thread(type_for, 3)
    assert accepted < 8 * 1024 * 1024, f"the relay took {accepted} bytes that QEMU never read"
    # once QEMU reads, what was typed arrives whole
    qemu.setblocking(False)
    received = 0
    loop = asyncio.get_running_loop()
    while received < accepted:
        received += len(await asyncio.wait_for(loop.sock_recv(qemu, 1 << 20), 10))
    assert received == accepted
    os.close(master)
    await relay.close()
    qemu.close()
    listener.close()
