# SPDX-License-Identifier: LGPL-2.1-or-later
"""The varlink interface ``io.vmspawnd.Manager`` as both ends see it: its types, errors and methods.

The daemon serves :class:`ManagerInterface` with what each call does (api.py); a client such as
vmspawnctl gives the same class to asyncvarlink's proxy, which reads only the declarations, so it
imports none of the daemon.  ``varlink/io.vmspawnd.Manager.varlink`` must equal
:func:`interface_description`; a test enforces that.
"""

import collections.abc
import dataclasses
import enum
import typing
from dataclasses import dataclass

from asyncvarlink import FileDescriptor, TypedVarlinkErrorReply, VarlinkInterface, varlinkmethod

from vmspawnd.settings import varlink_config_fields

INTERFACE = "io.vmspawnd.Manager"
#: where the daemon serves it when it is not socket-activated, and where clients look by default
DEFAULT_SOCKET = f"/run/vmspawnd/{INTERFACE}"


class MachineState(enum.Enum):
    stopped = "stopped"
    starting = "starting"
    running = "running"
    stopping = "stopping"
    failed = "failed"


if typing.TYPE_CHECKING:
    class Config:
        """What the type checker knows of Config: keyword fields, made at import from the table."""

        __dataclass_fields__: typing.ClassVar[dict[str, typing.Any]]

        def __init__(self, **fields: typing.Any) -> None: ...
        def __getattr__(self, name: str) -> typing.Any: ...
else:
    #: A machine's configuration, one optional field per setting of the settings table (settings.py);
    #: unset fields take vmspawn's defaults (except console: headless).
    Config = dataclasses.make_dataclass(
        "Config", [(name, kind, dataclasses.field(default=None)) for name, kind in varlink_config_fields()],
        namespace={"__doc__": "A machine's configuration; every field optional, with vmspawn's defaults "
                              "(except console: headless unless given). vmspawnctl create fills it from vmspawn's "
                              "options."}, slots=True)


@dataclass(slots=True)
class MachineInfo:
    name: str
    state: MachineState
    ready: bool
    since: int
    pid: int | None
    runtimeDirectory: str | None
    tpmStatePath: str | None
    units: list[str]
    status: str | None
    exitStatus: int | None
    failure: str | None
    config: Config
    definitionError: str | None = None
    owner: int = 0  # the uid that created it (root for definitions made before owners were recorded)
    runAs: int = 0  # the uid its QEMU and helpers run as
    vsockBackend: str | None = None  # while it runs with vsock: vhost-vsock (the kernel's) or vhost-device-vsock
    sshAddress: str | None = None  # vsock/CID or vsock-mux/SOCKET (``vmspawnctl ssh``, systemd-ssh-proxy)
    sshKey: str | None = None  # --pass-ssh-key's private key
    #: what went wrong in its last run without failing it (a helper logged errors, a stop forced it off)
    warnings: list[str] | None = None
    #: it runs, with its vCPUs stopped (Pause, machinectl pause, or QEMU's own stop on a disk error)
    paused: bool | None = None
    #: it runs, and its guest suspended itself to RAM (ACPI S3): Resume wakes it
    suspended: bool | None = None
    #: its reply, encoded once per change of the machine (by the daemon, api.py; not part of the interface:
    #: init=False)
    varlink_json: typing.Any = dataclasses.field(default=None, init=False, repr=False, compare=False)


@dataclass
class MachineEvent:
    machine: str
    event: str
    timestamp: int
    pid: int | None = None
    status: str | None = None
    exitStatus: int | None = None
    reason: str | None = None


@dataclass
class Firmware:
    path: str
    description: str | None
    interfaceTypes: list[str]
    features: list[str]
    valid: bool


class NoSuchMachineError(TypedVarlinkErrorReply, name=f"{INTERFACE}.NoSuchMachine"):
    class Parameters:
        name: str


class MachineExistsError(TypedVarlinkErrorReply, name=f"{INTERFACE}.MachineExists"):
    class Parameters:
        name: str


class InvalidConfigError(TypedVarlinkErrorReply, name=f"{INTERFACE}.InvalidConfig"):
    class Parameters:
        field: str
        reason: str


class WrongStateError(TypedVarlinkErrorReply, name=f"{INTERFACE}.WrongState"):
    class Parameters:
        name: str
        state: str
        reason: str


class StartFailedError(TypedVarlinkErrorReply, name=f"{INTERFACE}.StartFailed"):
    class Parameters:
        name: str
        reason: str


class HostFailedError(TypedVarlinkErrorReply, name=f"{INTERFACE}.HostFailed"):
    class Parameters:
        reason: str


class PermissionDeniedError(TypedVarlinkErrorReply, name=f"{INTERFACE}.PermissionDenied"):
    class Parameters:
        action: str
        reason: str


class LimitReachedError(TypedVarlinkErrorReply, name=f"{INTERFACE}.LimitReached"):
    class Parameters:
        limit: str
        reason: str


