# SPDX-License-Identifier: LGPL-2.1-or-later
"""The systemd manager over D-Bus (dbus-fast): transient units, jobs, properties.

One connection serves a VM's scope and its auxiliary units; in the daemon, one (SharedSystemd)
serves all its VMs, and each run releases the units it referenced.  Calls raise DBusCallError with
the D-Bus error name; start/stop wait for the job's JobRemoved signal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from vmspawnd.log import get_logger
from vmspawnd.systemd.bus import load_dbus_fast, open_bus

# dbus-fast is imported on first use: on a host without systemd, vmspawn never pays for it.

log = get_logger()

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
SCOPE_IFACE = "org.freedesktop.systemd1.Scope"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")


def Variant(signature: str, value: Any) -> Any:  # noqa: N802 - stands in for dbus_fast.Variant
    """A D-Bus variant (dbus_fast.Variant, imported on first use)."""
    from dbus_fast import Variant as DBusVariant

    return DBusVariant(signature, value)


class DBusCallError(Exception):
    """A D-Bus method call returned an error."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        super().__init__(f"{name}: {text}" if text else name)


class UnitStartError(Exception):
    """A transient unit's start job did not succeed."""


class SystemdManager:
    """A connection to systemd's manager, with JobRemoved tracking."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self._jobs: collections.OrderedDict[str, str] = collections.OrderedDict()  # job path → result
        self._job_waiters: dict[str, asyncio.Future[str]] = {}
        self._unit_waiters: dict[str, set[asyncio.Future[None]]] = {}  # unit path → next change
        bus.add_message_handler(self._on_message)

    @classmethod
    async def connect(cls, bus_type: str = "system", address: str | None = None) -> SystemdManager:
        """Connect to the manager's bus (``system`` or ``session``, or the one at ``address``) and
        subscribe to JobRemoved."""
        bus = await open_bus(None, bus_type, address, unix_fds=True)  # (a socket-activated helper's socket)
        manager = cls(bus)
        try:
            rule = (f"type='signal',sender='{SYSTEMD_BUS_NAME}',path='{SYSTEMD_PATH}',"
                    f"interface='{MANAGER_IFACE}',member='JobRemoved'")
            await manager._match("AddMatch", rule)
            with contextlib.suppress(DBusCallError):  # AlreadySubscribed, or systemd sends them anyway
                await manager.call(MANAGER_IFACE, "Subscribe", "", [])
        except BaseException:
            bus.disconnect()
            raise
        return manager

    async def version(self) -> str:
        return str(await self.get_property(SYSTEMD_PATH, MANAGER_IFACE, "Version"))

    def _on_message(self, msg: Any) -> bool:
        from dbus_fast import MessageType

        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == "PropertiesChanged" and msg.interface == PROPERTIES_IFACE:
            for changed in self._unit_waiters.pop(msg.path, ()):
                if not changed.done():
                    changed.set_result(None)
        elif msg.member == "JobRemoved" and msg.interface == MANAGER_IFACE and len(msg.body) == 4:
            _id, job, _unit, result = msg.body
            waiter = self._job_waiters.pop(job, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result)
            else:  # it may arrive before the reply that names the job: keep it a while
                self._jobs[job] = result
                while len(self._jobs) > 256:
                    self._jobs.popitem(last=False)
        return False

    async def _call(self, destination: str, path: str, interface: str, member: str, signature: str,
                    body: list[Any], fds: list[int] | None = None) -> list[Any]:
        """One method call; ``fds``: the file descriptors its ``h`` values index (they stay ours)."""
        from dbus_fast import Message, MessageType

        reply = await self.bus.call(Message(destination=destination, path=path, interface=interface,
                                            member=member, signature=signature, body=body, unix_fds=fds or []))
        if reply is None:
            raise DBusCallError("org.freedesktop.DBus.Error.NoReply", member)
        if reply.message_type == MessageType.ERROR:
            raise DBusCallError(reply.error_name or "error", str(reply.body[0]) if reply.body else "")
        return list(reply.body)

    async def _match(self, member: str, rule: str) -> None:
        """The bus's AddMatch or RemoveMatch of ``rule`` (which signals it sends this connection)."""
        await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", member, "s", [rule])

    async def call(self, interface: str, member: str, signature: str, body: list[Any],
                   path: str = SYSTEMD_PATH, fds: list[int] | None = None) -> list[Any]:
        return await self._call(SYSTEMD_BUS_NAME, path, interface, member, signature, body, fds)

    async def get_property(self, path: str, interface: str, name: str) -> Any:
        from dbus_fast import Variant as DBusVariant

        (value,) = await self.call(PROPERTIES_IFACE, "Get", "ss", [interface, name], path=path)
        return value.value if isinstance(value, DBusVariant) else value

    async def job_result(self, job: str, timeout: float) -> str:
        """Wait for the JobRemoved signal of ``job``; its result ("done", "failed", …)."""
        if job in self._jobs:
            return self._jobs.pop(job)
        waiter = self._job_waiters.setdefault(job, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._job_waiters.pop(job, None)

    def _unit_rule(self, path: str) -> str:
        return (f"type='signal',sender='{SYSTEMD_BUS_NAME}',path='{path}',interface='{PROPERTIES_IFACE}',"
                "member='PropertiesChanged'")

    async def watch_unit(self, path: str) -> None:
        """Have the bus send us the PropertiesChanged signals of the unit at ``path`` (systemd sends
        them to subscribers), for :meth:`unit_changed`; :meth:`unwatch_unit` when done."""
        await self._match("AddMatch", self._unit_rule(path))

    async def unwatch_unit(self, path: str) -> None:
        """Undo :meth:`watch_unit`; a bus that is gone or does not answer within a second is fine."""
        with contextlib.suppress(DBusCallError, EOFError, ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(self._match("RemoveMatch", self._unit_rule(path)), 1.0)

    def unit_changed(self, path: str) -> asyncio.Future[None]:
        """A future done at the next change of a property of the (watched) unit at ``path``."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._unit_waiters.setdefault(path, set())
        waiters.add(waiter)
        waiter.add_done_callback(waiters.discard)  # (a cancelled one is forgotten)
        return waiter

    async def start_transient_unit(self, unit: str, properties: list[tuple[str, Any]],
                                   timeout: float = 10.0, fds: list[int] | None = None) -> str:
        """StartTransientUnit(unit, "fail", …) and wait for its job; return the unit's object path.
        ``fds``: the file descriptors the properties' ``h`` values index."""
        try:
            (job,) = await self.call(MANAGER_IFACE, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                                     [unit, "fail", properties, []], fds=fds)
            result = await self.job_result(job, timeout)
        except DBusCallError as e:
            raise UnitStartError(f"cannot start {unit}: {e}") from e
        except TimeoutError:
            raise UnitStartError(f"systemd did not start {unit} within {timeout:g} s") from None
        if result != "done":
            raise UnitStartError(f"starting {unit} failed (job result: {result}); see journalctl -u {unit}")
        (path,) = await self.call(MANAGER_IFACE, "GetUnit", "s", [unit])
        return str(path)

    async def unref_unit(self, unit: str) -> None:
        """Drop this connection's reference to ``unit`` (``AddRef`` of a transient unit): a unit that
        ended can then be collected.  A unit not referenced (or a connection gone) is fine."""
        with contextlib.suppress(DBusCallError, EOFError, ConnectionError, OSError):
            await self.call(MANAGER_IFACE, "UnrefUnit", "s", [unit])

    async def stop_unit(self, unit: str, timeout: float) -> None:
        (job,) = await self.call(MANAGER_IFACE, "StopUnit", "ss", [unit, "replace"])
        await self.job_result(job, timeout)

    async def kill_unit(self, unit: str, whom: str = "all", sig: int = signal.SIGKILL) -> None:
        await self.call(MANAGER_IFACE, "KillUnit", "ssi", [unit, whom, int(sig)])

    async def aclose(self) -> None:
        self.bus.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.bus.wait_for_disconnect(), 1.0)


class SharedSystemd:
    """One connection to the service manager for all of a daemon's runs, made when a start first
    needs it and again once it dropped.  (A connection per run cost each start a connect, ≈ 1.5 ms,
    and held one bus connection per running VM: dbus-daemon allows 256 per user by default.)
    Starts that ask while an attempt is under way share its outcome, so a manager that does not
    answer costs them one timeout together, not one each.  Runs do not close it; :meth:`close`
    does, when the daemon exits."""

    def __init__(self, systemd_dir: Path = SYSTEMD_RUNTIME_DIR, timeout: float | None = None) -> None:
        self._systemd_dir = systemd_dir
        self._timeout = CONNECT_TIMEOUT if timeout is None else timeout
        self._manager: SystemdManager | None = None
        self._why = ""
        self._attempt: asyncio.Task[None] | None = None

    def runs_here(self) -> bool:
        """Whether systemd is the service manager here (it may still not answer)."""
        return self._systemd_dir.is_dir()

    async def get(self) -> tuple[SystemdManager | None, str]:
        """The connection, or None and why there is none (no systemd here, or it did not answer)."""
        if self._manager is None or not self._manager.bus.connected:
            if self._attempt is None and not self.runs_here():  # (answered at once: no task, no event-loop turn)
                return None, f"systemd is not the service manager here (no {self._systemd_dir})"
            if self._attempt is None:
                self._attempt = asyncio.get_running_loop().create_task(self._connect())
            await asyncio.shield(self._attempt)
        return self._manager, self._why

    async def _connect(self) -> None:
        try:
            self._manager, self._why = await connect_systemd(self._timeout, systemd_dir=self._systemd_dir)
        finally:
            self._attempt = None  # (the next start after a failed attempt tries again)

    def close(self) -> None:
        if self._attempt is not None:
            self._attempt.cancel()
        if self._manager is not None:
            self._manager.bus.disconnect()
            self._manager = None


#: How long a manager that demonstrably runs (``/run/systemd/system`` exists) may take to answer
#: before we give up on scopes and units: generous, as a busy host must not silently lose them.
CONNECT_TIMEOUT = 10.0


async def connect_systemd(timeout: float = CONNECT_TIMEOUT, systemd_dir: Path = SYSTEMD_RUNTIME_DIR,
                          address: str | None = None) -> tuple[SystemdManager | None, str]:
    """The system (root) or user manager if systemd runs and it answers in time; else (None, why not)."""
    if address is None and not systemd_dir.is_dir():
        return None, f"systemd is not the service manager here (no {systemd_dir})"
    load_dbus_fast()  # (before the clock starts)
    bus_type = "system" if os.geteuid() == 0 else "session"
    manager: SystemdManager | None = None
    try:
        manager = await asyncio.wait_for(SystemdManager.connect(bus_type, address), timeout)
        version = await asyncio.wait_for(manager.version(), timeout)
    except Exception as e:
        if manager is not None:
            await manager.aclose()
        return None, f"the systemd manager did not answer on the {bus_type} bus: {e!r}"
    return manager, f"systemd {version} on the {bus_type} bus"
