# SPDX-License-Identifier: LGPL-2.1-or-later
"""A thin QMP layer over qemu.qmp: connect, power down, quit, status, and why QEMU shut down."""

from __future__ import annotations

import asyncio
import contextlib
import logging

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Qmp:
    """One QMP session with a QEMU process, over its monitor's unix socket."""

    def __init__(self, name: str) -> None:
        from qemu.qmp import QMPClient  # imported once QEMU is already booting

        self._client = QMPClient(name)
        self._watcher: asyncio.Task[None] | None = None
        self.connected = False
        #: QEMU's SHUTDOWN reason (guest-shutdown, host-signal, host-qmp-quit…), once it shut down
        self.shutdown_reason: str | None = None

    async def connect(self, path: str, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities (QEMU listens before it starts the guest)."""
        await asyncio.wait_for(self._client.connect(path), timeout)
        self.connected = True
        self._watcher = asyncio.get_running_loop().create_task(self._watch_shutdown())

    async def _watch_shutdown(self) -> None:
        """Read QEMU's events (which also keeps their buffer from growing) and note a SHUTDOWN."""
        async for event in self._client.events:
            if event.get("event") == "SHUTDOWN":
                data = event.get("data") or {}
                self.shutdown_reason = str(data.get("reason") or "")

    async def powerdown(self, timeout: float = 5.0) -> None:
        """Press the ACPI power button; the guest decides whether to power off."""
        await asyncio.wait_for(self._client.execute("system_powerdown"), timeout)

    async def quit(self) -> None:
        """End QEMU now; a disconnect while it quits counts as success."""
        from qemu.qmp import QMPError

        with contextlib.suppress(QMPError, ConnectionError, EOFError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.wait_for(self._client.execute("quit"), 5)

    async def status(self) -> str:
        reply = await self._client.execute("query-status")
        return str(reply["status"]) if isinstance(reply, dict) else "unknown"

    async def __aenter__(self) -> Qmp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.connected:
            with contextlib.suppress(Exception):
                await self._client.disconnect()
            self.connected = False