class Calls(typing.Protocol):
    """What serving :class:`ManagerInterface` takes: one function per method, with the interface's
    types (the daemon's is api.ManagerCalls; a client needs none), but for Create's config, which a server
    may pass as the JSON object it came as, for the call to check."""

    async def create(self, name: str, config: Config | dict[str, typing.Any]) -> MachineInfo: ...
    async def start(self, name: str) -> MachineInfo: ...
    async def stop(self, name: str, timeout: float | None) -> MachineInfo: ...
    async def kill(self, name: str, signal: int | None) -> MachineInfo: ...
    async def reboot(self, name: str) -> MachineInfo: ...
    async def pause(self, name: str) -> MachineInfo: ...
    async def resume(self, name: str) -> MachineInfo: ...
    async def remove(self, name: str) -> None: ...
    def describe(self, name: str) -> MachineInfo: ...
    def list_machines(self) -> collections.abc.Iterator[MachineInfo | None]: ...
    def subscribe(self, name: str | None) -> collections.abc.AsyncGenerator[MachineEvent, None]: ...
    def list_firmware(self) -> list[Firmware]: ...
    async def open_console(self, name: str) -> FileDescriptor: ...


class ManagerInterface(VarlinkInterface, name=INTERFACE):
    """Create, run and watch virtual machines."""

    errors = (NoSuchMachineError, MachineExistsError, InvalidConfigError, WrongStateError, StartFailedError,
              HostFailedError, PermissionDeniedError, LimitReachedError)

    def __init__(self, calls: Calls) -> None:
        #: what each call does (a client's proxy reads only this class's declarations, and needs none)
        self._calls = calls

    @varlinkmethod(return_parameter="machine")
    async def Create(self, *, name: str, config: Config) -> MachineInfo:
        """Define a new machine (it is not started).  It belongs to the caller and runs as the caller,
        unless it needs privileges (then it runs as root, which polkit must allow)."""
        return await self._calls.create(name, config)

    @varlinkmethod(return_parameter="machine")
    async def Start(self, *, name: str) -> MachineInfo:
        """Start a stopped machine; returns once QEMU runs (not when the guest is ready)."""
        return await self._calls.start(name)

    @varlinkmethod(return_parameter="machine")
    async def Stop(self, *, name: str, timeout: float | None = None) -> MachineInfo:
        """Power the guest off via ACPI; force it after ``timeout`` seconds (default 10)."""
        return await self._calls.stop(name, timeout)

    @varlinkmethod(return_parameter="machine")
    async def Kill(self, *, name: str, signal: int | None = None) -> MachineInfo:
        """End QEMU now (QMP quit, then SIGKILL), or send it ``signal``.  Without ``signal``, a start
        still setting up is undone at once (its Start fails, saying so)."""
        return await self._calls.kill(name, signal)

    @varlinkmethod(return_parameter="machine")
    async def Reboot(self, *, name: str) -> MachineInfo:
        """Reset a running machine, as its reset button does: the guest boots again in the same QEMU, and
        is not ready until it says so again.  A paused machine runs again."""
        return await self._calls.reboot(name)

    @varlinkmethod(return_parameter="machine")
    async def Pause(self, *, name: str) -> MachineInfo:
        """Stop a running machine's vCPUs (its memory stays as it is) until it is resumed."""
        return await self._calls.pause(name)

    @varlinkmethod(return_parameter="machine")
    async def Resume(self, *, name: str) -> MachineInfo:
        """Let a paused machine's vCPUs run again, and wake a machine whose guest suspended itself."""
        return await self._calls.resume(name)

    @varlinkmethod
    async def Remove(self, *, name: str) -> None:
        """Forget a stopped machine's definition."""
        await self._calls.remove(name)

    @varlinkmethod(return_parameter="machine")
    def Describe(self, *, name: str) -> MachineInfo:
        """One machine's state, readiness, process and configuration."""
        return self._calls.describe(name)

    @varlinkmethod(return_parameter="machine")
    def List(self) -> collections.abc.Iterator[MachineInfo | None]:
        """Every machine, one reply each (call with ``more``); a single reply without one if there are none."""
        yield from self._calls.list_machines()

    @varlinkmethod(return_parameter="event", delay_generator=False)
    async def Subscribe(self, *, name: str | None = None) -> collections.abc.AsyncIterator[MachineEvent]:
        """Lifecycle events as they happen (call with ``more``); the first reply is a ``subscribed`` event,
        the last (when the daemon stops, or the subscriber fell too far behind) an ``unsubscribed`` one."""
        events = self._calls.subscribe(name)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # (its clean-up runs now, not when the generator is collected)

    @varlinkmethod(return_parameter="firmware")
    def ListFirmware(self) -> list[Firmware]:
        """QEMU firmware descriptors found in the standard search path."""
        return self._calls.list_firmware()

    @varlinkmethod(return_parameter="fileDescriptor")
    async def OpenConsole(self, *, name: str) -> FileDescriptor:
        """The master side of a new PTY attached to the machine's console (passed as a file descriptor)."""
        return await self._calls.open_console(name)


def interface_description() -> str:
    return ManagerInterface.render_interface_description()
