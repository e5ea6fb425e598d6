# SPDX-License-Identifier: LGPL-2.1-or-later
"""Registration with systemd-machined over varlink (``io.systemd.Machine``), or over D-Bus where
machined has no varlink interface (systemd < 256, Debian 12's 252): ``org.freedesktop.machine1``'s
RegisterMachine, which knows the name, id, class, leader and root directory only.

machined's Register has a parameter named ``class`` (a Python keyword), so calls are sent
as raw varlink parameters rather than through a typed proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmspawnd.pathwatch import appears
from vmspawnd.qemu.vsock import GuestVsock, VsockBackend
from vmspawnd.systemd.bus import open_bus
from vmspawnd.systemd.units import (
    MANAGER_IFACE,
    PROPERTIES_IFACE,
    SYSTEMD_BUS_NAME,
    SYSTEMD_PATH,
    SYSTEMD_RUNTIME_DIR,
    DBusCallError,
    SystemdManager,
)

MACHINED_SOCKET = Path("/run/systemd/machine/io.systemd.Machine")
SERVICE_NAME = "vmspawnd"
#: The first systemd whose machined serves ``io.systemd.Machine``; older ones are reached over D-Bus.
MACHINED_VARLINK_SINCE = 256
MACHINED_BUS_NAME = "org.freedesktop.machine1"
MACHINED_PATH = "/org/freedesktop/machine1"
MACHINED_MANAGER_IFACE = "org.freedesktop.machine1.Manager"


class RegistrationError(Exception):
    """machined refused or could not be reached (the message says which)."""


@dataclass(frozen=True)
class Registration:
    """What we tell machined about one VM."""

    name: str
    leader_pid: int
    machine_id: uuid.UUID | None = None
    root_directory: Path | None = None
    vsock: GuestVsock | None = None
    ssh_private_key: Path | None = None
    allocate_unit: bool = False
    #: the VM's ``io.systemd.MachineInstance`` socket (systemd-machined ≥ 261 keeps it; older ones refuse it)
    control_address: Path | None = None

    def parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {"name": self.name, "service": SERVICE_NAME, "class": "vm",
                                  "leaderProcessId": leader_process_id(self.leader_pid)}
        if self.machine_id is not None:
            params["id"] = self.machine_id.hex
        if self.root_directory is not None:
            params["rootDirectory"] = str(self.root_directory)
        if self.vsock is not None:
            if self.vsock.backend is VsockBackend.KERNEL:  # a real AF_VSOCK address; a hybrid one is not
                params["vSockCid"] = self.vsock.cid
            params["sshAddress"] = self.vsock.ssh_address
        if self.ssh_private_key is not None:
            params["sshPrivateKeyPath"] = str(self.ssh_private_key)
        if self.allocate_unit:
            params["allocateUnit"] = True
        if self.control_address is not None:
            params["controlAddress"] = str(self.control_address)
        return params

    def dbus_arguments(self) -> list[Any]:
        """RegisterMachine's arguments (``sayssus``): what an older machined can know of the VM."""
        return [self.name, self.machine_id.bytes if self.machine_id is not None else b"", SERVICE_NAME, "vm",
                self.leader_pid, str(self.root_directory or "")]


