# SPDX-License-Identifier: LGPL-2.1-or-later
"""Machine: one VM's state and commands — define → start → running (→ ready) → stopping → stopped|failed.

A Machine holds the state clients see, emits lifecycle events, and has at most one current
:class:`~vmspawnd.run.Run`, made fresh by each start or adoption.  Every command takes the
machine's lock, so commands on one machine never interleave: a Start, Stop, Kill, adoption or
Remove sees the state the previous command left.  Stop and Kill pick their run under the lock
and then wait for *that* run to end, so they can never touch a later run; Reboot, Pause and Resume
pick it the same way.  Both ``vmspawn`` (one Machine in the foreground) and ``vmspawnd`` (many)
drive this class.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmspawnd import messages
from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError, HostError, NoSuchMachine, StartError, VmspawndError, WrongState
from vmspawnd.identity import Identity
from vmspawnd.launcher import QemuProcess
from vmspawnd.log import get_logger
from vmspawnd.plan import LaunchPlan
from vmspawnd.ptyfwd import Pty
from vmspawnd.run import Run, qemu_of_record
from vmspawnd.runrecord import COPY_RECORD, RECORD, RUNNING, RunRecord, end_leftovers
from vmspawnd.runtime import RuntimeDir
from vmspawnd.spares import Spares
from vmspawnd.systemd.fdstore import FdStore

log = get_logger()

DEFAULT_STOP_TIMEOUT = 10.0


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


ACTIVE = (State.STARTING, State.RUNNING, State.STOPPING)


class Control(enum.Enum):
    """What a running VM can be told besides stop and kill (its state stays running); the value is
    the word for it done."""

    REBOOT = "rebooted"
    PAUSE = "paused"
    RESUME = "resumed"


EventHandler = Callable[[str, dict[str, Any]], None]
AfterStart = Callable[[Run], Awaitable[None]]


class Machine:
    """One VM: its state, its events, its serialized commands and its current run."""

    def __init__(self, config: MachineConfig, *, runtime_base: Path, die_with_parent: bool = True,
                 on_event: EventHandler | None = None, console_socket: bool = False,
                 spares: Spares | None = None, fdstore: FdStore | None = None) -> None:
        self.config = config
        self.runtime = RuntimeDir(runtime_base, config.name)
        self.state = State.STOPPED
        self.since = time.time()
        self.run: Run | None = None  # the current run, or the last one
        self.guest_status: str | None = None
        self.exit_status: int | None = None
        self.failure: str | None = None
        self._warnings: list[str] = []  # the last run's, once it ended (Run.warnings)
        self.removed = False  # set (under the lock) by the daemon's Remove: commands then find no machine
        self.run_as = 0  # the uid QEMU and its helpers run as (the daemon's: the owner's, unless root's)
        self.ownership = 0  # bumped (under the lock) when a reload changes its owner or run_as: what a
        # command was authorized for is then no longer what it would act on (see check_authorized)
        self.lock = asyncio.Lock()
        self._starting: asyncio.Task[None] | None = None  # the current run's start, while it sets up
        self._start_settled: asyncio.Event | None = None  # the current start's outcome is the state (made per
        # start: an Event per defined machine cost ≈ 1 KB of a daemon's memory each)
        self.closing = False  # vmspawnd is stopping: no new run
        self._undone_start: tuple[Run, str, str] | None = None  # the run whose start was undone: error, reason
        self._die_with_parent = die_with_parent
        self._on_event = on_event or (lambda kind, data: None)
        self._console_socket = console_socket
        self._spares = spares
        self._fdstore = fdstore
        self.log = log.bind(machine=config.name)

    # ---------------------------------------------------------------- what clients see
    @property
    def active_run(self) -> Run | None:
        return self.run if self.state in ACTIVE else None

    @property
    def ready(self) -> bool:
        run = self.active_run
        return run is not None and run.readiness.ready and self.state is not State.STARTING

    @property
    def warnings(self) -> list[str]:
        """What went wrong in the current run, or else the last one, without failing it (Run.warnings)."""
        run = self.active_run
        return run.warnings if run is not None else self._warnings

    @property
    def paused(self) -> bool:
        """Its QEMU runs with the vCPUs stopped (Run.paused)."""
        run = self.active_run
        return run is not None and run.paused

    @property
    def suspended(self) -> bool:
        """Its guest suspended itself to RAM (Run.suspended)."""
        run = self.active_run
        return run is not None and run.suspended

    @property
    def qemu(self) -> QemuProcess | None:
        run = self.active_run
        return run.qemu if run is not None else None

    @property
    def pty(self) -> Pty | None:
        return self.run.pty if self.run is not None else None

    @property
    def units(self) -> list[str]:
        run = self.active_run
        return list(run.units) if run is not None else []

    @property
    def tpm_state_path(self) -> Path | None:
        return self.run.tpm_state_path if self.run is not None else None

    def _set_state(self, state: State, *, reported: bool = False, **data: Any) -> None:
        """Enter ``state``, log it (a failure the caller is told of anyway at info, else as a warning)
        and emit its event with ``data``."""
        self.state = state
        self.since = time.time()
        if state is State.RUNNING:
            self.log.info("VM started", message_id=messages.STARTED, pid=data.get("pid"),
                          adopted=data.get("adopted"))
        elif state is State.STOPPED:
            self.log.info("VM stopped", message_id=messages.STOPPED, exit_status=data.get("exit_status"))
        elif state is State.FAILED:
            (self.log.info if reported else self.log.warning)(
                "VM failed", message_id=messages.FAILED, reason=data.get("reason"), exit_status=data.get("exit_status"))
        self._emit(state.value, **data)

    def _emit(self, kind: str, **data: Any) -> None:
        try:
            self._on_event(kind, data)
        except Exception:
            self.log.exception("event handler failed", kind=kind)

    def _new_run(self, plan: LaunchPlan | None = None, launcher: QemuProcess | None = None) -> Run:
        return Run(self.config, self.runtime, on_event=self._run_event, die_with_parent=self._die_with_parent,
                   console_socket=self._console_socket, plan=plan,
                   identity=Identity.of_uid(self.run_as), spares=self._spares, launcher=launcher,
                   fdstore=self._fdstore)

    def _run_event(self, run: Run, kind: str, data: dict[str, Any]) -> None:
        """What a run reports; a run that is no longer current has nothing more to say."""
        if run is not self.run:
            return
        if kind == "status":
            self.guest_status = data["status"]
            self._emit("status", **data)
        elif kind == "ready":
            if self.state in (State.RUNNING, State.STOPPING):  # else emitted once the machine runs
                self._emit("ready", **data)
        elif kind == "reset":
            self.guest_status = None
            self._emit("reset", reason=data["reason"])
        elif kind in ("paused", "resumed", "suspended", "woke"):
            self._emit(kind, **data)
        elif kind == "ended":
            self.exit_status, self.failure, self._warnings = run.exit_status, run.failure, run.warnings
            if run.failure is not None:
                self._set_state(State.FAILED, reason=run.failure, exit_status=run.exit_status)
            else:
                self._set_state(State.STOPPED, exit_status=run.exit_status,
                                reason="; ".join(self.warnings) if self.warnings else None)

    def check_authorized(self, ownership: int | None) -> None:
        """Refuse a command authorized while the machine's :attr:`ownership` was ``ownership`` (None: not
        asked) if a reload changed its owner or run_as since.  Under the lock, or with nothing awaited
        between this check and the act."""
        if ownership is not None and ownership != self.ownership:
            raise WrongState(self.config.name, self.state.value, "its owner or the user it runs as changed (its "
                             "definition was reloaded) while this was being authorized; try again")

    def _check(self, *states: State, wanted: str, authorized: int | None = None) -> Run:
        """Under the lock: the current run, if the machine is in one of ``states`` (and the command
        was ``authorized`` for it as it is: :meth:`check_authorized`)."""
        if self.removed:
            raise NoSuchMachine(self.config.name)
        self.check_authorized(authorized)
        if self.state not in states or self.run is None:
            raise WrongState(self.config.name, self.state.value, wanted)
        return self.run

    # ---------------------------------------------------------------- commands
    async def start(self, after: AfterStart | None = None, plan: LaunchPlan | None = None,
                    launcher: QemuProcess | None = None, authorized: int | None = None) -> None:
        """Start a new run (``after`` runs once it is up, still under the lock) with the launch
        ``plan`` the caller made (else the run makes it) and the exec-late ``launcher`` it started
        (else the run starts one); ``authorized``: see :meth:`check_authorized`.  On failure everything
        acquired is released and the machine is failed with the reason."""
        async with self.lock:
            if self.removed:
                raise NoSuchMachine(self.config.name)
            self.check_authorized(authorized)
            if self.closing:  # (also a Start that waited for the lock while vmspawnd began to stop)
                raise WrongState(self.config.name, self.state.value, "vmspawnd is stopping")
            if self.state in ACTIVE:
                raise WrongState(self.config.name, self.state.value, "it must be stopped to start")
            run = self.run = self._new_run(plan, launcher)
            self.guest_status, self.exit_status, self.failure, self._warnings = None, None, None, []
            self._set_state(State.STARTING)
            settled = self._start_settled = asyncio.Event()
            starting = self._starting = asyncio.ensure_future(run.start())  # (a Kill may cancel it alone)
            try:
                await starting
            except BaseException as e:
                current = asyncio.current_task()
                undone = self._undone_start
                if undone and undone[0] is run and starting.cancelled() and not (current and current.cancelling()):
                    self.exit_status, self.failure = 1, None  # as after a Kill of the running VM
                    self._set_state(State.STOPPED, exit_status=1, reason=undone[2])
                    raise StartError(undone[1]) from None
                error = e
                if isinstance(e, OSError) and not isinstance(e, TimeoutError):  # the host refused something
                    where = f" ({e.filename})" if e.filename else ""
                    error = HostError(f"cannot start {self.config.name}{where}", e)
                reason = str(error) or type(error).__name__  # (a ConfigError's names its field and value)
                self.failure, self.exit_status = reason, 1
                self._set_state(State.FAILED, reported=True, reason=reason)  # the caller gets the error
                if error is not e:
                    raise error from e
                raise
            finally:
                self._starting = None
                settled.set()
            self._set_state(State.RUNNING, pid=run.pid)
            if run.readiness.ready:  # the guest was faster than QMP and registration: "ready" follows "running"
                self._emit("ready", **({"status": self.guest_status} if self.guest_status is not None else {}))
            if after is not None:
                await after(run)

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT, authorized: int | None = None) -> None:
        """Ask the guest to power off (ACPI over QMP); force it after ``timeout`` seconds."""
        async with self.lock:
            run = self._check(State.RUNNING, State.STOPPING, wanted="only a running machine can be stopped",
                              authorized=authorized)
            if self.state is State.RUNNING:
                self._set_state(State.STOPPING)
        await run.stop(timeout)  # bound to that run: a later run is never touched
        self._check_kept(run, "stopping")

    async def control(self, what: Control, authorized: int | None = None) -> None:
        """Reboot, pause or resume the running VM (QMP ``system_reset``, ``stop``, ``cont``).  Like Stop
        and Kill, bound to the run found under the lock; the run orders it with a Stop's press of the
        power button (which resumes a paused VM first: a paused guest cannot see the button)."""
        async with self.lock:
            run = self._check(State.RUNNING, wanted=f"only a running machine can be {what.value}",
                              authorized=authorized)
        act = {Control.REBOOT: run.reboot, Control.PAUSE: run.pause, Control.RESUME: run.resume}[what]
        try:
            await act()
        except WrongState:
            raise
        except Exception as e:
            if isinstance(e, ConnectionError) or not run.monitored:  # QEMU ends (a Kill, the guest powered off)
                raise WrongState(self.config.name, self.state.value, f"its QEMU ended before it was {what.value}") \
                    from e
            why = str(e) or type(e).__name__
            if isinstance(e, TimeoutError):  # (a stopped or hung QEMU: the command is still queued there)
                why += "; QEMU may still do it once it answers"
            raise VmspawndError(f"{self.config.name} could not be {what.value}: {why}") from e

    def _check_kept(self, run: Run, doing: str) -> None:
        """A daemon that shut down meanwhile let go of the VM (it still runs): say so, not success."""
        if run.detached:
            raise WrongState(self.config.name, self.state.value, f"vmspawnd stopped before {doing} it finished; "
                             "the VM still runs, and vmspawnd takes it over when it starts again")

    async def kill(self, forced: bool = True, sig: int | None = None, authorized: int | None = None) -> None:
        """End QEMU now (QMP quit, then SIGKILL), or only send it ``sig``.  A start still setting up
        (an --ephemeral copy, a TPM being made, QEMU not yet answering) is undone at once, QEMU with it."""
        name = self.config.name
        settled = self._start_settled
        self.check_authorized(authorized)  # (an undone start is not waited for under the lock)
        if sig is None and self._undo_start(f"{name} was killed while it was starting", "killed while it was starting"):
            assert settled is not None  # (made before the start it undid)
            await settled.wait()  # (not the lock: a Start queued behind that one is not this Kill's)
            return
        async with self.lock:
            run = self._check(State.RUNNING, State.STOPPING, wanted="only a running machine can be killed",
                              authorized=authorized)
        await run.kill(forced=forced, sig=sig)
        if sig is None:  # (a signal was sent whatever happened after)
            self._check_kept(run, "killing")

    def _undo_start(self, error: str, reason: str) -> bool:
        """Cancel the start still setting up, if there is one (True): its Start then fails with ``error``,
        the machine stopped for ``reason``.  Once per run: a second cancel would cut its undoing short."""
        starting = self._starting
        if starting is None or starting.done():
            return False
        assert self.run is not None
        if self.run.failing:  # it fails on its own: its clean-up is not cut short, its error is kept
            return True
        if self._undone_start is None or self._undone_start[0] is not self.run:
            self._undone_start = (self.run, error, reason)
            starting.cancel()
        return True

    async def wait(self) -> int:
        """Wait until the current run ended; return the exit status vmspawn should exit with."""
        run = self.run
        if run is not None:
            await run.ended.wait()
        return self.exit_status if self.exit_status is not None else 1

    def on_cleanup(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the current run's resources are released."""
        assert self.run is not None
        self.run.on_cleanup(callback)

    # ---------------------------------------------------------------- daemon restarts
    async def adopt(self, after: AfterStart | None = None) -> bool:
        """Re-attach to a QEMU that outlived a previous daemon (True), or end what an interrupted
        run left behind (False).  A failed adoption ends that QEMU and fails the machine."""
        async with self.lock:
            path = self.runtime.path
            if not path.is_dir():
                return False
            self.runtime.migrate((RECORD, COPY_RECORD))
            record = RunRecord.load(self.runtime.records)
            if record is None or record.phase != RUNNING or not qemu_of_record(record, path):
                self.runtime.lock()  # raises if someone else holds the machine
                try:
                    await end_leftovers(self.runtime, self.config.directory)
                finally:
                    self.runtime.remove()
                if record is not None and record.phase != RUNNING:
                    self.failure, self.exit_status = "vmspawnd stopped while starting it; the start was undone", 1
                    self._set_state(State.FAILED, reason=self.failure)
                return False
            run = self.run = self._new_run()
            try:
                await run.adopt(record)
            except ConfigError:  # someone else holds the machine's runtime dir: not ours to end
                raise
            except Exception as e:
                self.failure, self.exit_status = f"could not re-adopt its running QEMU, which was ended: {e}", 1
                self.log.error("could not re-adopt the VM", error=str(e))
                self._set_state(State.FAILED, reason=self.failure)
                return False
            self.guest_status = run.readiness.status
            self._set_state(State.RUNNING, pid=run.pid, adopted=True)
            if run.readiness.ready and not record.ready:  # it became ready while no daemon was listening
                self._emit("ready")
            self.log.info("re-adopted running VM", pid=run.pid)
            if after is not None:
                await after(run)
            return True

    async def detach(self) -> None:
        """Let go of a running VM without stopping it (daemon shutdown): it stays adoptable.  A start
        still setting up (e.g. a long --ephemeral copy) is undone instead of waited for; a Start that
        comes later is refused."""
        self.closing = True
        self._undo_start(f"vmspawnd stopped while {self.config.name} was starting",
                         "vmspawnd stopped while it was starting")
        async with self.lock:
            if self.run is not None:
                await self.run.detach()

    def restore(self, state: State, since: float, failure: str | None, exit_status: int | None,
                status: str | None, warnings: list[str] | None = None) -> None:
        """Show what an earlier daemon showed for this (not running) machine; no event is emitted."""
        self.state, self.since, self.failure, self.exit_status, self.guest_status = (
            state, since, failure, exit_status, status)
        self._warnings = warnings or []

    def mark_failed(self, reason: str) -> None:
        """Record that this machine is in no state we can drive."""
        self.failure = reason
        self._set_state(State.FAILED, reason=reason)
