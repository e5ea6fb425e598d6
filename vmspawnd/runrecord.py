# SPDX-License-Identifier: LGPL-2.1-or-later
"""``run.json``: what a run records in its records dir (see runtime.py) so that a later daemon finds it again.

The record is written before QEMU is exec'd (phase ``starting``: it names the launcher, which
becomes QEMU under the same pid) and updated as each helper starts, so a daemon killed at any
point leaves a record of every process it started.  A restarted daemon adopts a ``running``
run whose QEMU is still the same process; everything else a record names is ended by
:func:`end_leftovers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vmspawnd.futures import resolve
from vmspawnd.identity import ROOT, Identity
from vmspawnd.log import get_logger
from vmspawnd.proc import process_start_time, processes_using
from vmspawnd.qemu.vsock import HYBRID_SOCKET, GuestVsock, VsockBackend
from vmspawnd.runtime import RuntimeDir
from vmspawnd.snapshot import EphemeralCopy
from vmspawnd.storage import read_json, write_json_atomic
from vmspawnd.systemd.machined import unregister_quietly
from vmspawnd.systemd.units import connect_systemd

log = get_logger()

RECORD = "run.json"
COPY_RECORD = "ephemeral-copy"  # the path of the --ephemeral copy of --directory
STARTING, RUNNING = "starting", "running"
KILL_WAIT = 5.0


@dataclass
class HelperRecord:
    """One auxiliary service of a run: a transient unit, or a child process (pid + start time)."""

    what: str
    name: str
    pid: int = 0
    starttime: int | None = None
    unit: str | None = None
    log: str | None = None  # the file it logs to (swtpm's)


@dataclass
class RunRecord:
    """The contents of ``run.json``."""

    pid: int
    starttime: int | None
    phase: str = STARTING
    helpers: list[HelperRecord] = field(default_factory=list)
    units: list[str] = field(default_factory=list)  # the scope and helper units, as shown to users
    registered: bool = False
    #: the control socket machined was told of at registration; None: none (machined < 261 refuses
    #: it); "": not recorded (a record of a version that did not record it, when it was elsewhere)
    control_address: str | None = None
    ready: bool = False
    status: str | None = None
    guest_exit_status: int | None = None
    vsock_port: int | None = None
    vsock_cid: int | None = None
    vsock_backend: str | None = None  # VsockBackend (records of older versions: the kernel's, if a port is set)
    ssh_key: str | None = None  # --pass-ssh-key's private key
    tpm_state: str | None = None
    #: the machine's configuration (JSON) this run started with, without its credentials' values (a
    #: credential of up to 2 MiB would be written at each save; Describe shows their IDs alone)
    config: dict[str, Any] | None = None
    name: str | None = None  # the machine's (records of older versions: their directory's name says it)
    uid: int = 0  # the user QEMU and its helpers run as: uid, gid, supplementary groups
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the run's (Run.warnings), shown by the next daemon too

    def identity(self) -> Identity:
        """Whom this run's QEMU runs as (as recorded: its account may be gone since)."""
        return Identity(self.uid, self.gid, tuple(self.groups)) if self.uid else ROOT

    def vsock(self, runtime: Path) -> GuestVsock | None:
        """The run's vsock device as recorded (its fd, if any, now QEMU's alone)."""
        if self.vsock_cid is None:
            return None
        if self.vsock_backend == VsockBackend.VHOST_USER:
            return GuestVsock(VsockBackend.VHOST_USER, self.vsock_cid, socket=runtime / HYBRID_SOCKET)
        return GuestVsock(VsockBackend.KERNEL, self.vsock_cid)

    def save(self, directory: Path) -> None:
        """Atomically, not durably: the processes it names die with the machine, the record only has
        to outlive a killed daemon (which the page cache does)."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}  # asdict would deep-copy the config
        record["helpers"] = [asdict(helper) for helper in self.helpers]
        write_json_atomic(directory / RECORD, record, durable=False)

    @classmethod
    def load(cls, directory: Path) -> RunRecord | None:
        """The record in ``directory``, or None if there is none (or it is unreadable)."""
        try:
            data: dict[str, Any] = read_json(directory / RECORD)
            helpers = [HelperRecord(**h) for h in data.get("helpers") or []]
            return cls(
                pid=int(data["pid"]), starttime=data.get("starttime"),
                phase=data.get("phase", RUNNING),  # records without a phase were written after exec
                helpers=helpers, units=[str(u) for u in data.get("units") or []],
                registered=bool(data.get("registered")), control_address=data.get("control_address", ""),
                ready=bool(data.get("ready")), status=data.get("status"),
                guest_exit_status=data.get("guest_exit_status", data.get("guestExitStatus")),
                vsock_port=data.get("vsock_port", data.get("vsockPort")),
                vsock_cid=data.get("vsock_cid", data.get("vsockCid")),
                vsock_backend=data.get("vsock_backend"), ssh_key=data.get("ssh_key"),
                tpm_state=data.get("tpm_state", data.get("tpmState")),
                config=data.get("config") if isinstance(data.get("config"), dict) else None,
                name=data.get("name") if isinstance(data.get("name"), str) else None,
                uid=int(data.get("uid", 0)), gid=int(data.get("gid", 0)),
                groups=[int(g) for g in data.get("groups") or []],
                warnings=[w for w in data.get("warnings") or [] if isinstance(w, str)])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def same_process(pid: int, starttime: int | None) -> bool:
    """True if ``pid`` still is the process that had ``starttime`` (not a reused pid)."""
    return pid > 0 and starttime is not None and process_start_time(pid) == starttime


async def kill_process(pid: int, starttime: int | None) -> bool:
    """SIGKILL the process if it is still the recorded one; wait (a little) until it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not same_process(pid, starttime):  # checked after the pidfd pins the process
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        loop.add_reader(pidfd, lambda: resolve(gone))
        try:
            await asyncio.wait_for(gone, KILL_WAIT)
        except TimeoutError:
            log.warning("a leftover process did not die", pid=pid)
        finally:
            loop.remove_reader(pidfd)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