def leader_process_id(pid: int) -> dict[str, Any]:
    """``ProcessId``: the pid, plus the pidfd inode (which pins the exact process) where available."""
    result: dict[str, Any] = {"pid": pid}
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return result
    try:
        result["pidfdId"] = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    try:
        result["bootId"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:
        pass
    return result


async def call(method: str, parameters: dict[str, Any], socket_path: Path = MACHINED_SOCKET,
               timeout: float = 10.0) -> dict[str, Any]:
    """One varlink call to machined; raise RegistrationError with machined's error name."""
    from asyncvarlink import (  # on first use: start-up speed
        VarlinkClientProtocol,
        VarlinkMethodCall,
        connect_unix_varlink,
    )

    if not socket_path.exists():
        raise RegistrationError(f"cannot reach systemd-machined at {socket_path}: it is not running")
    try:
        transport, protocol = await asyncio.wait_for(connect_unix_varlink(VarlinkClientProtocol, socket_path), timeout)
    except (OSError, TimeoutError) as e:
        raise RegistrationError(f"cannot reach systemd-machined at {socket_path}: {e}") from e
    try:
        result = await asyncio.wait_for(protocol.call(VarlinkMethodCall(method, parameters)), timeout)
        assert result is not None
        reply, _ = result
    except (OSError, TimeoutError, ConnectionError) as e:
        raise RegistrationError(f"{method} failed: {e}") from e
    finally:
        transport.close()
    if reply.error:
        raise RegistrationError(f"{method}: {reply.error} {reply.parameters or ''}".strip())
    return dict(reply.parameters or {})


MACHINED_UNIT = "systemd-machined.service"


async def dbus_call(member: str, signature: str, body: list[Any], timeout: float = 10.0, *,
                    destination: str = MACHINED_BUS_NAME, path: str = MACHINED_PATH,
                    interface: str = MACHINED_MANAGER_IFACE) -> list[Any]:
    """One D-Bus call (by default to machined's manager, which activates machined) on a connection of its
    own: only a host whose machined has no varlink interface needs it, once per registration."""
    try:
        bus = await open_bus(timeout)
    except Exception as e:  # noqa: BLE001 - no bus, it refused us or did not answer: say so
        raise RegistrationError(f"cannot reach the system bus: {e or type(e).__name__}") from e
    from dbus_fast import Message, MessageType

    try:
        reply = await asyncio.wait_for(bus.call(Message(
            destination=destination, path=path, interface=interface, member=member, signature=signature,
            body=body)), timeout)
    except (OSError, TimeoutError, ConnectionError) as e:
        raise RegistrationError(f"{member} failed: {e or type(e).__name__}") from e
    finally:
        bus.disconnect()
    if reply is None or reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply is not None and reply.body else ""
        raise RegistrationError(f"{member}: {reply.error_name if reply is not None else 'no reply'} {text}".strip())
    return list(reply.body)


_systemd_version: int | None = None  # PID 1's, asked once where machined's varlink socket is missing


async def systemd_major() -> int:
    """The version of the systemd running here (``252.39-1~deb12u2`` → 252), asked over D-Bus once;
    0 where it cannot be asked (asked again next time)."""
    global _systemd_version
    if _systemd_version is None:
        try:
            (version,) = await dbus_call("Get", "ss", [MANAGER_IFACE, "Version"], destination=SYSTEMD_BUS_NAME,
                                         path=SYSTEMD_PATH, interface=PROPERTIES_IFACE)
        except RegistrationError:
            return 0
        digits = str(getattr(version, "value", version)).split(".")[0].split("~")[0]
        _systemd_version = int(digits) if digits.isdigit() else 0
    return _systemd_version


async def over_dbus(socket_path: Path = MACHINED_SOCKET) -> bool:
    """Whether machined is to be reached over D-Bus: systemd runs here, and its machined has no varlink
    interface (systemd < 256).  (A newer one's missing socket means machined is not running.)"""
    if socket_path.exists() or socket_path != MACHINED_SOCKET or not SYSTEMD_RUNTIME_DIR.is_dir():
        return False
    return 0 < await systemd_major() < MACHINED_VARLINK_SINCE


async def reachable(socket_path: Path = MACHINED_SOCKET) -> bool:
    """Whether a registration may be tried now (over varlink, or over D-Bus, which starts machined)."""
    return socket_path.exists() or await over_dbus(socket_path)


async def start_machined(manager: SystemdManager, socket_path: Path = MACHINED_SOCKET,
                         timeout: float = 10.0) -> str | None:
    """Have systemd start machined when its varlink socket is missing (systemd 257 starts it only on
    D-Bus activation, which nothing may have done yet); None once it answers, else why not.  A machined
    without varlink (systemd < 256) is left to D-Bus activation by the registration itself."""
    if socket_path.exists() or await over_dbus(socket_path):
        return None
    try:
        (job,) = await manager.call(MANAGER_IFACE, "StartUnit", "ss", [MACHINED_UNIT, "replace"])
        result = await manager.job_result(job, timeout)
    except (DBusCallError, TimeoutError) as e:
        return f"cannot start {MACHINED_UNIT}: {e}"
    if result != "done":
        return f"starting {MACHINED_UNIT} failed (job result: {result})"
    if not await appears(socket_path, timeout):
        return f"{MACHINED_UNIT} runs but {socket_path} did not appear"
    return None


async def register(reg: Registration, socket_path: Path = MACHINED_SOCKET) -> bool:
    """Register; True if machined took the control address too (systemd ≥ 261), False if it was
    registered without one (an older machined refuses the unknown parameter, or has only D-Bus)."""
    if await over_dbus(socket_path):
        await dbus_call("RegisterMachine", "sayssus", reg.dbus_arguments())
        return False
    try:
        await call("io.systemd.Machine.Register", reg.parameters(), socket_path)
        return reg.control_address is not None
    except RegistrationError as e:
        if reg.control_address is None or "controlAddress" not in str(e):
            raise
    await call("io.systemd.Machine.Register", dataclasses.replace(reg, control_address=None).parameters(), socket_path)
    return False


async def unregister(name: str, socket_path: Path = MACHINED_SOCKET) -> None:
    if await over_dbus(socket_path):
        await dbus_call("UnregisterMachine", "s", [name])
        return
    await call("io.systemd.Machine.Unregister", {"name": name}, socket_path)


class MachineRegistration:
    """``async with``: the VM is registered with machined for the block (unregistered after)."""

    def __init__(self, registration: Registration, socket_path: Path = MACHINED_SOCKET) -> None:
        self.registration = registration
        self.socket_path = socket_path
        self.with_control = False  # machined knows the control socket

    async def __aenter__(self) -> MachineRegistration:
        self.with_control = await register(self.registration, self.socket_path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await unregister_quietly(self.registration.name, self.socket_path)


async def unregister_quietly(name: str, socket_path: Path = MACHINED_SOCKET) -> None:
    """Unregister; machinectl terminate may have removed it already, or machined may be gone."""
    try:
        await unregister(name, socket_path)
    except Exception:  # noqa: BLE001 - nothing to do about it but go on
        pass


#: how long machined may take to drop a machine it replied to Unregister for
FORGET_TIMEOUT = 2.0


async def forgotten(name: str, socket_path: Path = MACHINED_SOCKET, timeout: float = FORGET_TIMEOUT) -> None:
    """Wait until machined no longer knows ``name``.  It replies to Unregister before it drops the machine
    (on its next garbage collection), so a Register of the same name at once may be refused as existing.
    Gives up quietly after ``timeout`` (the Register that follows then says why)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if await over_dbus(socket_path):
                await dbus_call("GetMachine", "s", [name])
            else:
                await call("io.systemd.Machine.List", {"name": name}, socket_path)
        except RegistrationError:  # NoSuchMachine (or machined is gone)
            return
        await asyncio.sleep(0.02)
