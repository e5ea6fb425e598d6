# SPDX-License-Identifier: LGPL-2.1-or-later
"""The VM's scope: QEMU (only QEMU) in ``machine-<name>.scope`` in ``--slice=`` with ``--property=``.

The scope is created around the exec-late launcher's PID before it execs QEMU (see
launcher.py), so QEMU never runs outside it and the daemon never enters it.
"""

from __future__ import annotations

from typing import Any

from vmspawnd.systemd.properties import Property, parse_properties
from vmspawnd.systemd.units import SystemdManager, Variant


def unit_name_escape(text: str) -> str:
    """systemd's unit name escaping of one component: '-' and anything unusual become \\xNN."""
    out = []
    for i, c in enumerate(text):
        if c.isascii() and (c.isalnum() or c in ":_" or (c == "." and i > 0)):
            out.append(c)
        else:
            out.extend(f"\\x{b:02x}" for b in c.encode())
    return "".join(out)


def scope_unit_name(machine: str) -> str:
    """The name machined itself would give the VM's scope."""
    return f"machine-{unit_name_escape(machine)}.scope"


def scope_properties(machine: str, pid: int, slice_name: str, properties: list[Property]) -> list[tuple[str, Any]]:
    """The scope's ``a(sv)`` properties for StartTransientUnit: ``pid`` in it, ``properties`` applied."""
    return [
        ("PIDs", Variant("au", [pid])),
        ("Description", Variant("s", f"Virtual Machine {machine}")),
        ("Slice", Variant("s", slice_name)),
        ("CollectMode", Variant("s", "inactive-or-failed")),
        ("AddRef", Variant("b", True)),
        *((name, Variant(signature, value)) for name, signature, value in properties),
    ]


async def allocate_scope(manager: SystemdManager, machine: str, pid: int, slice_name: str,
                         assignments: tuple[str, ...]) -> str:
    """Start the scope with ``pid`` in it; return the unit name (raises UnitStartError)."""
    unit = scope_unit_name(machine)
    await manager.start_transient_unit(unit, scope_properties(machine, pid, slice_name,
                                                              parse_properties(assignments)))
    return unit
