# SPDX-License-Identifier: LGPL-2.1-or-later
"""Ask polkit whether a process may do an action (``CheckAuthorization`` over D-Bus, dbus-fast).

The subject is the caller's process (pid, start time, uid), as machined does it, so polkit's
rules and its "active local session" defaults apply to the real caller.  The start time is the one
read when the caller connected; a process that no longer runs with it (it ended, and its pid may
be another's by now) is refused, before asking and after the answer.  No interaction is
asked for (a daemon has no agent to ask through).  Anything but a clear yes -- polkit not
running, the bus not reachable, an error -- is a no: nothing is ever allowed by default.
"""

from __future__ import annotations

import asyncio

from vmspawnd.log import get_logger
from vmspawnd.proc import process_start_time
from vmspawnd.systemd.bus import open_bus

log = get_logger()

AUTHORITY = ("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
             "org.freedesktop.PolicyKit1.Authority")


async def authorized(action: str, pid: int, uid: int, start_time: int, timeout: float = 10.0) -> bool:
    """True only if polkit says the process ``pid`` of ``uid``, started at ``start_time``, may do
    ``action`` now, and that process ran all along."""
    if process_start_time(pid) != start_time:
        log.info("the caller has ended; denying", action=action, pid=pid)
        return False
    try:
        bus = await open_bus(timeout)  # (dbus-fast on first use: a root-only daemon never asks polkit)
    except Exception as e:  # noqa: BLE001 - no bus, no authorization
        log.warning("cannot ask polkit: no system bus", action=action, error=str(e))
        return False
    from dbus_fast import Message, MessageType, Variant

    try:
        destination, path, interface = AUTHORITY
        subject = ["unix-process", {"pid": Variant("u", pid), "start-time": Variant("t", start_time),
                                    "uid": Variant("i", uid)}]
        reply = await asyncio.wait_for(bus.call(Message(
            destination=destination, path=path, interface=interface, member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us", body=[subject, action, {}, 0, ""])), timeout)
    except Exception as e:  # noqa: BLE001 - polkit gone: a no
        log.warning("cannot ask polkit", action=action, error=str(e))
        return False
    finally:
        bus.disconnect()
    if reply is None or reply.message_type == MessageType.ERROR:
        log.info("polkit did not answer; denying", action=action,
                 error=reply.error_name if reply is not None else None)
        return False
    is_authorized, _challenge, _details = reply.body[0]
    if is_authorized and process_start_time(pid) != start_time:  # polkit may have looked at another
        log.info("the caller ended while polkit was asked; denying", action=action, pid=pid)
        return False
    return bool(is_authorized)
