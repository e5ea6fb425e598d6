# SPDX-License-Identifier: LGPL-2.1-or-later
"""The varlink interface ``io.vmspawnd.Manager``, served with asyncvarlink on top of Manager.

The same class is the client's proxy definition (vmspawnctl), so both ends share one set of
types.  ``varlink/io.vmspawnd.Manager.varlink`` must equal :func:`interface_description`;
a test enforces that.
"""


import asyncio
import collections.abc
import contextlib
import dataclasses
import enum
import signal as signal_module
import time
import typing
from dataclasses import dataclass

from asyncvarlink import (
    FileDescriptor,
    GenericVarlinkErrorReply,
    LastResult,
    TypedVarlinkErrorReply,
    VarlinkInterface,
    varlinkmethod,
    varlinksignature,
)
from asyncvarlink.conversion import DataclassVarlinkType, ObjectVarlinkType, VarlinkType

from vmspawnd.auth import caller, require_owner, require_start, run_as_for
from vmspawnd.errors import (
    ConfigError,
    HostError,
    MachineExists,
    NoSuchMachine,
    PermissionDenied,
    StartError,
    VmspawndError,
    WrongState,
)
from vmspawnd.log import get_logger
from vmspawnd.machine import State
from vmspawnd.manager import Entry, Event, Manager
from vmspawnd.plan import needs_privileges
from vmspawnd.qemu.firmware import enumerate_descriptors
from vmspawnd.run import Run
from vmspawnd.server import EncodedJson, current_connection
from vmspawnd.settings import config_from_json, config_to_json, varlink_config_fields
from vmspawnd.values import validate_machine_name

INTERFACE = "io.vmspawnd.Manager"
MAX_STOP_TIMEOUT = 3600.0

log = get_logger()


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
    #: its reply, encoded once per change of the machine (not part of the interface: init=False)
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


def varlink_error(error: VmspawndError | OSError, name: str) -> TypedVarlinkErrorReply:
    """The interface's typed error for one of ours: the one place where they are mapped."""
    if isinstance(error, NoSuchMachine):
        return NoSuchMachineError(name=error.name)
    if isinstance(error, MachineExists):
        return MachineExistsError(name=error.name)
    if isinstance(error, ConfigError):
        return InvalidConfigError(field=error.field, reason=str(error))
    if isinstance(error, WrongState):
        return WrongStateError(name=error.name, state=error.state, reason=str(error))
    if isinstance(error, StartError):
        return StartFailedError(name=name, reason=str(error))
    if isinstance(error, HostError):
        return HostFailedError(reason=str(error))
    if isinstance(error, PermissionDenied):
        return PermissionDeniedError(action=error.action, reason=error.reason)
    if isinstance(error, OSError):
        return HostFailedError(reason=str(HostError("the operation failed", error)))
    return HostFailedError(reason=str(error))


def call_error(error: BaseException) -> TypedVarlinkErrorReply | None:
    """For the server: the typed error of an exception that escaped a method, if it is one of ours."""
    return varlink_error(error, "") if isinstance(error, (VmspawndError, OSError)) else None


@contextlib.contextmanager
def typed_errors(name: str = "", *, start: bool = False) -> collections.abc.Iterator[None]:
    """Raise our errors (and the host's) as the interface's typed errors.  With ``start``, an
    invalid setting found only when starting is a failed start, not an invalid definition."""
    try:
        yield
    except ConfigError as e:
        raise (StartFailedError(name=name, reason=str(e)) if start else varlink_error(e, name)) from None
    except (VmspawndError, OSError) as e:
        raise varlink_error(e, name) from None


