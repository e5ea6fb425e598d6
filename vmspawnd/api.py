# SPDX-License-Identifier: LGPL-2.1-or-later
"""What each call of the varlink interface ``io.vmspawnd.Manager`` does, on top of Manager; the
interface itself (types, errors, declarations, shared with clients) is interface.py."""

import asyncio
import collections.abc
import contextlib
import dataclasses
import time
import typing

from asyncvarlink import FileDescriptor, GenericVarlinkErrorReply, LastResult, TypedVarlinkErrorReply, varlinksignature
from asyncvarlink.conversion import ObjectVarlinkType, VarlinkType

from vmspawnd.auth import caller, require_owner, require_start, run_as_for
from vmspawnd.config import MachineConfig
from vmspawnd.console import MAX_VIEWERS
from vmspawnd.errors import (
    ConfigError,
    HostError,
    LimitReached,
    MachineExists,
    NoSuchMachine,
    PermissionDenied,
    StartError,
    VmspawndError,
    WrongState,
)
from vmspawnd.interface import (
    INTERFACE,
    Config,
    Firmware,
    HostFailedError,
    InvalidConfigError,
    LimitReachedError,
    MachineEvent,
    MachineExistsError,
    MachineInfo,
    MachineState,
    ManagerInterface,
    NoSuchMachineError,
    PermissionDeniedError,
    StartFailedError,
    WrongStateError,
)
from vmspawnd.machine import Control, State
from vmspawnd.manager import Entry, Event, Manager
from vmspawnd.plan import needs_privileges
from vmspawnd.qemu.firmware import enumerate_descriptors
from vmspawnd.server import EncodedJson, EncodedReplyType, PreconvertedDataclass, UncheckedObject, current_connection
from vmspawnd.settings import config_from_json, config_to_json
from vmspawnd.values import valid_signal, validate_machine_name

MAX_STOP_TIMEOUT = 3600.0


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
    if isinstance(error, LimitReached):
        return LimitReachedError(limit=error.limit, reason=error.reason)
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


def _shown_config(config: MachineConfig) -> dict[str, typing.Any]:
    """The config as Describe shows it: credential values are never sent back, only their IDs."""
    shown = config_to_json(config, secrets=False)
    shown["credentials"] = [c.removesuffix(":") for c in shown["credentials"]]
    return shown


#: the types of a reply's fields, to convert all but its config, which is JSON already
_REPLY_FIELD_TYPES = {f.name: VarlinkType.from_type_annotation(f.type)
                      for f in dataclasses.fields(MachineInfo) if f.init}


def _reply_preconverted(method: typing.Any, optional: bool = False) -> None:
    """Let ``method``'s ``machine`` reply (``?MachineInfo`` if ``optional``) use the JSON kept with each
    reply (``varlink_json``), and go out as bytes made straight from it: the types, and so the
    interface description, stay the same."""
    signature = varlinksignature(method)
    assert signature is not None
    machine = _MACHINE_INFO_TYPE.optional() if optional else _MACHINE_INFO_TYPE
    signature.return_type = EncodedReplyType({"machine": machine})


#: the replies' MachineInfo type, one for every method (each instance converts ≈ 100 fields' types)
_MACHINE_INFO_TYPE = PreconvertedDataclass(MachineInfo)
for _method in (ManagerInterface.Create, ManagerInterface.Start, ManagerInterface.Stop, ManagerInterface.Kill,
                ManagerInterface.Reboot, ManagerInterface.Pause, ManagerInterface.Resume, ManagerInterface.Describe):
    _reply_preconverted(_method)
_reply_preconverted(ManagerInterface.List, optional=True)


_create_signature = varlinksignature(ManagerInterface.Create)
assert _create_signature is not None
_create_signature.parameter_type = ObjectVarlinkType({"name": VarlinkType.from_type_annotation(str),
                                                      "config": UncheckedObject(Config)})  # (checked by create)

