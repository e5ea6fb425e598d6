# SPDX-License-Identifier: LGPL-2.1-or-later
"""``io.systemd.service`` on the daemon's socket, as systemd's own daemons serve it: Ping,
SetLogLevel and GetEnvironment (``varlinkctl call SOCKET io.systemd.service.Ping {}``).

Reload is not offered: the daemon has no configuration to re-read (definitions change only
through its own API).  (No ``from __future__ import annotations`` here: asyncvarlink reads the
methods' real annotations.)
"""


import os
from collections.abc import Callable

from asyncvarlink import TypedVarlinkErrorReply, VarlinkInterface, varlinkmethod

from vmspawnd.log import LEVELS


class InvalidLogLevelError(TypedVarlinkErrorReply, name="io.systemd.service.InvalidParameter"):
    class Parameters:
        parameter: str


class SystemdServiceInterface(VarlinkInterface, name="io.systemd.service"):
    """The service manager's view of this daemon: is it alive, how loud, in what environment."""

    errors = (InvalidLogLevelError,)

    def __init__(self, set_log_level: Callable[[int], None] | None = None) -> None:
        self._set_log_level = set_log_level or (lambda level: None)

    @varlinkmethod
    def Ping(self) -> None:
        """Answer at once (the daemon's event loop is alive)."""

    @varlinkmethod
    def SetLogLevel(self, *, level: int) -> None:
        """Log from this syslog level (0 emerg … 7 debug) on."""
        if not 0 <= level <= 7:
            raise InvalidLogLevelError(parameter="level")
        self._set_log_level(LEVELS[str(level)])

    @varlinkmethod(return_parameter="environment")
    def GetEnvironment(self) -> list[str]:
        """The daemon's environment (what QEMU and its helpers inherit)."""
        return [f"{key}={value}" for key, value in sorted(os.environ.items())]
