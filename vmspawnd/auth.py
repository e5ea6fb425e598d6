# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who is calling, and what they may do.

Every call is attributed to its connection's peer credentials (SO_PEERCRED, taken by the kernel
when the client connected).  Root may do everything.  Anyone else who can reach the socket may
look (List, Describe, Subscribe, ListFirmware); a VM runs as root, so defining, starting or
controlling one needs polkit's yes for ``io.vmspawnd.manage`` (polkit/io.vmspawnd.policy; no
polkit, no yes).  A denial is a :class:`PermissionDenied` naming the action it would need.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmspawnd.errors import PermissionDenied
from vmspawnd.server import current_connection
from vmspawnd.systemd.polkit import authorized

#: The polkit action a non-root caller needs to define, start or control VMs (which run as root).
MANAGE = "io.vmspawnd.manage"


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a call."""

    pid: int
    uid: int
    gid: int

    @property
    def root(self) -> bool:
        return self.uid == 0


#: a call that did not come over a socket (the daemon itself, tests of the interface class)
INTERNAL = Caller(0, 0, 0)


def caller() -> Caller:
    """The caller of the varlink call being served."""
    connection = current_connection.get(None)
    if connection is None:
        return INTERNAL
    peer = connection.peer()
    if peer is None:  # a socket whose peer the kernel cannot name: nobody in particular
        return Caller(0, -1, -1)
    return Caller(*peer)


async def require(action: str, what: str) -> Caller:
    """The caller, if it may do ``what`` (root, or polkit says yes to ``action``); else PermissionDenied."""
    who = caller()
    if who.root or (who.uid >= 0 and await authorized(action, who.pid, who.uid)):
        return who
    raise PermissionDenied(action, f"{what} needs {action}, which polkit did not grant uid {who.uid} "
                                   "(machines run as root; anyone may list and describe them)")
