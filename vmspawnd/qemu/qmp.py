# SPDX-License-Identifier: LGPL-2.1-or-later
"""A thin QMP layer over qemu.qmp: connect, power down, reset, pause, quit, status, QEMU's events
(to any number of listeners) and why QEMU shut down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmspawnd.identity import ROOT, Identity, connect_as

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

#: ``listener(name, data)`` for each QEMU event (SHUTDOWN, RESET, STOP, RESUME, POWERDOWN…).
EventListener = Callable[[str, dict[str, Any]], None]


def _qmp_client() -> type[QMPClient]:
    """qemu.qmp's ``QMPClient``, imported without TLS.

    qemu.qmp imports :mod:`ssl` only to name ``SSLContext`` in its signatures (for TLS connections,
    which we never make: QEMU's monitor is a unix socket).  The real module loads libssl and
    libcrypto: ≈ 4 MB resident in every daemon and ``vmspawn`` from their first VM on, and a few ms
    of a run's start.  So while qemu.qmp is first imported, ``ssl`` is a module holding only that
    name; afterwards ``import ssl`` gives the real one again, to anyone who asks.
    """
    if "qemu.qmp" not in sys.modules and "ssl" not in sys.modules:
        names_only = types.ModuleType("ssl", "stand-in while qemu.qmp is imported (vmspawnd/qemu/qmp.py)")
        names_only.SSLContext = type("SSLContext", (), {})  # type: ignore[attr-defined]
        sys.modules["ssl"] = names_only
        try:
            import qemu.qmp  # noqa: F401
        finally:
            del sys.modules["ssl"]
    from qemu.qmp import QMPClient

    return QMPClient


class MonitorGone(ConnectionError):
    """QEMU's monitor hung up before it answered (QEMU exits, or we let go of it)."""


class MonitorSilent(TimeoutError):
    """QEMU's monitor did not answer in time (QEMU stopped or hung); it may still carry the command out."""


class Qmp:
    """One QMP session with a QEMU process, over its monitor's unix socket."""

    def __init__(self, name: str) -> None:
        self._client = _qmp_client()(name)  # imported once QEMU is already booting (start-up speed)
        self._watcher: asyncio.Task[None] | None = None
        self.connected = False
        #: QEMU's SHUTDOWN reason (guest-shutdown, host-signal, host-qmp-quit…), once it shut down
        self.shutdown_reason: str | None = None
        self._listeners: list[EventListener] = []

    async def connect(self, path: str, timeout: float = 10.0, identity: Identity = ROOT) -> None:
        """Connect and negotiate capabilities (QEMU listens before it starts the guest)."""
        sock = connect_as(identity, path)  # as the VM's user: the path is in its runtime directory
        try:
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except BaseException:
            sock.close()
            raise
        self.connected = True
        self._watcher = asyncio.get_running_loop().create_task(self._watch_events())

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener`` for every event from now on; returns what removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def _watch_events(self) -> None:
        """Read QEMU's events (which also keeps their buffer from growing), note a SHUTDOWN, tell listeners."""
        async for event in self._client.events:
            raw = event.get("data")
            name, data = str(event.get("event")), dict(raw) if isinstance(raw, dict) else {}
            if name == "SHUTDOWN":
                self.shutdown_reason = str(data.get("reason") or "")
            for listener in list(self._listeners):
                listener(name, data)

    async def _execute(self, command: str, timeout: float, arguments: dict[str, object] | None = None) -> object:
        """QEMU's answer to ``command``; :class:`MonitorGone` if the connection goes away first, and
        :class:`MonitorSilent` if no answer comes within ``timeout`` seconds."""
        from qemu.qmp import ExecInterruptedError, StateError  # (loaded by __init__: only named here)

        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except (ExecInterruptedError, StateError, EOFError, asyncio.IncompleteReadError) as e:
            raise MonitorGone(f"QEMU's monitor hung up ({e})") from e
        except TimeoutError as e:
            raise MonitorSilent(f"QEMU's monitor did not answer {command} within {timeout:g} s") from e

    async def powerdown(self, timeout: float = 5.0) -> None:
        """Press the ACPI power button; the guest decides whether to power off."""
        await self._execute("system_powerdown", timeout)

    async def quit(self, timeout: float = 2.0) -> bool:
        """End QEMU now: whether it took the command (a disconnect while it quits counts as taken).  A
        QEMU that does not answer within ``timeout`` (stopped, hung) is not waited for any longer."""
        from qemu.qmp import QMPError  # (loaded by __init__: only named here)

        try:
            await self._execute("quit", timeout)
        except ConnectionError:
            return True  # (the connection is going away: QEMU quits, or we let go of it)
        except (QMPError, TimeoutError):
            return False
        return True

    async def reset(self, timeout: float = 5.0) -> None:
        """Reset the machine at once, as the reset button does (the guest boots again)."""
        await self._execute("system_reset", timeout)

    async def forget_suspend(self, timeout: float = 5.0) -> None:
        """Make the next reset boot a guest that suspended itself to RAM anew rather than resume it.  QEMU
        marks the suspend in the RTC's CMOS (shutdown status, register 0x0F, = 0xFE), and the firmware
        takes any reset for the wake-up until it has run and cleared that mark: a reset sent right after
        ``system_wakeup``, before the vCPUs ran the firmware, only resumed the guest.  For a guest in S3
        (its vCPUs do not run, so nothing of its own races the write), which only x86 machines have
        (the CMOS at I/O ports 0x70 and 0x71)."""
        for port, value in ((0x70, 0x0F), (0x71, 0x00)):  # (the register's index, then its value)
            await self._execute("human-monitor-command", timeout, {"command-line": f"o /b {port:#x} {value:#x}"})

    async def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPUs (``stop``)."""
        await self._execute("stop", timeout)

    async def resume(self, timeout: float = 5.0) -> None:
        """Let the vCPUs run again (``cont``)."""
        await self._execute("cont", timeout)

    async def wakeup(self, timeout: float = 5.0) -> None:
        """Wake a guest that suspended itself to RAM (``system_wakeup``), and return once QEMU has (its
        run state is no longer ``suspended``: a reset before that would only wake it, as its firmware
        takes a reset in S3 for the wake-up).  One that is not suspended (any more: it woke up, or was
        reset, before its event reached us) is left as it is: QEMU refuses."""
        from qemu.qmp import ExecuteError  # (loaded by __init__: only named here)

        async with asyncio.timeout(timeout):
            try:
                await self._execute("system_wakeup", timeout)
            except ExecuteError:
                if (await self.query_status(timeout))[1] == "suspended":
                    raise
            while (await self.query_status(timeout))[1] == "suspended":
                await asyncio.sleep(0.01)

    async def query_status(self, timeout: float = 5.0) -> tuple[bool, str]:
        """(vCPUs running, QEMU's run state: running, paused, shutdown…)."""
        reply = await self._execute("query-status", timeout)
        if not isinstance(reply, dict):
            return False, "unknown"
        return bool(reply.get("running")), str(reply.get("status") or "unknown")

    async def failed_disks(self, timeout: float = 5.0) -> list[tuple[str, str]]:
        """The drives whose last request failed (``query-block``'s io-status): (QEMU's name for the
        drive, ``failed`` or ``nospace``)."""
        reply = await self._execute("query-block", timeout)
        failed: list[tuple[str, str]] = []
        for block in reply if isinstance(reply, list) else ():
            status = str(block.get("io-status") or "ok")
            if status != "ok":
                name = block.get("device") or (block.get("inserted") or {}).get("node-name") or ""
                failed.append((str(name), status))
        return failed

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
