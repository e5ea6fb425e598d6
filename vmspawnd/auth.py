# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who is calling, and what they may do.

Every call is attributed to its connection's peer credentials (SO_PEERCRED, taken by the kernel
when the client connected), and polkit is asked about that process only while it still runs (see
server.Peer): a connection handed on by a process that has ended is nobody polkit could say yes to.  The rules:

* root may do everything;
* anyone who can reach the socket may look (List, Describe, Subscribe, ListFirmware);
* anyone may define machines; a machine runs as the user who defined it (see identity.py), so it
  can use exactly what that user can;
* the owner of a machine may start, stop, kill, reboot, pause, resume, remove it and open its console;
* controlling another user's machine needs polkit's yes for :data:`MANAGE_ALL`;
* a machine that needs what a user's VM cannot have (plan.needs_privileges: TAP networking,
  UID mapping, scope properties, …) runs as root, and defining or starting one needs polkit's yes
  for :data:`PRIVILEGED`.

The actions are in polkit/io.vmspawnd.policy.  No polkit, no yes.  A denial is a
:class:`PermissionDenied` naming the action it would need.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmspawnd.errors import PermissionDenied
from vmspawnd.identity import Identity
from vmspawnd.server import current_connection
from vmspawnd.systemd.polkit import authorized

#: controlling (starting, stopping, killing, removing, opening the console of) another user's machine
MANAGE_ALL = "io.vmspawnd.manage-all"
#: defining or starting a machine that runs as root (it uses what needs privileges)
PRIVILEGED = "io.vmspawnd.privileged-features"


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a call."""

    pid: int
    uid: int
    gid: int
    #: when the process started (clock ticks since boot), read as it connected; None: unknown
    start_time: int | None = None

    @property
    def root(self) -> bool:
        return self.uid == 0

    def identity(self) -> Identity:
        """The caller's user, with its groups (ConfigError if the uid has no account here)."""
        return Identity.of_uid(self.uid)


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
    return Caller(peer.pid, peer.uid, peer.gid, peer.start_time)


async def require(action: str, what: str, who: Caller | None = None) -> Caller:
    """The caller, if it may do ``what`` (root, or polkit says yes to ``action``); else PermissionDenied."""
    who = who or caller()
    if who.root or (who.uid >= 0 and who.start_time is not None
                     and await authorized(action, who.pid, who.uid, who.start_time)):
        return who
    raise PermissionDenied(action, f"{what} needs {action}, which polkit did not grant uid {who.uid}")


async def run_as_for(who: Caller, needs: list[tuple[str, str, str]]) -> int:
    """The uid a machine ``who`` defines runs as: the caller's own, or root's when it ``needs``
    privileges (``(setting, value, why)`` each, see plan.needs_privileges), which polkit must allow."""
    if who.root or not needs:
        return who.uid
    setting, value, why = needs[0]
    await require(PRIVILEGED, f"{setting}={value} ({why})", who)
    return 0


async def require_start(owner: int, run_as: int) -> Caller:
    """The caller, if it may start a machine of ``owner`` that runs as ``run_as``: as for any control,
    and an owner starting its machine that runs as root needs :data:`PRIVILEGED` again."""
    who = await require_owner(owner, "starting")
    if who.uid == owner != run_as:
        await require(PRIVILEGED, "starting a machine that runs as root", who)
    return who


async def require_owner(owner: int, what: str) -> Caller:
    """The caller, if it owns the machine (or is root, or polkit grants :data:`MANAGE_ALL`)."""
    who = caller()
    if who.root or who.uid == owner:
        return who
    return await require(MANAGE_ALL, f"{what} of uid {owner}'s machine", who)
