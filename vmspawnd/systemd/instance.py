# SPDX-License-Identifier: LGPL-2.1-or-later
"""Each running VM's control socket: ``io.systemd.MachineInstance`` at ``<records dir>/control``.

systemd-machined ≥ 261 stores the ``controlAddress`` a VM was registered with, and ``machinectl
poweroff|reboot|terminate|pause|resume NAME`` then call this socket instead of signalling QEMU:

=============  ===========================================  =========================================
method         what happens                                 how the run ends
=============  ===========================================  =========================================
PowerOff       the ACPI power button (QMP system_powerdown)  stopped, the guest's exit status (0)
Reboot         the reset button (QMP system_reset)          keeps running; not ready until READY=1
Terminate      QEMU quits at once (as ``vmspawnctl kill``)  failed, exit status 1 ("terminated")
Pause/Resume   the vCPUs stop/continue (QMP stop/cont)      keeps running
Describe       running: vCPUs executing; status: QEMU's run state (running, paused…)
=============  ===========================================  =========================================

SubscribeEvents streams QEMU's own events (``{"event": "RESET", "data": {…}}``), after a first
``READY`` event that says the subscription is in place.  Storage hot-plug (AddStorage…) is not
offered: those calls answer ``NotSupported``.  ``io.systemd.VirtualMachineInstance`` is served as
the empty interface it is in systemd 262.  The socket lives in the run's records directory
(``<base>/<name>.run``, see runtime.py; the daemon's, mode 0700): only its user (root, for vmspawnd) reaches it, and
not the VM's user, who could otherwise put another VM's socket in its place for machined to drive.
(No ``from __future__ import annotations`` here: asyncvarlink reads the methods' real annotations.)
"""


import asyncio
import collections.abc
import socket
import typing

from asyncvarlink import (
    TypedVarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    varlinkmethod,
)
from asyncvarlink.serviceinterface import VarlinkServiceInterface

from vmspawnd import __version__, docs_url
from vmspawnd.errors import WrongState
from vmspawnd.log import get_logger
from vmspawnd.server import GuardedServer, ServerLimits, current_connection, serve

log = get_logger()

INTERFACE = "io.systemd.MachineInstance"
MAX_CONNECTIONS = 64
MAX_QUEUED_EVENTS = 256  # a subscriber further behind than this is dropped


class MachineControl(typing.Protocol):
    """What the control socket drives: one run of one VM (see :class:`vmspawnd.run.Run`)."""

    async def terminate(self) -> None: ...
    async def power_off(self) -> None: ...
    async def reboot(self) -> None: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def describe(self) -> tuple[bool, str]: ...
    def add_event_listener(self, listener: collections.abc.Callable[[str, dict[str, typing.Any]], None]
                           ) -> collections.abc.Callable[[], None]: ...


class NotConnected(Exception):
    """QEMU's monitor is not (or no longer) reachable."""


class NotConnectedError(TypedVarlinkErrorReply, name=f"{INTERFACE}.NotConnected"):
    class Parameters:
        pass


class NotSupportedError(TypedVarlinkErrorReply, name=f"{INTERFACE}.NotSupported"):
    class Parameters:
        pass


class Status(typing.TypedDict):
    running: bool
    status: str


class _EventName(typing.TypedDict):
    event: str


class Event(_EventName, total=False):
    data: typing.Any


class MachineInstanceInterface(VarlinkInterface, name=INTERFACE):
    """Power, reset and pause one VM; its state and QEMU's events."""

    errors = (NotConnectedError, NotSupportedError)

    def __init__(self, control: MachineControl) -> None:
        self._control = control

    @varlinkmethod
    async def Terminate(self) -> None:
        """Forcefully terminate the machine immediately."""
        await self._control.terminate()

    @varlinkmethod
    async def PowerOff(self) -> None:
        """Request a clean shutdown of the machine (the ACPI power button)."""
        await self._control.power_off()

    @varlinkmethod
    async def Reboot(self) -> None:
        """Reboot the machine (a hardware reset)."""
        await self._control.reboot()

    @varlinkmethod
    async def Pause(self) -> None:
        """Pause/freeze the machine."""
        await self._control.pause()

    @varlinkmethod
    async def Resume(self) -> None:
        """Resume a paused machine."""
        await self._control.resume()

    @varlinkmethod
    async def Describe(self) -> Status:
        """Whether the vCPUs are executing, and QEMU's run state ("running", "paused", "shutdown"…)."""
        running, status = await self._control.describe()
        return Status(running=running, status=status)

    @varlinkmethod(delay_generator=False, allow_foreign=True)
    async def SubscribeEvents(self, *, filter: list[str] | None = None) -> collections.abc.AsyncIterator[Event]:
        """QEMU's events as they occur (call with ``more``), after a first ``READY`` event; ``filter``
        names the events wanted (null or empty: all)."""
        wanted = set(filter or ())
        queue: asyncio.Queue[Event | None] = asyncio.Queue()

        def listener(name: str, data: dict[str, typing.Any]) -> None:
            if wanted and name not in wanted:
                return
            if queue.qsize() >= MAX_QUEUED_EVENTS:
                queue.put_nowait(None)
                return
            queue.put_nowait(Event(event=name, data=data) if data else Event(event=name))

        remove = self._control.add_event_listener(listener)
        connection = current_connection.get(None)
        hangup = asyncio.ensure_future(connection.wait_hangup() if connection else asyncio.Event().wait())
        try:
            yield Event(event="READY")
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, hangup), return_when=asyncio.FIRST_COMPLETED)
                if not get.done() or get.result() is None:  # hung up, or fell too far behind
                    get.cancel()
                    raise NotConnectedError()
                event = get.result()
                assert event is not None
                yield event
        finally:
            hangup.cancel()
            remove()

    @varlinkmethod
    def AddStorage(self, *, fileDescriptorIndex: int, name: str, config: str | None = None) -> None:
        """Not supported: storage is attached when the VM is defined."""
        raise NotSupportedError()

    @varlinkmethod
    def RemoveStorage(self, *, name: str) -> None:
        """Not supported."""
        raise NotSupportedError()

    @varlinkmethod
    def ReplaceStorage(self, *, fileDescriptorIndex: int, name: str) -> None:
        """Not supported."""
        raise NotSupportedError()


class VirtualMachineInstanceInterface(VarlinkInterface, name="io.systemd.VirtualMachineInstance"):
    """VM-specific control; empty, as in systemd 262 (the MachineInstance calls cover VMs)."""


def _call_error(exc: BaseException) -> TypedVarlinkErrorReply | None:
    if isinstance(exc, (NotConnected, WrongState, ConnectionError, EOFError, TimeoutError)):
        return NotConnectedError()
    return None


class ControlServer:
    """What serves a VM's control socket, listening already (systemd/control.py binds it, and closes it):
    :meth:`start`, then :meth:`close`."""

    def __init__(self, sock: socket.socket, control: MachineControl) -> None:
        self._sock = sock
        self._control = control
        self._server: GuardedServer | None = None

    async def start(self) -> None:
        registry = VarlinkInterfaceRegistry()
        registry.register_interface(VarlinkServiceInterface("vmspawnd", "vmspawnd machine control", __version__,
                                                            docs_url(), registry))
        registry.register_interface(MachineInstanceInterface(self._control))
        registry.register_interface(VirtualMachineInstanceInterface())
        self._server = await serve(self._sock, registry, ServerLimits(max_connections=MAX_CONNECTIONS), _call_error)

    def close(self) -> None:
        """Stop serving, and end the callers' connections."""
        if self._server is not None:
            self._server.close()
            self._server.close_clients()
            self._server = None
