# SPDX-License-Identifier: LGPL-2.1-or-later
"""Run auxiliary daemons (swtpm, virtiofsd): as transient systemd units, or as our own children.

One small interface, :class:`ServiceRunner`, with two implementations picked at run time by
:func:`choose_runner`:

* :class:`UnitRunner` asks systemd (``StartTransientUnit`` over D-Bus, dbus-fast) to run the
  helper as ``<name>.service``, bound to the VM's unit.  A transient unit runs in PID 1's mount
  namespace and environment, so argv[0] must be absolute and every path must be visible to
  PID 1.  The one file descriptor it can be handed is its standard input (below).
* :class:`ChildRunner` forks the helper as our own child (own session, stdin /dev/null,
  optional parent-death signal) and watches it through a pidfd.

Both wait until the helper is ready — its ``ready_path`` socket exists — and fail fast, with
the exit status (and the last lines of its log file, if it has one, and for children of its output),
if it dies first.  A helper that can take its listening socket ready-made (swtpm's ``fd=``,
virtiofsd's ``--fd=``) is *socket-activated* instead (``listen_on``): the runner binds the socket
and hands it over as the helper's standard input, so the helper is ready at once.  QEMU, started
meanwhile, connects at once too, and its first request waits in the socket until the helper has
come up and reads it: the two start side by side rather than one after the other (swtpm and
virtiofsd take 3–4 ms each to listen here).  One that fails then says so by its end
(:meth:`RunningService.failed_early`).  Its command line may name no path of the run's directory:
:func:`~vmspawnd.proc.processes_using` finds it by the socket it holds.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from vmspawnd.futures import resolve
from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.log import get_logger
from vmspawnd.pathwatch import appears
from vmspawnd.proc import parent_death_signal
from vmspawnd.systemd.units import (
    CONNECT_TIMEOUT,
    MANAGER_IFACE,
    SERVICE_IFACE,
    SYSTEMD_RUNTIME_DIR,
    UNIT_IFACE,
    DBusCallError,
    SystemdManager,
    UnitStartError,
    Variant,
    connect_systemd,
)

log = get_logger()

DEFAULT_READY_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 5.0
OUTPUT_TAIL_BYTES = 4096
OUTPUT_TAIL_LINES = 10
UNIT_RECHECK_INTERVAL = 5.0  # a helper unit's state is read at each change systemd signals, and this often anyway
UNIT_GONE_ERRORS = ("org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.systemd1.NoSuchUnit")
UNIT_TROUBLE_GRACE = 120.0  # seconds of D-Bus errors before we give up watching a unit
RUNNER_ENV = "VMSPAWND_SERVICE_RUNNER"  # "child" or "unit": skip the detection
LISTEN_BACKLOG = 16  # connections a socket-activated helper's socket holds before it accepts (QEMU makes one)

CLD_EXITED = 1


class ServiceError(RuntimeError):
    """An auxiliary service could not be started (or failed): the message says why."""

    def __init__(self, name: str, message: str, *, status: int | None = None, output: Sequence[str] = ()) -> None:
        self.name = name
        self.status = status
        self.output = tuple(output)
        text = f"{name}: {message}"
        if self.output:
            text += "\n  " + "\n  ".join(self.output)
        super().__init__(text)


@dataclass(frozen=True)
class ServiceSpec:
    """What to run: a name (``vmspawnd-<machine>-tpm``), an argv and how to tell it is ready."""

    name: str
    argv: tuple[str, ...]
    pass_fds: tuple[int, ...] = ()
    description: str = ""
    bound_to: str | None = None  # the VM's unit (BindsTo=/After=), transient units only
    ready_path: Path | None = None  # a socket the helper creates once it is ready
    listen_on: Path | None = None  # socket activation: a socket the runner makes, the helper's standard input
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    env: dict[str, str] = field(default_factory=dict)  # extra environment
    identity: Identity = ROOT  # the user it runs as (the VM's)
    log_path: Path | None = None  # a file the helper writes its errors to (instead of its output)

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        object.__setattr__(self, "pass_fds", tuple(self.pass_fds))
        if not self.argv or not self.argv[0].startswith("/"):
            raise ValueError(f"{self.name}: argv[0] must be an absolute path, got {self.argv[:1]}")
        if not self.name or "/" in self.name or self.name.endswith(".service"):
            raise ValueError(f"invalid service name {self.name!r}")
        if self.listen_on is not None and self.ready_path is not None:
            raise ValueError(f"{self.name}: a socket-activated helper is ready at once (no ready_path)")


def describe_status(status: int | None) -> str:
    """``exit status 1`` / ``killed by SIGKILL`` / ``unknown status`` (negative = signal)."""
    if status is None:
        return "unknown status"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


class RunningService(abc.ABC):
    """A started helper.  ``wait()`` resolves when it exits; ``stop()`` ends it."""

    name: str
    pid: int
    unit: str | None
    spec: ServiceSpec | None  # None for a helper adopted from an earlier daemon

    def __init__(self, spec: ServiceSpec | None, name: str = "", *, log_path: Path | None = None,
                 identity: Identity = ROOT) -> None:
        """A helper started from ``spec``, or (without one) adopted: ``name``, and its run's record's
        ``log_path`` and ``identity``."""
        self.spec = spec
        self.name = spec.name if spec is not None else name
        self.pid = 0
        self.unit = None
        self.returncode: int | None = None
        self._exited: asyncio.Task[int | None] | None = None
        self._stopping = False
        self.lost = False  # we can no longer observe it (bus gone): its end is unknown, not a failure
        self.log = log.bind(service=self.name)
        self.log_path = spec.log_path if spec is not None else log_path
        self.identity = spec.identity if spec is not None else identity  # whom its log file is read as

    async def wait(self) -> int | None:
        """Wait for the helper to end; its status (negative = killed by that signal) or None if unknown."""
        assert self._exited is not None
        if self._exited.cancelled():  # detached
            return None
        return await asyncio.shield(self._exited)

    @property
    def alive(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @abc.abstractmethod
    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """End the helper (SIGTERM, SIGKILL after ``timeout``); returns once it is gone."""

    def logged(self) -> list[str]:
        """The last lines of the helper's log file (``log_path``), read as the helper's user (the file
        is in a directory of theirs): [] where it has none, or it is not a regular file."""
        if self.log_path is None:
            return []
        try:
            with acting_as(self.identity):
                fd = os.open(self.log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                return _tail(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else []
            finally:
                os.close(fd)
        except OSError:
            return []

    def detach(self) -> None:
        """Stop watching the helper but leave it running (a daemon letting go of a live VM)."""
        if self._exited is not None and not self._exited.done():
            self._exited.cancel()

    def _failure_output(self) -> list[str]:
        return self.logged()

    def failed_early(self) -> str | None:
        """Why QEMU could not use this socket-activated helper, if it ended with an error (None while it
        runs, or after a clean end): QEMU, started beside it, is the one that found out."""
        if self.alive or not self.returncode:
            return None
        said = self._failure_output()
        return (f"{self.name} ended ({describe_status(self.returncode)}) before QEMU could use it"
                + (f": {' / '.join(said)}" if said else ""))

    async def _wait_ready(self) -> None:
        """Wait for ``spec.ready_path`` to appear (woken by inotify, else polling); fail fast if the
        helper exits first."""
        spec = self.spec
        assert self._exited is not None and spec is not None
        path = spec.ready_path
        if path is None:
            return
        if await appears(path, spec.ready_timeout, also=self._exited):
            self.log.debug("service ready", pid=self.pid, socket=str(path))
            return
        if self._exited.done():
            status = self._exited.result()
            raise ServiceError(self.name, f"exited before it was ready ({describe_status(status)})",
                               status=status, output=self._failure_output())
        raise ServiceError(self.name, f"did not create {path} within {spec.ready_timeout:g} s",
                           output=self._failure_output())


def _tail(fd: int) -> list[str]:
    """The last non-empty lines (up to OUTPUT_TAIL_LINES, from the last OUTPUT_TAIL_BYTES) of the file ``fd``."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, OUTPUT_TAIL_BYTES, max(0, size - OUTPUT_TAIL_BYTES))
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-OUTPUT_TAIL_LINES:]