_SHOWN_STATES = {state: MachineState(state.value) for state in State}


def machine_info(name: str, entry: Entry) -> MachineInfo:
    """The machine's reply: the same object (with its encoded form) as last time while nothing in it
    changed (its definition compares by identity first: a reload replaces it, nothing changes it)."""
    key = _machine_values(name, entry)
    cached = entry.shown_reply
    if cached is not None and cached[0] == key:
        return cached[1]
    shown = _shown_config(entry.config)
    info = MachineInfo(**{**dict(zip(_FIELDS, key, strict=True)), "config": Config(**shown)})
    info.varlink_json = EncodedJson(_reply_json(info, shown))
    entry.shown_reply = (key, info)
    return info


def _reply_json(info: MachineInfo, config_json: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """``info`` as JSON: each field converted by its type, but the config, which is JSON already
    (config_to_json's; converting its ≈ 50 fields again took most of a Create's reply, ≈ 50 µs).
    Settings left at their default are absent rather than null (as varlink allows): a quarter the size."""
    return {name: {key: value for key, value in config_json.items() if value is not None} if name == "config"
            else vtype.tojson(getattr(info, name)) for name, vtype in _REPLY_FIELD_TYPES.items()}


#: the fields of a machine's reply that :func:`_machine_values` gives, in its order
_FIELDS = ("name", "state", "ready", "since", "pid", "runtimeDirectory", "tpmStatePath", "units", "status",
           "exitStatus", "failure", "config", "definitionError", "owner", "runAs", "vsockBackend", "sshAddress",
           "sshKey", "warnings", "paused", "suspended")
assert set(_FIELDS) == set(_REPLY_FIELD_TYPES), "a reply field that machine_info does not fill in"


def _machine_values(name: str, entry: Entry) -> tuple[typing.Any, ...]:
    """What a machine's reply is made from, the values of :data:`_FIELDS` (``config``: its definition,
    rendered by :func:`machine_info`); a tuple, as a List makes one for every machine to compare."""
    m = entry.machine
    run = m.active_run
    vsock, ssh_key = (run.vsock, run.ssh_key) if run is not None else (None, None)
    return (name, _SHOWN_STATES[m.state], m.ready, int(m.since * 1_000_000), m.qemu.pid if m.qemu is not None else None,
            str(m.runtime.path) if run is not None else None, str(m.tpm_state_path) if m.tpm_state_path else None,
            m.units, m.guest_status, m.exit_status, m.failure, entry.config, entry.definition_error, entry.owner,
            entry.run_as, str(vsock.backend) if vsock else None, vsock.ssh_address if vsock else None,
            str(ssh_key) if vsock and ssh_key else None, m.warnings, m.paused, m.suspended)


def _event_object(event: Event) -> MachineEvent:
    d = event.data
    return MachineEvent(machine=event.machine, event=event.kind, timestamp=int(event.timestamp * 1_000_000),
                        pid=d.get("pid"), status=d.get("status"), exitStatus=d.get("exit_status"),
                        reason=d.get("reason"))


class ManagerCalls:
    """What each call of ``io.vmspawnd.Manager`` does, on top of a Manager (the interface's methods,
    interface.py, call these; interface.Calls is what they expect): who may, the checks of its
    parameters, and the typed errors."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def _controlled(self, name: str, what: str) -> tuple[Entry, int]:
        """The machine ``name``, if the caller may control it (its owner, root, or polkit's yes), and its
        :attr:`Machine.ownership` it was authorized for (the command is refused if a reload changes it)."""
        entry = self._entry(name)
        authorized = entry.machine.ownership
        with typed_errors(name):
            await require_owner(entry.owner, what)
        return entry, authorized

    def _entry(self, name: str) -> Entry:
        _check_name(name)
        with typed_errors(name):
            return self.manager.get(name)

    async def create(self, name: str, config: Config | dict[str, typing.Any]) -> MachineInfo:
        """Define ``name`` with ``config``, the caller's JSON object (passed unchecked: see UncheckedObject)."""
        who = caller()
        _check_name(name)
        with typed_errors(name):
            machine_config = config_from_json(name, config)
            plan = self.manager.plan(machine_config, who.identity())  # what it names, looked at as the caller
            run_as = await run_as_for(who, needs_privileges(machine_config, plan))
            entry = self.manager.create(machine_config, owner=who.uid, run_as=run_as, plan=plan)
        return machine_info(name, entry)

    async def start(self, name: str) -> MachineInfo:
        entry = self._entry(name)
        authorized = entry.machine.ownership  # (a reload may change owner and run_as while polkit is asked)
        with typed_errors(name):
            await require_start(entry.owner, entry.run_as)
        with typed_errors(name, start=True):
            entry = await self.manager.start(name, expected=entry, authorized=authorized)
        return machine_info(name, entry)

    async def stop(self, name: str, timeout: float | None) -> MachineInfo:
        expected, authorized = await self._controlled(name, "stopping")
        if timeout is not None and not 0 <= timeout <= MAX_STOP_TIMEOUT:
            raise InvalidConfigError(field="timeout", reason=f"invalid timeout={timeout!r}: must be between 0 and "
                                                             f"{MAX_STOP_TIMEOUT:.0f} seconds")
        with typed_errors(name):
            entry = await self.manager.stop(name, 10.0 if timeout is None else timeout, expected, authorized)
        return machine_info(name, entry)

    async def kill(self, name: str, signal: int | None) -> MachineInfo:
        expected, authorized = await self._controlled(name, "killing")
        if signal is not None and not valid_signal(signal):
            raise InvalidConfigError(field="signal", reason=f"invalid signal={signal!r}: not a signal number")
        with typed_errors(name):
            entry = await self.manager.kill(name, signal, expected, authorized)
        return machine_info(name, entry)

    async def reboot(self, name: str) -> MachineInfo:
        return await self._control(name, Control.REBOOT, "rebooting")

    async def pause(self, name: str) -> MachineInfo:
        return await self._control(name, Control.PAUSE, "pausing")

    async def resume(self, name: str) -> MachineInfo:
        return await self._control(name, Control.RESUME, "resuming")

    async def _control(self, name: str, what: Control, doing: str) -> MachineInfo:
        expected, authorized = await self._controlled(name, doing)
        with typed_errors(name):
            entry = await self.manager.control(name, what, expected, authorized)
        return machine_info(name, entry)

    async def remove(self, name: str) -> None:
        expected, authorized = await self._controlled(name, "removing")
        with typed_errors(name):
            await self.manager.remove(name, expected, authorized)

    def describe(self, name: str) -> MachineInfo:
        return machine_info(name, self._entry(name))

    def list_machines(self) -> collections.abc.Iterator[MachineInfo | None]:
        entries = sorted(self.manager.machines.items())
        if not entries:
            yield None
        for name, entry in entries:
            yield machine_info(name, entry)

    async def subscribe(self, name: str | None) -> collections.abc.AsyncGenerator[MachineEvent, None]:
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

    def list_firmware(self) -> list[Firmware]:
        return [Firmware(path=str(d.path), description=d.description, interfaceTypes=list(d.interface_types),
                         features=list(d.features), valid=d.valid) for d in enumerate_descriptors()]

    async def open_console(self, name: str) -> FileDescriptor:
        entry, authorized = await self._controlled(name, "opening the console")
        with typed_errors(name):
            entry.machine.check_authorized(authorized)
        console = entry.console
        if console is None or entry.machine.state is not State.RUNNING:
            raise WrongStateError(name=name, state=entry.machine.state.value,
                                  reason="the machine is not running with an interactive or read-only console")
        if console.viewers >= MAX_VIEWERS:
            raise WrongStateError(name=name, state=entry.machine.state.value,
                                  reason=f"its console has {MAX_VIEWERS} viewers already; one must hang up first")
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
