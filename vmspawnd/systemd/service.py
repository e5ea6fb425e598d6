# SPDX-License-Identifier: LGPL-2.1-or-later
"""``io.systemd.service`` on the daemon's socket, as systemd's own daemons serve it: Ping,
SetLogLevel, GetEnvironment and Reload (``varlinkctl call SOCKET io.systemd.service.Ping {}``).

Reload re-reads the machine definitions, as ``systemctl reload vmspawnd`` (SIGHUP) does.  (No
``from __future__ import annotations`` here: asyncvarlink reads the methods' real annotations.)
"""


import os
from collections.abc import Awaitable, Callable

from asyncvarlink import GenericVarlinkErrorReply, TypedVarlinkErrorReply, VarlinkInterface, varlinkmethod

from vmspawnd.auth import caller
from vmspawnd.log import LEVELS


class InvalidLogLevelError(TypedVarlinkErrorReply, name="io.systemd.service.InvalidParameter"):
    class Parameters:
        parameter: str


class SystemdServiceInterface(VarlinkInterface, name="io.systemd.service"):
    """The service manager's view of this daemon: is it alive, how loud, in what environment."""

    errors = (InvalidLogLevelError,)

    def __init__(self, set_log_level: Callable[[int], None] | None = None,
                 reload: Callable[[], Awaitable[None]] | None = None) -> None:
        self._set_log_level = set_log_level or (lambda level: None)
        self._reload = reload

    @varlinkmethod
    def Ping(self) -> None:
        """Answer at once (the daemon's event loop is alive)."""

    @varlinkmethod
    def SetLogLevel(self, *, level: int) -> None:
        """Log from this syslog level (0 emerg … 7 debug) on (root only)."""
        _root_only()
        if not 0 <= level <= 7:
            raise InvalidLogLevelError(parameter="level")
        self._set_log_level(LEVELS[str(level)])

    @varlinkmethod
    async def Reload(self) -> None:
        """Re-read the machine definitions (running VMs are not touched); returns once done (root only)."""
        _root_only()
        if self._reload is not None:
            await self._reload()

    @varlinkmethod(return_parameter="environment")
    def GetEnvironment(self) -> list[str]:
        """The daemon's environment (what QEMU and its helpers inherit; root only)."""
        _root_only()
        return [f"{key}={value}" for key, value in sorted(os.environ.items())]


def _root_only() -> None:
    """Managing the daemon itself is root's (as for systemd's own daemons)."""
    if not caller().root:
        raise GenericVarlinkErrorReply("org.varlink.service.PermissionDenied")