class ServiceRunner(Protocol):
    """Starts auxiliary services; close it (``aclose``) after the services it started are stopped."""

    async def start(self, spec: ServiceSpec) -> RunningService: ...

    async def aclose(self) -> None: ...


def listening_socket(spec: ServiceSpec) -> socket.socket | None:
    """The socket of a socket-activated ``spec`` (``listen_on``; else None): bound as the helper's user
    (its file is theirs, mode 0600), listening, replacing a socket an earlier run left there."""
    if spec.listen_on is None:
        return None
    clear_stale_socket(spec.name, spec.listen_on)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with acting_as(spec.identity):
            listening.bind(os.fsencode(spec.listen_on))
            os.chmod(spec.listen_on, 0o600)
        listening.listen(LISTEN_BACKLOG)
    except OSError as e:
        listening.close()
        raise ServiceError(spec.name, f"cannot listen on {spec.listen_on}: {e.strerror}") from e
    return listening


def clear_stale_socket(name: str, path: Path | None) -> None:
    """Remove a socket a killed earlier run left at ``path`` (anything else there is an error)."""
    if path is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServiceError(name, f"{path} exists and is not a socket")
    os.unlink(path)


# ----------------------------------------------------------------------------- children
class ChildService(RunningService):
    """A helper that is our own child: watched through a pidfd, reaped by us."""

    def __init__(self, spec: ServiceSpec, popen: subprocess.Popen[bytes], output: IO[bytes]) -> None:
        super().__init__(spec)
        self.pid = popen.pid
        self._popen = popen
        self._output = output
        self._tail: list[str] | None = None
        self._pidfd = os.pidfd_open(popen.pid)
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_task(self._watch(), name=f"watch {spec.name}")

    async def _watch(self) -> int | None:
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        pidfd = self._pidfd
        loop.add_reader(pidfd, lambda: resolve(gone))
        try:
            await gone
        finally:
            if self._pidfd == pidfd:
                loop.remove_reader(pidfd)
        # The exited leader (a zombie until reaped) still holds its process-group id, so this
        # cannot hit an unrelated group: kill what it left behind in its session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.returncode = self._popen.wait()
        os.close(self._pidfd)
        self._pidfd = -1
        self._tail = self._read_tail()
        self._output.close()
        if self._stopping:
            self.log.debug("service stopped", pid=self.pid, status=self.returncode)
        elif self.returncode == 0:  # e.g. swtpm/virtiofsd after QEMU went away
            self.log.info("service exited", pid=self.pid)
        else:
            self.log.warning("service exited", pid=self.pid, status=describe_status(self.returncode),
                             output=" | ".join(self._tail) or None)  # (its log file's lines: the run's report)
        return self.returncode

    def _failure_output(self) -> list[str]:
        return (self._tail if self._tail is not None else self._read_tail()) + self.logged()

    def _read_tail(self) -> list[str]:
        try:
            return _tail(self._output.fileno())
        except (OSError, ValueError):
            return []

    def detach(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        super().detach()
        self._output.close()

    def send_signal(self, sig: int) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        assert self._exited is not None
        if self._exited.cancelled():  # detached: no longer ours to stop
            return
        if not self._exited.done():
            self._stopping = True
            self.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), timeout)
            except TimeoutError:
                self.log.info("service ignored SIGTERM, killing it", timeout=timeout)
                self.send_signal(signal.SIGKILL)
        await asyncio.shield(self._exited)


