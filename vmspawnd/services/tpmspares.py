# SPDX-License-Identifier: LGPL-2.1-or-later
"""Manufactured TPM states made ahead of need (the daemon's), for VMs whose TPM state is transient.

``swtpm_setup`` takes about half a second; a VM with ``--tpm-state=off`` (or ``auto`` without an
image) needs a fresh state at every start.  :class:`SpareTpmStates` keeps one state manufactured
in advance, in a root-only directory: a start moves it into the VM's runtime directory (copies it,
writing as the VM's user, for a VM of another user) and the next one is made in the background.
Every state comes from its own ``swtpm_setup`` run and is used once, so no two VMs ever share seeds
or keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from pathlib import Path

from vmspawnd.identity import Identity, acting_as
from vmspawnd.log import get_logger
from vmspawnd.services.runner import ServiceError
from vmspawnd.services.swtpm import manufacture

log = get_logger()

READY, MAKING, TAKEN = "ready", ".making", ".taken"
SETTLE = 2.0  # seconds after a start before the next state is made (QEMU and the guest boot first)


class SpareTpmStates:
    """One manufactured TPM state kept ready in ``directory`` (created root-only, 0700), from the
    first start that needed one on."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._making: asyncio.Task[None] | None = None

    def refill(self) -> None:
        """Start making the next state in the background, unless one is ready or being made."""
        if (self._making is not None and not self._making.done()) or (self.directory / READY).is_dir():
            return
        self._making = asyncio.get_running_loop().create_task(self._make(), name="spare TPM state")

    async def _make(self) -> None:
        making = self.directory / MAKING
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.rmtree(making, ignore_errors=True)
            making.mkdir(mode=0o700)
            if await manufacture(making):
                os.rename(making, self.directory / READY)
        except (OSError, ServiceError) as e:  # the next start manufactures its own, as before
            log.warning("cannot make a spare TPM state", error=str(e))
        finally:  # failed, not manufactured, or cancelled (the daemon stops): leave no half-made state
            shutil.rmtree(making, ignore_errors=True)

    def take_into(self, state_dir: Path, identity: Identity) -> bool:
        """Fill the empty ``state_dir`` (a run's transient TPM state, ``identity``'s) with the ready
        state: moved there for root's VMs (one rename), written as ``identity`` for another user's;
        False if none is ready (the caller manufactures one)."""
        taken = self.directory / TAKEN
        shutil.rmtree(taken, ignore_errors=True)
        try:
            os.rename(self.directory / READY, taken)  # claimed: no other start gets it
        except OSError:
            self._refill_soon()  # none yet: from now on this daemon keeps one ready
            return False
        made: list[Path] = []
        try:
            if not identity.switches:
                with contextlib.suppress(OSError):  # (else, e.g. on another file system, copied)
                    os.rename(taken, state_dir)  # (an empty directory is replaced)
                    return True
            with contextlib.ExitStack() as files:
                sources = []
                for entry in os.scandir(taken):
                    if entry.is_file(follow_symlinks=False):
                        sources.append((entry.name, files.enter_context(open(entry.path, "rb"))))
                with acting_as(identity):  # the VM's directory: its user's rights, its user's files
                    for name, source in sources:
                        fd = os.open(state_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, stat.S_IRUSR | stat.S_IWUSR)
                        made.append(state_dir / name)
                        with os.fdopen(fd, "wb") as target:
                            shutil.copyfileobj(source, target)
        except OSError as e:
            log.warning("cannot use the spare TPM state", error=str(e))
            with acting_as(identity):  # a half copy would look manufactured
                for path in made:
                    path.unlink(missing_ok=True)
            return False
        finally:
            shutil.rmtree(taken, ignore_errors=True)
            self._refill_soon()
        return True

    def _refill_soon(self) -> None:
        """Make the next state once the current start has gone on (it needs the CPU first)."""
        with contextlib.suppress(RuntimeError):  # no loop: nobody to make the next one
            asyncio.get_running_loop().call_later(SETTLE, self.refill)

    def close(self) -> None:
        """Stop making states (what is ready stays for the next daemon)."""
        if self._making is not None:
            self._making.cancel()
