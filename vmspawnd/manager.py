# SPDX-License-Identifier: LGPL-2.1-or-later
"""Manager: the daemon's set of machines — definitions on disk, runs, adoption, events.

Definitions live in ``<state_dir>/machines/<name>.json`` (written atomically).  Runs live in
``<runtime_base>/<name>/``; a restarted daemon re-adopts every QEMU that still runs there and
ends whatever an interrupted start left behind.  Stopping the daemon never stops a VM.

Every command on a machine goes through that Machine's lock (see machine.py); Remove also
checks, under the lock, that the machine it removes is the one it looked up, so a stale Remove
can never delete a newer machine of the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmspawnd import messages
from vmspawnd.config import MachineConfig
from vmspawnd.console import ConsoleRelay
from vmspawnd.definitionlog import DefinitionLog
from vmspawnd.errors import ConfigError, HostError, LimitReached, MachineExists, NoSuchMachine, StartError, WrongState
from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.log import get_logger
from vmspawnd.machine import ACTIVE, DEFAULT_STOP_TIMEOUT, Control, Machine, State
from vmspawnd.plan import LaunchPlan, plan_launch
from vmspawnd.proc import release_free_heap
from vmspawnd.run import Run, qemu_of_record
from vmspawnd.runrecord import RUNNING, RunRecord
from vmspawnd.runtime import RECORDS_SUFFIX, RuntimeDir, make_base, sweep_discarded
from vmspawnd.settings import JSON_FIELDS, config_from_json, config_to_json, json_field_name
from vmspawnd.spares import Spares
from vmspawnd.storage import (
    FileAhead,
    encode_json,
    read_json,
    remove_leftover_temps,
    write_bytes_atomic,
    write_json_atomic,
)
from vmspawnd.systemd.fdstore import FdStore
from vmspawnd.values import ConsoleMode, validate_machine_name

log = get_logger()

EVENT_QUEUE_LIMIT = 1024
STATE_SUFFIX = ".state"  # <name>.state beside <name>.json: what the machine showed, for the next daemon
PERSISTED_EVENTS = ("starting", "running", "stopping", "stopped", "failed")
#: what one user but root may define (the daemon keeps it, in root's state dir and in memory: no quota of
#: theirs counts it): machines, and bytes of definitions (their credentials are in them)
MAX_MACHINES_PER_USER = 256
MAX_DEFINITIONS_PER_USER = 64 << 20
COLLECT_AFTER_RUNS = 0.5  # s after a run ended: its last tasks have finished, and runs ending together wait for one


@dataclass(frozen=True)
class Event:
    """One lifecycle event: created, starting, running, ready, status, stopping, stopped, failed, removed."""

    machine: str
    kind: str
    timestamp: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Entry:
    """A defined machine and its Machine."""

    config: MachineConfig
    machine: Machine
    definition_error: str | None = None  # why its definition on disk cannot be used (it stays listed)
    definition_size: int | None = None  # bytes of its definition on disk, once known
    owner: int = 0  # the uid that created it (it may control it)

    @property
    def run_as(self) -> int:
        """The uid its QEMU and helpers run as (the owner's, or root's for one that needs privileges)."""
        return self.machine.run_as
    shown_reply: Any = None  # the front end's last reply for it: (what it was made from, the reply)

    @property
    def console(self) -> ConsoleRelay | None:
        run = self.machine.active_run
        return run.console if run is not None else None


class Manager:
    """Owns every machine the daemon knows about."""

    def __init__(self, state_dir: Path, runtime_base: Path, fdstore: FdStore | None = None) -> None:
        self.state_dir = state_dir
        self.runtime_base = runtime_base
        self.machines: dict[str, Entry] = {}
        self._folded: dict[str, str] = {}  # each machine's name in lower case → its name (see _check_free)
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._collection: asyncio.TimerHandle | None = None  # a garbage collection after runs ended
        self.on_change: Callable[[], None] = lambda: None
        self.stopping = False
        self.spares = Spares.beside(runtime_base)  # a Start waits neither for an interpreter nor swtpm_setup
        self.fdstore = fdstore  # our service's, where runs keep their guests' notify listeners
        self._definition_ahead = FileAhead(self.definitions)  # nor a Create for its file to be made
        self._log: DefinitionLog | None = None  # what makes a Create durable (opened by load)

    @property
    def definitions(self) -> Path:
        return self.state_dir / "machines"

    # ---------------------------------------------------------------- load / shutdown
    async def load(self) -> None:
        """Read every definition and re-adopt the VMs that survived a previous daemon.  A definition
        that cannot be used stays listed (failed, with the reason) and its running VM is still
        re-adopted (with the configuration its run recorded); fields of a newer version are ignored."""
        self.definitions.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in remove_leftover_temps(self.definitions):
            log.info("removed a temporary file left by an earlier daemon", path=str(path))
        try:
            self._log = DefinitionLog.open(self.definitions)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            log.warning("no room for the definitions' log (or a read-only state dir): each Create syncs its own "
                        "file, more slowly", error=str(e))
        else:
            self._restore_logged(self._log.replay())
            await self._log.checkpoint()
        make_base(self.runtime_base)
        await asyncio.to_thread(sweep_discarded, self.runtime_base)  # (what runs that a crash cut short left)
        definitions = self._definition_files()
        definitions |= self._orphaned_runs(definitions)
        for stale in sorted(self.definitions.glob(f"*{STATE_SUFFIX}")):
            if stale.name.removesuffix(STATE_SUFFIX) not in definitions:  # (its definition went by hand)
                stale.unlink(missing_ok=True)  # so a machine created anew with the name never shows it
                log.info("removed the state of a machine whose definition is gone", path=str(stale))
        for name, path in definitions.items():
            entry = self._load_definition(name, path)
            saved = self._read_state(name)  # before adoption, which records a state of its own
            self._add(name, entry)
            try:
                adopted = await entry.machine.adopt(after=self._attach_console)
            except Exception as e:  # e.g. another process holds its runtime dir
                log.error("could not re-adopt VM", machine=name, error=str(e))
                entry.machine.mark_failed(f"could not re-adopt its running QEMU: {e}")
                continue
            if not adopted and entry.definition_error is not None:
                entry.machine.mark_failed(entry.definition_error)
            if saved is not None:
                self._restore_state(entry, adopted, *saved)
            elif not adopted and entry.machine.state is State.STOPPED:  # never started: stopped since its creation
                with contextlib.suppress(OSError):
                    entry.machine.since = path.stat().st_mtime
        if self.fdstore is not None:
            self.fdstore.forget_unclaimed()
        self.spares.prepare()
        self.on_change()

    def _restore_logged(self, logged: dict[str, bytes | None]) -> None:
        """Make the definition files what the log says they are (after a crash: a file written since the
        last checkpoint may be missing or torn, a removed one back).  The log wins over an edit by hand
        made since (the last second before the crash, see definitionlog.py)."""
        for name, data in logged.items():
            try:
                validate_machine_name(name, "name")
            except ConfigError:
                log.error("ignoring a record of the definitions' log whose name is no machine name", name=name)
                continue
            path = self._definition_path(name)
            try:
                on_disk: bytes | None = path.read_bytes()
            except FileNotFoundError:
                on_disk = None
            if on_disk == data:
                continue
            if data is None:
                path.unlink()
                log.info("removed a definition whose removal the log holds (a crash came before it was "
                         "durable)", machine=name)
            else:
                write_bytes_atomic(path, data)
                log.info("wrote a definition again from the log (a crash lost or tore its file)", machine=name)

    async def _checkpoint_definitions(self) -> None:
        """Make what the definitions' log holds durable in the files themselves, and empty the log."""
        if self._log is not None:
            await self._log.checkpoint()

    def _definition_files(self) -> dict[str, Path]:
        """name → definition file, for every file whose name is a machine name."""
        found = {}
        for path in sorted(self.definitions.glob("*.json")):
            try:
                validate_machine_name(path.stem, "name")
            except ConfigError as e:
                log.error("ignoring a definition whose file name is no machine name", path=str(path), error=str(e))
                continue
            found[path.stem] = path
        return found

    def _orphaned_runs(self, defined: dict[str, Path]) -> dict[str, Path]:
        """Machines whose definition went (removed by hand) while their VM ran, and which still run: name →
        the definition file they had.  They stay listed (running on the configuration their run recorded,
        root's to control) until they stop; the next reload forgets them then."""
        found = {}
        for records in sorted(self.runtime_base.glob(f"*{RECORDS_SUFFIX}")):
            name = records.name.removesuffix(RECORDS_SUFFIX)
            if name in defined:
                continue
            record = RunRecord.load(records)
            if record is None or record.phase != RUNNING:
                continue
            name = record.name or name  # (a long name's records are named after its hash: runtime.vm_dir_name)
            try:
                validate_machine_name(name, "name")
            except ConfigError:
                continue
            runtime = RuntimeDir(self.runtime_base, name)
            if name not in defined and runtime.records == records and qemu_of_record(record, runtime.path):
                found[name] = self._definition_path(name)
        return found

    async def reload(self) -> list[str]:
        """Read the definitions again (``systemctl reload vmspawnd``): a file added by hand defines a
        machine, a changed one applies from that machine's next start, a broken one says so, and a
        stopped machine whose file is gone is forgotten.  Running VMs are never touched.  Returns
        what changed, one line per machine.  Clients' Creates and Removes go on meanwhile (each step
        waits for a machine's lock): each file is looked at again when its machine's turn comes."""
        await self._checkpoint_definitions()  # the files as they are now are what a replay starts from
        on_disk = self._definition_files()
        changes = []
        for name, path in on_disk.items():
            if not path.exists():  # removed by a client since: not to be defined again
                continue
            fresh = self._load_definition(name, path)
            entry = self.machines.get(name)
            if entry is None:
                self._add(name, fresh)
                if fresh.definition_error is not None:
                    fresh.machine.mark_failed(fresh.definition_error)
                log.info("machine created", machine=name, message_id=messages.CREATED, by="reload")
                self._publish(name, "created", {})
                changes.append(f"{name}: defined")
            elif await self._redefine(entry, fresh):
                changes.append(f"{name}: definition changed" + (" (broken)" if entry.definition_error else ""))
        for name, entry in list(self.machines.items()):
            if name not in on_disk and await self._forget(name, entry):
                changes.append(f"{name}: forgotten (its definition is gone)")
        self.on_change()
        return changes

    async def _redefine(self, entry: Entry, fresh: Entry) -> bool:
        """Take a re-read definition for ``entry``; False if nothing changed."""
        machine = entry.machine
        async with machine.lock:
            if machine.removed or (fresh.config == entry.config and fresh.definition_error == entry.definition_error
                                   and fresh.owner == entry.owner and fresh.run_as == entry.run_as):
                return False
            was_broken = entry.definition_error
            entry.definition_error = fresh.definition_error
            if fresh.definition_error is None:
                entry.config = machine.config = fresh.config
                if (fresh.owner, fresh.run_as) != (entry.owner, machine.run_as):  # (commands authorized for
                    machine.ownership += 1  # the old ones and waiting for the lock are refused)
                entry.owner, machine.run_as = fresh.owner, fresh.run_as
            if machine.state in ACTIVE:
                return True  # the run keeps what it started with
            if fresh.definition_error is not None:
                machine.mark_failed(fresh.definition_error)
            elif was_broken is not None and machine.failure == was_broken:
                machine.restore(State.STOPPED, time.time(), None, None, None)
        log.info("machine definition re-read", machine=entry.config.name, broken=entry.definition_error)
        return True

    async def _forget(self, name: str, entry: Entry) -> bool:
        """A machine whose definition file is gone: forgotten unless its VM runs."""
        machine = entry.machine
        async with machine.lock:
            if machine.removed or self._definition_path(name).exists():  # (a client's Create since)
                return False
            if machine.state in ACTIVE:
                log.warning("its definition file is gone; the VM keeps running (remove it once stopped)",
                            machine=name)
                return False
            machine.removed = True
            self._drop(name)
            self._state_path(name).unlink(missing_ok=True)
        log.info("machine removed", machine=name, message_id=messages.REMOVED, by="reload")
        self._publish(name, "removed", {})
        return True

    def _load_definition(self, name: str, path: Path) -> Entry:
        """The machine a definition file describes; one that cannot be used is kept, marked broken."""
        try:  # only the definition itself: a missing disk must not make us forget a machine
            data = read_json(path)
            stored = data["config"]
            unknown = sorted(set(stored) - set(JSON_FIELDS)) if isinstance(stored, dict) else []
            if unknown:
                log.warning("ignoring fields of a newer version in a definition (kept on disk)", machine=name,
                            fields=",".join(unknown))
            entry = self._new_entry(config_from_json(name, stored, strict=False))
            entry.owner = _uid(data.get("owner"))
            entry.machine.run_as = _uid(data.get("runAs"))  # definitions without it ran as root
            return entry
        except FileNotFoundError:
            reason = f"its definition {path} is gone (removed while the VM ran)"
            log.error("the definition of a running VM is gone; the machine stays listed while it runs", machine=name,
                      path=str(path))
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
            reason = f"its definition {path} cannot be used: {e}"
            log.error("a machine definition cannot be used; the machine stays listed", machine=name, error=str(e))
        # a running VM: its run knows its configuration
        recorded = RunRecord.load(RuntimeDir(self.runtime_base, name).records)
        config = MachineConfig(name=name)
        if recorded is not None and recorded.config is not None:
            with contextlib.suppress(ConfigError, ValueError, TypeError):
                config = config_from_json(name, recorded.config, strict=False)
        entry = self._new_entry(config)
        entry.definition_error = reason
        if recorded is not None:
            entry.machine.run_as = recorded.uid  # (its owner, unknown, is root: only root controls it)
        return entry

    async def shutdown(self) -> None:
        """Detach from every running VM (they keep running) and end all event streams."""
        self.stopping = True
        # all at once: each waits for a command in progress on its machine (a start is undone first)
        await asyncio.gather(*(entry.machine.detach() for entry in list(self.machines.values())))
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        self.spares.close()
        self._definition_ahead.close()
        if self._log is not None:
            try:
                await self._log.checkpoint()
            except OSError as e:  # (the log keeps them: the next daemon makes them durable)
                log.error("could not make the latest definitions durable", error=str(e))
            self._log.close()
            self._log = None
        if self._collection is not None:
            self._collection.cancel()

    # ---------------------------------------------------------------- events
    def subscribe(self) -> asyncio.Queue[Event | None]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(EVENT_QUEUE_LIMIT)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event | None]) -> None:
        self._subscribers.discard(queue)

    def _publish(self, name: str, kind: str, data: dict[str, Any]) -> None:
        event = Event(name, kind, time.time(), dict(data))
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a subscriber that does not read loses its stream, not our memory
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)
        if kind in ("running", "stopped", "failed", "ready", "removed"):
            self.on_change()
        if kind in ("stopped", "failed"):
            self._collect_garbage_soon()
        if kind in PERSISTED_EVENTS and name in self.machines:
            entry = self.machines[name]
            if kind == "starting":  # kept off the way to QEMU's exec: written once QEMU runs
                if (run := entry.machine.run) is not None:
                    run.after_exec(lambda: self._save_state_if_defined(name, entry))
            else:
                self._save_state(entry)

    def _collect_garbage_soon(self) -> None:
        """Collect cyclic garbage, and give the C heap's free memory back, shortly after runs end (once
        for runs ending together).  An ended run leaves cycles (tasks, futures, exceptions and their
        frames) that the collector would reach only some runs later; meanwhile every run's peak takes
        fresh memory, which the allocator keeps (bench/notes.md, sessions 15 and 25).  A collection is
        cheap here: what the daemon made at start-up is frozen, so it walks only what was made since."""
        if self._collection is None:
            self._collection = asyncio.get_running_loop().call_later(COLLECT_AFTER_RUNS, self._collect_garbage)

    def _collect_garbage(self) -> None:
        self._collection = None
        gc.collect()
        release_free_heap()  # (≈ 0.5 ms, once for runs ending together)

    # ---------------------------------------------------------------- state across restarts
    def _state_path(self, name: str) -> Path:
        return self.definitions / f"{name}{STATE_SUFFIX}"

    def _definition_path(self, name: str) -> Path:
        return self.definitions / f"{name}.json"

    def _save_state_if_defined(self, name: str, entry: Entry) -> None:
        """The state of ``entry``, as it is now, unless the machine was removed meanwhile."""
        if self.machines.get(name) is entry:
            self._save_state(entry)

    def _save_state(self, entry: Entry) -> None:
        """Keep what clients see (state, since, outcome, the guest's last status) for the next daemon."""
        m = entry.machine
        try:  # not durably: after a crash of the host the next daemon says how much it does not know
            write_json_atomic(self._state_path(entry.config.name), {
                "state": m.state.value, "since": m.since, "failure": m.failure, "exitStatus": m.exit_status,
                "status": m.guest_status, "warnings": m.warnings}, durable=False)
        except OSError as e:
            log.warning("cannot save the machine's state", machine=entry.config.name, error=str(e))

    def _read_state(self, name: str) -> tuple[State, float, dict[str, Any]] | None:
        try:
            saved = read_json(self._state_path(name))
            return State(saved["state"]), float(saved["since"]), saved
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _restore_state(self, entry: Entry, adopted: bool, state: State, since: float, saved: dict[str, Any]) -> None:
        """Bring back what the previous daemon showed: a stopped or failed machine's outcome as it
        was, a running one's ``since``; a VM that ended while no daemon watched says so."""
        m = entry.machine
        if adopted:
            if state in (State.RUNNING, State.STOPPING):
                m.since = since
                self._save_state(entry)
            return
        if m.state is not State.STOPPED or entry.definition_error is not None:
            return  # what happened at load (an interrupted start undone, a broken definition) is newer
        status = saved.get("status") if isinstance(saved.get("status"), str) else None
        if state in (State.STOPPED, State.FAILED):
            exit_status = saved.get("exitStatus") if isinstance(saved.get("exitStatus"), int) else None
            failure = saved.get("failure") if isinstance(saved.get("failure"), str) else None
            warnings = saved.get("warnings")
            m.restore(state, since, failure, exit_status, status,
                      [w for w in warnings if isinstance(w, str)] if isinstance(warnings, list) else None)
        else:
            m.restore(State.FAILED, since, "it ended while vmspawnd was not running; how is not known", None,
                      status)

    # ---------------------------------------------------------------- operations
    def _new_entry(self, config: MachineConfig) -> Entry:
        name = config.name
        machine = Machine(config, runtime_base=self.runtime_base, die_with_parent=False, console_socket=True,
                          spares=self.spares, fdstore=self.fdstore,
                          on_event=lambda kind, data: self._publish(name, kind, data))
        machine.closing = self.stopping  # (one defined once the stop began was not let go of: it must not run)
        return Entry(config, machine)

    def get(self, name: str) -> Entry:
        try:
            return self.machines[name]
        except KeyError:
            raise NoSuchMachine(name) from None

    def plan(self, config: MachineConfig, identity: Identity = ROOT) -> LaunchPlan:
        """What this host offers ``config`` now, looked at as ``identity`` (the user it would run as);
        ConfigError names the JSON field."""
        self._check_free(config.name)
        if config.console in (ConsoleMode.NATIVE, ConsoleMode.GUI):
            raise ConfigError("console", config.console.value,
                              "the daemon offers interactive, read-only or headless consoles")
        try:
            with acting_as(identity):
                return plan_launch(config)  # what it names exists now (and is looked at again at each start)
        except ConfigError as e:
            raise ConfigError(json_field_name(e.field), e.value, e.reason) from None

    def create(self, config: MachineConfig, owner: int = 0, run_as: int = 0, plan: LaunchPlan | None = None) -> Entry:
        """Define a machine of ``owner`` that runs as ``run_as`` and persist its definition (nothing is
        kept if that fails); ``plan``: what :meth:`plan` said (else it is asked now)."""
        self._check_free(config.name)
        if plan is None:
            self.plan(config, Identity.of_uid(run_as))
        definition = {"name": config.name, "owner": owner, "runAs": run_as, "config": config_to_json(config)}
        encoded = encode_json(definition)
        if owner != 0:
            self._check_allowance(owner, len(encoded))
        entry = self._new_entry(config)
        entry.owner, entry.machine.run_as = owner, run_as
        path = self._definition_path(config.name)
        definitions_log = self._log if self._log is not None and self._log.has_room(config.name, encoded) else None
        try:
            self.definitions.mkdir(mode=0o700, parents=True, exist_ok=True)
            entry.definition_size = write_bytes_atomic(path, encoded, durable=definitions_log is None,
                                                      ahead=self._definition_ahead)
        except OSError as e:
            raise HostError(f"cannot save the definition of {config.name}", e) from e
        if definitions_log is not None:
            try:
                definitions_log.created(config.name, encoded)  # (durable once this returns)
            except OSError as e:
                path.unlink(missing_ok=True)
                raise HostError(f"cannot save the definition of {config.name}", e) from e
        self._add(config.name, entry)
        log.info("machine created", machine=config.name, message_id=messages.CREATED)
        self._publish(config.name, "created", {})
        return entry

    def _check_allowance(self, owner: int, adding: int) -> None:
        """Refuse a machine of ``owner`` (not root) whose definition of ``adding`` bytes would give them
        more than :data:`MAX_MACHINES_PER_USER` machines or :data:`MAX_DEFINITIONS_PER_USER` bytes."""
        theirs = [entry for entry in self.machines.values() if entry.owner == owner]
        if len(theirs) >= MAX_MACHINES_PER_USER:
            raise LimitReached("machines", f"uid {owner} has {len(theirs)} machines, as many as a user but root "
                               "may have; remove one first")
        used = sum(self._definition_size(entry) for entry in theirs)
        if used + adding > MAX_DEFINITIONS_PER_USER:
            raise LimitReached("definitions", f"uid {owner}'s definitions would take {used + adding} bytes, more "
                               f"than the {MAX_DEFINITIONS_PER_USER} a user but root may have (credentials count)")

    def _definition_size(self, entry: Entry) -> int:
        if entry.definition_size is None:
            try:
                entry.definition_size = self._definition_path(entry.config.name).stat().st_size
            except OSError:
                entry.definition_size = 0
        return entry.definition_size

    def _check_free(self, name: str) -> None:
        if name in self.machines or self._definition_path(name).exists():
            raise MachineExists(name)  # never overwrite a definition, even one we could not load
        other = self._folded.get(name.lower())
        if other is not None:  # ssh lowercases host names: an address naming MyVM's socket would reach myvm's
            raise ConfigError("name", name, f"differs from machine {other}'s only in case, which ssh does not "
                              "tell apart (it lowercases host names, and so a vsock address)")

    def _add(self, name: str, entry: Entry) -> None:
        self.machines[name] = entry
        self._folded.setdefault(name.lower(), name)

    def _drop(self, name: str) -> None:
        del self.machines[name]
        if self._folded.get(name.lower()) == name:
            del self._folded[name.lower()]
            for other in self.machines:  # (two loaded from disk may differ only in case: the other stays known)
                if other.lower() == name.lower():
                    self._folded[other.lower()] = other

    def get_exactly(self, name: str, expected: Entry | None) -> Entry:
        """The machine ``name``; if ``expected`` is given, that very one (not a newer one of the name)."""
        entry = self.get(name)
        if expected is not None and entry is not expected:
            raise NoSuchMachine(name)
        return entry

    async def start(self, name: str, expected: Entry | None = None, authorized: int | None = None) -> Entry:
        """Start a machine; raises StartError / ConfigError with the reason if it fails.  ``expected``: the
        machine the caller looked up (not a newer one of the name); ``authorized``: its
        :attr:`Machine.ownership` when the caller was authorized (see :meth:`Machine.check_authorized`);
        the same for the other commands."""
        entry = self.get_exactly(name, expected)
        if entry.definition_error is not None:
            raise StartError(entry.definition_error + " (fix or remove it)")
        await entry.machine.start(after=self._attach_console, authorized=authorized)
        return entry

    async def _attach_console(self, run: Run) -> None:
        """Connect the console relay; a VM without a working console still runs (and says why)."""
        config = run.config
        if config.console not in (ConsoleMode.INTERACTIVE, ConsoleMode.READ_ONLY):
            return
        relay = ConsoleRelay(run.runtime.path / "console.sock", read_only=config.console is ConsoleMode.READ_ONLY,
                             identity=run.identity)
        try:
            await relay.connect()
        except OSError as e:
            log.warning("the VM's console is not available", machine=config.name, error=str(e))
            return
        run.console = relay
        run.on_cleanup_async(relay.close)

    async def stop(self, name: str, timeout: float = DEFAULT_STOP_TIMEOUT, expected: Entry | None = None,
                   authorized: int | None = None) -> Entry:
        entry = self.get_exactly(name, expected)
        await entry.machine.stop(timeout, authorized)
        return entry

    async def kill(self, name: str, sig: int | None = None, expected: Entry | None = None,
                   authorized: int | None = None) -> Entry:
        entry = self.get_exactly(name, expected)
        await entry.machine.kill(sig=sig, authorized=authorized)
        return entry

    async def control(self, name: str, what: Control, expected: Entry | None = None,
                      authorized: int | None = None) -> Entry:
        entry = self.get_exactly(name, expected)
        await entry.machine.control(what, authorized)
        return entry

    async def remove(self, name: str, expected: Entry | None = None, authorized: int | None = None) -> None:
        """Forget a stopped machine: exactly the one looked up, never a newer one of that name."""
        entry = self.get_exactly(name, expected)
        machine = entry.machine
        async with machine.lock:
            if machine.removed or self.machines.get(name) is not entry:
                raise NoSuchMachine(name)
            machine.check_authorized(authorized)
            if machine.state not in (State.STOPPED, State.FAILED):
                raise WrongState(name, machine.state.value, "stop it before removing it")
            try:
                if self._log is not None and not self._log.removed(name):  # (no room: the log emptied first)
                    await self._log.checkpoint()
                self._definition_path(name).unlink(missing_ok=True)
                self._state_path(name).unlink(missing_ok=True)
            except OSError as e:
                raise HostError(f"cannot remove the definition of {name}", e) from e
            machine.removed = True
            self._drop(name)
        log.info("machine removed", machine=name, message_id=messages.REMOVED)
        self._publish(name, "removed", {})

    def running_count(self) -> int:
        return sum(1 for e in self.machines.values() if e.machine.state is State.RUNNING)


def _uid(value: Any) -> int:
    """A uid as stored in a definition (anything else: root)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


__all__ = ["Event", "Manager", "MachineExists", "NoSuchMachine", "StartError", "WrongState"]