def unnamed_file(name: str) -> IO[bytes]:
    """A new file without a name in ``$TMPDIR`` (else /tmp), gone with its last descriptor; ``name``
    names it only where the file system cannot make one unnamed (it is then removed at once).  What
    :func:`tempfile.TemporaryFile` makes, without importing :mod:`tempfile` and :mod:`random` (≈ 0.4 MB
    of the daemon, and of vmspawn's start-up before QEMU)."""
    directory = os.environ.get("TMPDIR") or "/tmp"
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:  # (a file system without O_TMPFILE; EISDIR: a kernel that saw only O_DIRECTORY's bit)
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
        fd = -1
    if fd < 0:
        path = os.path.join(directory, f".{name}-{os.urandom(6).hex()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.unlink(path)
    return open(fd, "w+b")


class ChildRunner:
    """Runs helpers as our own children, each in its own session.

    ``die_with_parent``: the helper gets SIGTERM when we die (PR_SET_PDEATHSIG; note it follows
    the *thread* that forked, so start services from the event-loop thread).  A daemon whose
    VMs outlive it passes False.  Output (stdout+stderr) goes to an unlinked temporary file,
    not a pipe, so a helper that outlives us never dies of SIGPIPE; its tail is reported when
    the helper fails.
    """

    def __init__(self, die_with_parent: bool = True) -> None:
        self.die_with_parent = die_with_parent

    async def start(self, spec: ServiceSpec) -> ChildService:
        clear_stale_socket(spec.name, spec.ready_path)
        listening = listening_socket(spec)
        output = unnamed_file(spec.name)
        as_user = spec.identity.popen_kwargs()
        as_user["env"] |= spec.env
        try:
            popen = subprocess.Popen(
                list(spec.argv), stdin=listening.fileno() if listening is not None else subprocess.DEVNULL,
                stdout=output, stderr=output, pass_fds=spec.pass_fds, start_new_session=True,
                preexec_fn=parent_death_signal() if self.die_with_parent else None, **as_user,
            )
        except OSError as e:
            output.close()
            raise ServiceError(spec.name, f"cannot execute {spec.argv[0]}: {e.strerror}") from e
        finally:
            if listening is not None:  # (the helper has it now)
                listening.close()
        service = ChildService(spec, popen, output)
        service.log.debug("service started", pid=service.pid, argv=" ".join(spec.argv))
        try:
            await service._wait_ready()
        except BaseException:
            service._stopping = True
            await service.stop(timeout=1.0)
            raise
        return service

    async def aclose(self) -> None:
        """Nothing to release: each service is owned by whoever started it."""


class AdoptedChildService(RunningService):
    """A helper an earlier daemon started as its child: watched through a pidfd (its exit status
    is not ours to know).  Raises ProcessLookupError if it is already gone."""

    def __init__(self, name: str, pid: int, *, log_path: Path | None = None, identity: Identity = ROOT) -> None:
        super().__init__(None, name, log_path=log_path, identity=identity)
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_task(self._watch(), name=f"watch {name}")

    async def _watch(self) -> int | None:
        gone = self._loop.create_future()
        pidfd = self._pidfd
        self._loop.add_reader(pidfd, lambda: resolve(gone))
        try:
            await gone
        finally:
            if self._pidfd == pidfd:
                self._loop.remove_reader(pidfd)
        self._close()
        if not self._stopping:
            self.log.warning("service exited", pid=self.pid)
        return None

    def _close(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def detach(self) -> None:
        self._close()
        super().detach()

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        assert self._exited is not None
        if self._exited.done():
            return
        self._stopping = True
        signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            await asyncio.shield(self._exited)


# ----------------------------------------------------------------------------- transient units
def transient_unit_properties(spec: ServiceSpec) -> list[tuple[str, Any]]:
    """The ``a(sv)`` properties of the transient service for ``spec`` (StartTransientUnit).  A
    socket-activated helper's standard input is the message's first file descriptor (its socket); its
    output goes to the journal (by default systemd would point it at that socket too)."""
    props: list[tuple[str, Any]] = [
        ("Description", Variant("s", spec.description or spec.name)),
        ("Type", Variant("s", "exec")),  # the start job fails if the binary cannot be executed
        ("ExecStart", Variant("a(sasb)", [(spec.argv[0], list(spec.argv), False)])),
        ("CollectMode", Variant("s", "inactive-or-failed")),
        ("AddRef", Variant("b", True)),
        ("TimeoutStopUSec", Variant("t", int(DEFAULT_STOP_TIMEOUT * 1_000_000))),
    ]
    if spec.bound_to:
        props += [("BindsTo", Variant("as", [spec.bound_to])), ("After", Variant("as", [spec.bound_to]))]
    if spec.env:
        props.append(("Environment", Variant("as", [f"{key}={value}" for key, value in spec.env.items()])))
    if spec.listen_on is not None:
        props += [("StandardInputFileDescriptor", Variant("h", 0)), ("StandardOutput", Variant("s", "journal")),
                  ("StandardError", Variant("s", "journal"))]
    for key, value in spec.identity.unit_properties().items():
        props.append((key, Variant("as" if isinstance(value, list) else "s", value)))
    return props


class UnitService(RunningService):
    """A helper running as a transient ``<name>.service``."""

    def __init__(self, runner: UnitRunner, spec: ServiceSpec | None, unit: str, path: str, name: str = "", *,
                 log_path: Path | None = None, identity: Identity = ROOT) -> None:
        super().__init__(spec, name, log_path=log_path, identity=identity)
        self.unit = unit
        self._runner = runner
        self._path = path

    async def _load(self) -> None:
        try:
            self.pid = int(await self._runner.manager.get_property(self._path, SERVICE_IFACE, "MainPID"))
        except DBusCallError:
            self.pid = 0
        self._exited = asyncio.get_running_loop().create_task(self._watch(), name=f"watch {self.unit}")

    async def _watch(self) -> int | None:
        """Read ActiveState at each change systemd signals until inactive/failed (or the unit is
        collected)."""
        manager = self._runner.manager
        try:
            await manager.watch_unit(self._path)
        except (DBusCallError, EOFError, ConnectionError, OSError) as e:
            self.log.debug("no signals of the unit: reading its state every few seconds", error=str(e))
        try:
            return await self._watch_state(manager)
        finally:
            await manager.unwatch_unit(self._path)

    async def _watch_state(self, manager: SystemdManager) -> int | None:
        trouble_since: float | None = None
        while True:
            changed = manager.unit_changed(self._path)  # (before the read: a change during it counts)
            try:
                state = await manager.get_property(self._path, UNIT_IFACE, "ActiveState")
                trouble_since = None
                if state in ("inactive", "failed"):
                    code = await manager.get_property(self._path, SERVICE_IFACE, "ExecMainCode")
                    status = await manager.get_property(self._path, SERVICE_IFACE, "ExecMainStatus")
                    self.returncode = int(status) if code == CLD_EXITED else -int(status)
                    break
            except DBusCallError as e:
                if e.name in UNIT_GONE_ERRORS:  # collected (CollectMode=inactive-or-failed): status unknown
                    break
                # systemd re-executing, or busy: not a reason to think the helper died
                now = asyncio.get_running_loop().time()
                trouble_since = trouble_since or now
                if now - trouble_since > UNIT_TROUBLE_GRACE:
                    self.lost = True
                    self.log.warning("cannot watch the unit any more", unit=self.unit, error=str(e))
                    break
            except (EOFError, ConnectionError, OSError) as e:
                self.lost = True
                self.log.warning("lost the bus while watching the unit", unit=self.unit, error=str(e))
                break
            await asyncio.wait([changed], timeout=UNIT_RECHECK_INTERVAL)
            changed.cancel()
        changed.cancel()
        if not self._stopping:
            level = self.log.debug if self.returncode == 0 else self.log.warning
            level("service exited", unit=self.unit, status=describe_status(self.returncode))
        return self.returncode

    def _failure_output(self) -> list[str]:
        return [*self.logged(), f"see: journalctl -u {self.unit}"]

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        assert self._exited is not None
        if self._exited.done():
            return
        self._stopping = True
        try:
            assert self.unit is not None
            await self._runner.manager.stop_unit(self.unit, timeout)
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except DBusCallError as e:
            if "NoSuchUnit" not in e.name:
                raise ServiceError(self.name, f"StopUnit failed: {e}") from e
        except TimeoutError:
            self.log.info("unit did not stop in time, killing it", timeout=timeout)
            with contextlib.suppress(DBusCallError):
                assert self.unit is not None
                await self._runner.manager.kill_unit(self.unit)
        await asyncio.shield(self._exited)


class UnitRunner:
    """Runs helpers as transient services of the systemd manager (see systemd/units.py).

    Limits: the one descriptor passed is a socket-activated helper's socket (its standard input);
    argv and paths must make sense in PID 1's mount namespace; a spec's ``env`` becomes the unit's
    ``Environment=``.
    """

    def __init__(self, manager: SystemdManager, *, owns_manager: bool = False) -> None:
        self.manager = manager
        self._owns_manager = owns_manager
        self._referenced: list[str] = []  # units started with AddRef: released by aclose()

    @classmethod
    async def connect(cls, bus_type: str = "system", address: str | None = None) -> UnitRunner:
        return cls(await SystemdManager.connect(bus_type, address), owns_manager=True)

    async def version(self) -> str:
        return await self.manager.version()

    async def start(self, spec: ServiceSpec) -> UnitService:
        if spec.pass_fds:
            raise ServiceError(spec.name, "file descriptors cannot be passed to a transient unit; "
                                          "the helper must create its own socket, or be socket-activated")
        unit = f"{spec.name}.service"
        clear_stale_socket(spec.name, spec.ready_path)
        listening = listening_socket(spec)
        self._referenced.append(unit)  # (a unit whose start failed stays loaded while referenced)
        try:
            path = await self.manager.start_transient_unit(
                unit, transient_unit_properties(spec), spec.ready_timeout,
                fds=[listening.fileno()] if listening is not None else [])
            service = UnitService(self, spec, unit, path)
            await service._load()
        except BaseException as e:  # (a timeout or a cancel may come after systemd has started it: it must not run on)
            await asyncio.shield(self._stop_quietly(unit))
            if isinstance(e, (UnitStartError, DBusCallError)):
                raise ServiceError(spec.name, str(e)) from e
            raise
        finally:
            if listening is not None:  # (systemd holds it for the helper now)
                listening.close()
        service.log.debug("unit started", unit=unit, pid=service.pid, argv=" ".join(spec.argv))
        try:
            await service._wait_ready()
        except BaseException:
            await service.stop(timeout=1.0)
            raise
        return service

    async def _stop_quietly(self, unit: str) -> None:
        """Stop ``unit`` if it runs (nothing if it is not loaded, or failed)."""
        with contextlib.suppress(Exception):
            await self.manager.stop_unit(unit, timeout=DEFAULT_STOP_TIMEOUT)

    async def adopt(self, name: str, unit: str, *, log_path: Path | None = None,
                    identity: Identity = ROOT) -> UnitService:
        """Watch the unit of a helper an earlier daemon started (ServiceError if it is gone); it logs to
        ``log_path``, read as ``identity``."""
        try:
            (path,) = await self.manager.call(MANAGER_IFACE, "GetUnit", "s", [unit])
            state = await self.manager.get_property(str(path), UNIT_IFACE, "ActiveState")
        except DBusCallError as e:
            raise ServiceError(name, f"{unit} is gone ({e.name})") from e
        if state not in ("active", "activating", "reloading"):
            raise ServiceError(name, f"{unit} is {state}")
        service = UnitService(self, None, unit, str(path), name=name, log_path=log_path, identity=identity)
        await service._load()
        return service

    async def aclose(self) -> None:
        """Release the units it started (on a shared connection they would stay loaded once ended,
        and the next start of the same name would fail); close the connection if it is ours."""
        for unit in self._referenced:
            await self.manager.unref_unit(unit)
        self._referenced.clear()
        if self._owns_manager:
            await self.manager.aclose()


# ----------------------------------------------------------------------------- choice
async def choose_runner(*, die_with_parent: bool = True, timeout: float = CONNECT_TIMEOUT,
                        systemd_dir: Path = SYSTEMD_RUNTIME_DIR,
                        manager: SystemdManager | None = None) -> ServiceRunner:
    """UnitRunner when systemd runs the system and its manager answers in time, else ChildRunner.

    Pass ``manager`` to share an existing connection.  Root uses the system manager, others their
    user manager.  Set ``$VMSPAWND_SERVICE_RUNNER`` to ``child`` or ``unit`` to skip the detection.
    """
    forced = os.environ.get(RUNNER_ENV, "").strip().lower()
    if forced == "child":
        reason = f"${RUNNER_ENV}=child"
    elif manager is not None:
        log.debug("auxiliary services run as transient systemd units")
        return UnitRunner(manager)
    else:
        found, reason = await connect_systemd(timeout, systemd_dir if forced != "unit" else Path("/"))
        if found is not None:
            log.debug("auxiliary services run as transient systemd units", systemd=reason)
            return UnitRunner(found, owns_manager=True)
        if forced == "unit":
            raise ServiceError("service-runner", f"${RUNNER_ENV}=unit but {reason}")
    log.debug("auxiliary services run as child processes", reason=reason)  # (at each start)
    return ChildRunner(die_with_parent=die_with_parent)