async def end_leftovers(runtime: RuntimeDir, directory: Path | None) -> None:
    """End whatever an interrupted earlier run left in ``runtime`` (which the caller holds
    locked): its QEMU or launcher, helpers, units, registration, ephemeral copy and files."""
    runtime_path = runtime.path
    entries = [e for d in (runtime_path, runtime.records) if d.is_dir() for e in d.iterdir() if e.name != ".lock"]
    if not entries:
        return
    name = runtime_path.name
    record = RunRecord.load(runtime.records)
    if record is not None:
        await kill_process(record.pid, record.starttime)
        for helper in record.helpers:
            if helper.unit is None:
                await kill_process(helper.pid, helper.starttime)
        units = list(dict.fromkeys([*record.units, *(h.unit for h in record.helpers if h.unit)]))
        units = [u for u in units if u.endswith((".service", ".scope"))]
        if units:
            await stop_units(units)
        if record.registered:
            await unregister_quietly(name)
    # a helper started in the instant before the record named it: its sockets are in our dir
    for pid in processes_using(runtime_path):
        await kill_process(pid, process_start_time(pid))
    copy = EphemeralCopy.recorded(runtime.records / COPY_RECORD, directory)
    if copy is not None:
        await copy.remove()
    log.info("ended the leftovers of an interrupted run", machine=name,
             pid=record.pid if record is not None else None)


async def stop_units(units: list[str]) -> None:
    """Stop these units (the last first); those already gone are fine."""
    systemd, why = await connect_systemd()
    if systemd is None:
        log.debug("not stopping recorded units", reason=why)
        return
    try:
        for unit in reversed(units):
            with contextlib.suppress(Exception):  # already gone (collected) is the common case
                await systemd.stop_unit(unit, timeout=30)
    finally:
        await systemd.aclose()