def _shown_config(config_json: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """The config as Describe shows it: credential values are never sent back, only their IDs."""
    shown = dict(config_json)
    shown["credentials"] = [c.split(":", 1)[0] for c in shown.get("credentials") or []]
    shown["smbios11"] = [s.split("=", 1)[0] + "=…" if s.startswith("io.systemd.credential") else s
                         for s in shown.get("smbios11") or []]
    return shown


class PreconvertedDataclass(DataclassVarlinkType):
    """A dataclass type whose instances may carry their JSON form already (``varlink_json``, encoded): a
    List of a thousand machines then converts and encodes only those that changed since their last reply."""

    def tojson(self, obj: typing.Any, oobstate: typing.Any = None) -> typing.Any:
        encoded = getattr(obj, "varlink_json", None)
        return encoded if encoded is not None else super().tojson(obj, oobstate)


#: the replies' MachineInfo type, one for every method (each instance converts ≈ 100 fields' types)
_MACHINE_INFO_TYPE = PreconvertedDataclass(MachineInfo)
#: the types of a reply's fields, to convert all but its config, which is JSON already
_REPLY_FIELD_TYPES = {f.name: VarlinkType.from_type_annotation(f.type)
                      for f in dataclasses.fields(MachineInfo) if f.init}


def machine_info(name: str, entry: Entry) -> MachineInfo:
    """The machine's reply: the same object (with its encoded form) as last time while nothing in it
    changed (its definition compares by identity first: a reload replaces it, nothing changes it)."""
    fields = _machine_fields(name, entry)
    key = tuple(fields.values())
    cached = entry.shown_reply
    if cached is not None and cached[0] == key:
        return cached[1]
    shown = _shown_config(config_to_json(entry.config))
    info = MachineInfo(**{**fields, "config": Config(**shown)})
    info.varlink_json = EncodedJson(_reply_json(info, shown))
    entry.shown_reply = (key, info)
    return info


def _reply_json(info: MachineInfo, config_json: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """``info`` as JSON: each field converted by its type, but the config, which is JSON already
    (config_to_json's; converting its ≈ 50 fields again took most of a Create's reply, ≈ 50 µs).
    Settings left at their default are absent rather than null (as varlink allows): a quarter the size."""
    return {name: {key: value for key, value in config_json.items() if value is not None} if name == "config"
            else vtype.tojson(getattr(info, name)) for name, vtype in _REPLY_FIELD_TYPES.items()}


def _machine_fields(name: str, entry: Entry) -> dict[str, typing.Any]:
    """What a machine's reply is made from (``config``: its definition, rendered by :func:`machine_info`)."""
    m = entry.machine
    run = m.active_run
    return dict(
        name=name, state=MachineState(m.state.value), ready=m.ready, since=int(m.since * 1_000_000),
        pid=m.qemu.pid if m.qemu is not None else None,
        runtimeDirectory=str(m.runtime.path) if run is not None else None,
        tpmStatePath=str(m.tpm_state_path) if m.tpm_state_path else None, units=m.units,
        status=m.guest_status, exitStatus=m.exit_status, failure=m.failure,
        config=entry.config, definitionError=entry.definition_error, owner=entry.owner,
        runAs=entry.run_as, **_vsock_fields(run),
    )


def _vsock_fields(run: Run | None) -> dict[str, str | None]:
    """How to reach a running guest's vsock (nothing without one)."""
    if run is None or run.vsock is None:
        return {}
    vsock, key = run.vsock, run.ssh_key
    return {"vsockBackend": str(vsock.backend), "sshAddress": vsock.ssh_address, "sshKey": str(key) if key else None}


def _event_object(event: Event) -> MachineEvent:
    d = event.data
    return MachineEvent(machine=event.machine, event=event.kind, timestamp=int(event.timestamp * 1_000_000),
                        pid=d.get("pid"), status=d.get("status"), exitStatus=d.get("exit_status"),
                        reason=d.get("reason"))


class ManagerInterface(VarlinkInterface, name=INTERFACE):
    """Create, run and watch virtual machines."""

    errors = (NoSuchMachineError, MachineExistsError, InvalidConfigError, WrongStateError, StartFailedError,
              HostFailedError, PermissionDeniedError)

    def __init__(self, manager: Manager | None = None) -> None:
        self._manager = manager

    @property
    def manager(self) -> Manager:
        assert self._manager is not None
        return self._manager

    async def _controlled(self, name: str, what: str) -> Entry:
        """The machine ``name``, if the caller may control it (its owner, root, or polkit's yes)."""
        entry = self._entry(name)
        with typed_errors(name):
            await require_owner(entry.owner, what)
        return entry

    def _entry(self, name: str) -> Entry:
        _check_name(name)
        with typed_errors(name):
            return self.manager.get(name)

    @varlinkmethod(return_parameter="machine")
    async def Create(self, *, name: str, config: Config) -> MachineInfo:
        """Define a new machine (it is not started).  It belongs to the caller and runs as the caller,
        unless it needs privileges (then it runs as root, which polkit must allow)."""
        who = caller()
        _check_name(name)
        raw = {f.name: v for f in dataclasses.fields(config) if (v := getattr(config, f.name)) is not None}
        with typed_errors(name):
            machine_config = config_from_json(name, raw)
            plan = self.manager.plan(machine_config, who.identity())  # what it names, looked at as the caller
            run_as = await run_as_for(who, needs_privileges(machine_config, plan))
            entry = self.manager.create(machine_config, owner=who.uid, run_as=run_as, plan=plan)
        return machine_info(name, entry)

    @varlinkmethod(return_parameter="machine")
    async def Start(self, *, name: str) -> MachineInfo:
        """Start a stopped machine; returns once QEMU runs (not when the guest is ready)."""
        entry = self._entry(name)
        with typed_errors(name):
            await require_start(entry.owner, entry.run_as)
        with typed_errors(name, start=True):
            entry = await self.manager.start(name, expected=entry)
        return machine_info(name, entry)

    @varlinkmethod(return_parameter="machine")
    async def Stop(self, *, name: str, timeout: float | None = None) -> MachineInfo:
        """Power the guest off via ACPI; force it after ``timeout`` seconds (default 10)."""
        expected = await self._controlled(name, "stopping")
        if timeout is not None and not 0 <= timeout <= MAX_STOP_TIMEOUT:
            raise InvalidConfigError(field="timeout", reason=f"must be between 0 and {MAX_STOP_TIMEOUT:.0f}")
        with typed_errors(name):
            entry = await self.manager.stop(name, 10.0 if timeout is None else timeout, expected)
        return machine_info(name, entry)

    @varlinkmethod(return_parameter="machine")
    async def Kill(self, *, name: str, signal: int | None = None) -> MachineInfo:
        """End QEMU now (QMP quit, then SIGKILL), or send it ``signal``."""
        expected = await self._controlled(name, "killing")
        if signal is not None and signal not in {s.value for s in signal_module.Signals}:
            raise InvalidConfigError(field="signal", reason=f"{signal} is not a signal number")
        with typed_errors(name):
            entry = await self.manager.kill(name, signal, expected)
        return machine_info(name, entry)

    @varlinkmethod
    async def Remove(self, *, name: str) -> None:
        """Forget a stopped machine's definition."""
        expected = await self._controlled(name, "removing")
        with typed_errors(name):
            await self.manager.remove(name, expected)

    @varlinkmethod(return_parameter="machine")
    def Describe(self, *, name: str) -> MachineInfo:
        """One machine's state, readiness, process and configuration."""
        return machine_info(name, self._entry(name))

    @varlinkmethod(return_parameter="machine")
    def List(self) -> collections.abc.Iterator[MachineInfo | None]:
        """Every machine, one reply each (call with ``more``); a single reply without one if there are none."""
        entries = sorted(self.manager.machines.items())
        if not entries:
            yield None
        for name, entry in entries:
            yield machine_info(name, entry)

    @varlinkmethod(return_parameter="event", delay_generator=False)
    async def Subscribe(self, *, name: str | None = None) -> collections.abc.AsyncIterator[MachineEvent]:
        """Lifecycle events as they happen (call with ``more``); the first reply is a ``subscribed`` event,
        the last (when the daemon stops, or the subscriber fell too far behind) an ``unsubscribed`` one."""
        if name is not None:
            self._entry(name)
        connection = current_connection.get(None)
        hangup = asyncio.ensure_future(connection.wait_hangup() if connection else asyncio.Event().wait())
        queue = self.manager.subscribe()
        try:
            yield MachineEvent(machine=name or "", event="subscribed", timestamp=_now_us())
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, hangup), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client hung up: end the call, answering nobody
                    get.cancel()
                    raise GenericVarlinkErrorReply(f"{INTERFACE}.Disconnected")
                event = get.result()
                if event is None:
                    reason = "vmspawnd is stopping" if self.manager.stopping else "the subscriber fell behind"
                    raise LastResult(MachineEvent(machine=name or "", event="unsubscribed", timestamp=_now_us(),
                                                  reason=reason))
                if name is None or event.machine == name:
                    yield _event_object(event)
        finally:
            hangup.cancel()
            self.manager.unsubscribe(queue)

    @varlinkmethod(return_parameter="firmware")
    def ListFirmware(self) -> list[Firmware]:
        """QEMU firmware descriptors found in the standard search path."""
        return [Firmware(path=str(d.path), description=d.description, interfaceTypes=list(d.interface_types),
                         features=list(d.features), valid=d.valid) for d in enumerate_descriptors()]

    @varlinkmethod(return_parameter="fileDescriptor")
    async def OpenConsole(self, *, name: str) -> FileDescriptor:
        """The master side of a new PTY attached to the machine's console (passed as a file descriptor)."""
        entry = await self._controlled(name, "opening the console")
        console = entry.console
        if console is None or entry.machine.state is not State.RUNNING:
            raise WrongStateError(name=name, state=entry.machine.state.value,
                                  reason="the machine is not running with an interactive or read-only console")
        with typed_errors(name):
            fd = FileDescriptor(await console.open_client(), should_close=True)
        asyncio.get_running_loop().call_later(30, _close_quietly, fd)
        return fd




def _close_quietly(fd: FileDescriptor) -> None:
    try:
        fd.close()
    except Exception:
        pass


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _check_name(name: str) -> None:
    try:
        validate_machine_name(name, "name")
    except ConfigError as e:
        raise InvalidConfigError(field="name", reason=str(e)) from None


def _reply_preconverted(method: typing.Any, optional: bool = False) -> None:
    """Let ``method``'s ``machine`` reply (``?MachineInfo`` if ``optional``) use the JSON that
    :func:`machine_info` keeps: the type, and so the interface description, stay the same."""
    signature = varlinksignature(method)
    assert signature is not None
    machine = _MACHINE_INFO_TYPE.optional() if optional else _MACHINE_INFO_TYPE
    signature.return_type = ObjectVarlinkType({"machine": machine})


for _method in (ManagerInterface.Create, ManagerInterface.Start, ManagerInterface.Stop, ManagerInterface.Kill,
                ManagerInterface.Describe):
    _reply_preconverted(_method)
_reply_preconverted(ManagerInterface.List, optional=True)


def interface_description() -> str:
    return ManagerInterface.render_interface_description()
