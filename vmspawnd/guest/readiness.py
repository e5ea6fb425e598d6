# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the guest tells us (READY, STATUS, EXIT_STATUS) and what exit status a run ends with.

Pure logic, no I/O: :class:`Readiness` takes each notify message and says what changed, so the
run can emit events and persist what must survive a daemon restart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_STATUS = 512
STATUS_EVENTS_PER_SECOND = 10


@dataclass(frozen=True)
class Change:
    """The effect of one message: an event to emit (or None), and whether to persist the state."""

    event: str | None = None
    persist: bool = False
    warning: str | None = None


NOTHING = Change()


class Readiness:
    """The guest's READY/STATUS/EXIT_STATUS, with STATUS events and EXIT_STATUS writes limited to a few a second."""

    def __init__(self, ready: bool = False, status: str | None = None, exit_status: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ready = ready
        self.status = status
        self.exit_status = exit_status
        self._status_events = PerSecond(STATUS_EVENTS_PER_SECOND, clock)
        self._exit_writes = PerSecond(STATUS_EVENTS_PER_SECOND, clock)
        self._saved_exit_status = exit_status  # what the run record has (as far as we asked for it)
        self._warned_invalid = False

    def feed(self, key: str, value: str) -> Change:
        """Take one ``KEY=VALUE`` message from the guest."""
        if key == "READY" and value == "1":
            if self.ready:
                return NOTHING
            self.ready = True
            return Change("ready", persist=True)
        if key == "STATUS":
            status = value[:MAX_STATUS]
            if status == self.status:
                return NOTHING
            self.status = status  # kept in memory: a chatty guest must not make us fsync per line
            return Change("status") if self._status_events.counted() else NOTHING
        if key == "EXIT_STATUS":
            if value.isascii() and value.isdigit() and 0 <= int(value) <= 255:
                self.exit_status = int(value)
                if self.exit_status == self._saved_exit_status:
                    return NOTHING
                # (persisted a few times a second at most: a guest changing it all the time must not
                # make us write a file per line; one not written is written when it comes again)
                persist = self._exit_writes.counted()
                if persist:
                    self._saved_exit_status = self.exit_status
                return Change(persist=persist)
            if self._warned_invalid:
                return NOTHING
            self._warned_invalid = True  # (once a boot: a guest must not flood the log)
            return Change(warning=f"guest sent an invalid EXIT_STATUS {value[:32]!r} (further ones are ignored "
                          "silently)")
        return NOTHING



class PerSecond:
    """Counts what happens in one-second windows: :meth:`counted` is True for the first ``allowed``
    of each."""

    def __init__(self, allowed: int, clock: Callable[[], float]) -> None:
        self._allowed, self._clock = allowed, clock
        self._window, self._count = float("-inf"), 0

    def counted(self) -> bool:
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        self._count += 1
        return self._count <= self._allowed


#: QEMU's SHUTDOWN reason when a signal from outside (machinectl terminate/kill, systemctl stop of
#: its scope, kill) made it shut down: it then exits 0, as after a power-off
OUTSIDE_SIGNAL = "host-signal"


def exit_status(guest_exit_status: int | None, returncode: int | None, forced: bool,
                terminated: bool = False) -> int:
    """Guest's EXIT_STATUS, else 0 after a clean end, 1 if QEMU failed, had to be forced or was
    ``terminated`` by a signal from outside."""
    if guest_exit_status is not None:
        return guest_exit_status
    if returncode is None:
        return 1 if forced or terminated else 0
    return 1 if returncode != 0 or forced or terminated else 0


def failure(returncode: int | None, *, expected_end: bool, terminated: bool = False) -> str | None:
    """Why QEMU's end is a failure (None if it is not): an error exit, or a signal nobody here asked for."""
    if terminated and not expected_end:
        return "QEMU was terminated by a signal from outside vmspawnd (e.g. machinectl terminate or kill)"
    if returncode is None or returncode == 0:
        return None
    if returncode > 0:
        return f"QEMU exited with status {returncode}"
    if expected_end:
        return None
    why = f"QEMU killed by signal {signal_name(-returncode)}"
    if -returncode == signal.SIGRTMIN + 4:
        why += " (machinectl poweroff sends it where systemd-machined has no control socket: systemd < 261)"
    return why


def signal_name(number: int) -> str:
    """``SIGKILL``, ``SIGRTMIN+4``…, or the number."""
    if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
        return f"SIGRTMIN+{number - signal.SIGRTMIN}" if number != signal.SIGRTMIN else "SIGRTMIN"
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
