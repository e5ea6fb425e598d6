# SPDX-License-Identifier: LGPL-2.1-or-later
"""Opening a D-Bus connection (dbus-fast), for systemd's manager, machined without varlink, and polkit.

dbus-fast is imported on first use (a host without systemd, and a root-only daemon, never load it),
and after :mod:`hashlib` is imported without OpenSSL (vmspawnd/lean.py): dbus-fast imports hashlib,
which would otherwise map libcrypto into the daemon for good.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from vmspawnd import lean


def load_dbus_fast() -> None:
    """Import dbus-fast now (e.g. before a timeout's clock starts), hashlib first without OpenSSL."""
    lean.hashlib()
    import dbus_fast.aio  # noqa: F401


async def open_bus(timeout: float | None, bus_type: str = "system", address: str | None = None, *,
                   unix_fds: bool = False) -> Any:
    """A connected ``dbus_fast.aio.MessageBus``: the ``system`` or ``session`` bus, or the one at
    ``address``, within ``timeout`` seconds (None: no limit); what fails is raised, nothing left open.
    ``unix_fds``: its calls may pass file descriptors."""
    load_dbus_fast()
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    bus = MessageBus(bus_address=address, bus_type=BusType[bus_type.upper()],  # (its socket is made here)
                     negotiate_unix_fd=unix_fds)
    try:
        return await asyncio.wait_for(bus.connect(), timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            bus.disconnect()
        raise
