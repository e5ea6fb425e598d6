# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the daemon prepares ahead of need, so that a Start does not wait for it: an exec-late
launcher whose interpreter is already up (launcher.py; for a QEMU not spawned at once) and a
manufactured TPM state (services/tpmspares.py), each used once and replaced in the background; and
its connection to the service manager, kept for every start (systemd/units.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmspawnd.launcher import SpareLauncher
from vmspawnd.services.tpmspares import SpareTpmStates
from vmspawnd.systemd.units import SharedSystemd


@dataclass
class Spares:
    launcher: SpareLauncher
    tpm: SpareTpmStates
    systemd: SharedSystemd

    @classmethod
    def beside(cls, runtime_base: Path) -> Spares:
        """Spares whose files live next to the machines' runtime dirs (``<base>/../tpm-spares``)."""
        return cls(SpareLauncher(), SpareTpmStates(runtime_base.parent / "tpm-spares"), SharedSystemd())

    def prepare(self) -> None:
        """Start the first spare launcher where every start needs one (where systemd runs, QEMU starts
        in its scope).  Elsewhere only a VM run as another user needs one, and a start that took one
        starts the next; a TPM state, likewise, is made once a start has needed one."""
        if self.systemd.runs_here():
            self.launcher.refill()

    def close(self) -> None:
        self.launcher.close()
        self.tpm.close()
        self.systemd.close()
