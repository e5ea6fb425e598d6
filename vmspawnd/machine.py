"""Machine: one VM's life, define → start → running (→ ready) → stopping → stopped|failed.

An AsyncExitStack owns every resource a run acquires (runtime dir, sockets, PTY, QEMU), so
every exit path — clean power-off, QEMU crash, signal, setup error — cleans up.  Both
``vmspawn`` (one Machine in the foreground) and ``vmspawnd`` (many) drive this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import structlog

from vmspawnd.config import ConfigError, ConsoleMode, MachineConfig, Network, Tristate
from vmspawnd.guest.channel import NotifyChannel
from vmspawnd.guest.credentials import write_credentials
from vmspawnd.guest.ssh import SshKeyError, SshKeyPair, generate_key_pair
from vmspawnd.launcher import QemuProcess
from vmspawnd.proc import CAP_NET_ADMIN, has_capability, process_cmdline, process_start_time
from vmspawnd.ptyfwd import Pty
from vmspawnd.qemu.accel import choose_accelerator, find_qemu, vsock_usable
from vmspawnd.qemu.argv import (
    Resources,
    build_qemu_argv,
    check_cmdline_length,
    cmdline_smbios_strings,
    qemu_extra_args,
    tap_mac,
)
from vmspawnd.qemu.disks import grow_image, root_cmdline_word
from vmspawnd.qemu.firmware import nvram_state_path, prepare_nvram
from vmspawnd.qemu.qmp import Qmp
from vmspawnd.qemu.vsock import claim_vsock
from vmspawnd.runtime import RuntimeDir
from vmspawnd.services.runner import choose_runner, describe_status
from vmspawnd.services.setup import AuxServiceError, AuxServices, start_aux_services
from vmspawnd.snapshot import SnapshotError, copy_path, remove_copy, snapshot_directory
from vmspawnd.storage import read_json, write_json_atomic
from vmspawnd.systemd.machined import Registration, RegistrationError, register, unregister
from vmspawnd.systemd.scope import DEFAULT_SLICE, allocate_scope
from vmspawnd.systemd.units import SystemdManager, UnitStartError, connect_systemd

log = structlog.get_logger()

DEFAULT_STOP_TIMEOUT = 10.0
STATUS_EVENTS_PER_SECOND = 10


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


COPY_RECORD = "ephemeral-copy"  # in the runtime dir: the path of the --ephemeral copy of --directory


class StartError(Exception):
    """The VM could not be started (the reason is the message)."""


EventHandler = Callable[[str, dict[str, Any]], None]


class Machine:
    """One VM and everything its run owns."""

    def __init__(self, config: MachineConfig, *, runtime_base: Path, die_with_parent: bool = True,
                 on_event: EventHandler | None = None, qemu_output: int | IO[bytes] | None = None,
                 console_socket: bool = False) -> None:
        self.config = config
        self.runtime = RuntimeDir(runtime_base, config.name)
        self.state = State.STOPPED
        self.since = time.time()
        self.ready = False
        self.guest_status: str | None = None
        self.exit_status: int | None = None
        self.failure: str | None = None
        self.qemu: QemuProcess | None = None
        self.pty: Pty | None = None
        self._guest_exit_status: int | None = None
        self._forced = False
        self._die_with_parent = die_with_parent
        self._on_event = on_event or (lambda kind, data: None)
        self._qemu_output = qemu_output
        self._console_socket = console_socket
        self._detaching = False
        self._watch: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._qmp: Qmp | None = None
        self._exited = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._vsock_port: int | None = None
        self._vsock_cid: int | None = None
        self._aux_failure: str | None = None
        self._registered = False
        self._keep_runtime_dir = False
        self._status_window, self._status_events = 0.0, 0
        self._watches: set[asyncio.Task[None]] = set()
        self.tpm_state_path: Path | None = None
        self.units: list[str] = []
        self._ssh_key: SshKeyPair | None = None
        self._snapshot: Path | None = None  # --ephemeral --directory: the copy the VM runs on
        self._mac: str | None = None  # the TAP link's guest MAC
        self._qemu_extra: tuple[str, ...] = ()  # $SYSTEMD_VMSPAWN_QEMU_EXTRA
        self.log = log.bind(machine=config.name)

    # ---------------------------------------------------------------- life cycle
    def _set_state(self, state: State, **data: Any) -> None:
        self.state = state
        self.since = time.time()
        self._emit(state.value, **data)

    def _emit(self, kind: str, **data: Any) -> None:
        try:
            self._on_event(kind, data)
        except Exception:
            self.log.exception("event handler failed", event=kind)

    async def start(self) -> None:
        """Set everything up and spawn QEMU.  On failure everything acquired is released."""
        if self.state in (State.STARTING, State.RUNNING, State.STOPPING):
            raise StartError(f"machine is {self.state.value}")
        self.ready, self.guest_status, self.exit_status, self.failure = False, None, None, None
        self._guest_exit_status, self._forced = None, False
        self._exited.clear()
        self._detaching = False
        self._aux_failure = None
        self._registered = False
        self.units, self.tpm_state_path = [], None
        self._stack = contextlib.AsyncExitStack()
        self._stack.callback(self._cancel_watches)
        self._set_state(State.STARTING)
        try:
            await self._start()
        except BaseException as e:
            reason = e.reason if isinstance(e, ConfigError) else str(e) or type(e).__name__
            try:
                await self._stack.aclose()
            except Exception:
                self.log.exception("cleaning up a failed start failed")
            self.failure = reason
            self.exit_status = 1
            self._set_state(State.FAILED, reason=reason)
            if isinstance(e, (ConfigError, StartError)):
                raise
            if isinstance(e, OSError):
                raise StartError(reason) from e
            raise

    async def _start(self) -> None:
        config = self.config
        # fork early, exec late: the launcher that becomes QEMU starts first, while we set up
        self.qemu = QemuProcess.fork_early(die_with_parent=self._die_with_parent, stdout=self._qemu_output,
                                           stderr=self._qemu_output,
                                           inherit_stdin=config.console is ConsoleMode.NATIVE)
        self._stack.push_async_callback(self._reap_qemu)
        self._stack.callback(self.qemu.cancel)
        qemu_binary, accel = self._preflight()
        rundir = self.runtime.lock()
        self._stack.callback(self._release_runtime_dir)
        previous = self._previous_qemu()
        if previous is not None:
            self._keep_runtime_dir = True
            raise StartError(f"the QEMU of an earlier run still runs (pid {previous}); stop or kill it first")
        await self._remove_leftover_copy()
        self.runtime.clear_leftovers()
        self._grow_image()
        await self._snapshot_directory(rundir)
        pass_fds: list[int] = []
        channel, vsock_cid, vsock_fd = await self._open_notify_channel(rundir, pass_fds)
        aux = await self._start_scope_and_helpers(rundir, vsock_cid)
        generated = aux.credentials + await self._ssh_key_credentials(rundir, vsock_cid)

        ours = {cred_id for cred_id, _ in generated}
        credentials = [c for c in config.credentials if c[0] not in ours] + generated
        if channel.credential:
            credentials.append((channel.credential[0], channel.credential[1].encode()))
        term = os.environ.get("TERM")
        extra_cmdline = self._synthesized_cmdline() + tuple(aux.cmdline)
        uki = config.linux_is_uki
        credential_files = write_credentials(rundir / "smbios", credentials, config.smbios11
                                             + tuple(cmdline_smbios_strings(config, term, extra_cmdline, uki)))
        qmp_sock = self._listen_qmp(rundir, pass_fds)
        console_socket = self._open_console(rundir)
        firmware, nvram = self._prepare_firmware(rundir)
        resources = Resources(
            qemu=qemu_binary, kvm=accel.kvm, qmp_fd=qmp_sock.fileno(),
            console_pty=self.pty.slave_path if self.pty else None, console_socket=console_socket,
            notify_args=tuple(channel.qemu_args), vsock_cid=vsock_cid, vsock_fd=vsock_fd,
            smbios_files=tuple(credential_files.smbios), fw_cfg_files=tuple(credential_files.fw_cfg),
            initrd=self._merge_initrds(rundir) if config.initrds else None,
            vmgenid=uuid.uuid4(), term=term, extra_cmdline=extra_cmdline,
            firmware_args=tuple(firmware.qemu_args(nvram)),
            smm=firmware.smm if firmware.descriptor is not None else None, aux_args=tuple(aux.qemu_args), uki=uki,
            mac=self._mac, extra_args=self._qemu_extra,
        )
        argv = build_qemu_argv(config, resources)
        self.log.debug("spawning qemu", argv=" ".join(argv))
        self.qemu.exec(argv, pass_fds)
        qmp_sock.close()  # QEMU has its copy
        self._save_run_info()
        await self._connect_qmp(rundir / "qmp.sock")
        await self._register(vsock_cid)
        self._save_run_info()
        self._set_state(State.RUNNING, pid=self.qemu.pid)
        if self.ready:  # the guest was faster than QMP and registration: "ready" follows "running"
            self._emit("ready")
        self._watch = asyncio.get_running_loop().create_task(self._watch_exit())

    # ---------------------------------------------------------------- start steps
    def _preflight(self):
        """Checks and look-ups that need no resources: QEMU binary, accelerator, TAP rights, image size."""
        config = self.config
        config.check_environment()  # the files it names may have changed since it was defined
        check_cmdline_length(config)
        if config.network is Network.TAP and not has_capability(CAP_NET_ADMIN):
            raise ConfigError("network-tap", "", "TAP networking needs CAP_NET_ADMIN (run as root)")
        if config.forward_journal is not None and not vsock_usable(config.vsock):
            raise ConfigError("forward-journal", str(config.forward_journal), "needs vsock (the guest sends its "
                              "journal over AF_VSOCK), and /dev/vhost-vsock is not usable here")
        # $SYSTEMD_VMSPAWN_NETWORK_MAC is one VM's (vmspawn's); a daemon's would give all VMs one MAC
        environ = {} if self._console_socket else os.environ
        self._mac = tap_mac(config.name, environ) if config.network is Network.TAP else None
        self._qemu_extra = tuple(qemu_extra_args())
        qemu_binary = find_qemu()
        accel = choose_accelerator(config.kvm)
        self.log.info("accelerator", kvm=accel.kvm, reason=accel.reason)
        return qemu_binary, accel

    async def _snapshot_directory(self, rundir: Path) -> None:
        """--ephemeral --directory: run on a copy of the tree, removed when the run ends.  Its path
        is recorded first, so even a copy of a killed run is found and removed later."""
        self._snapshot = None
        if not (self.config.ephemeral and self.config.directory is not None):
            return
        try:
            target = copy_path(self.config.directory)
        except OSError as e:
            raise ConfigError("directory", str(self.config.directory), e.strerror or str(e)) from None
        (rundir / COPY_RECORD).write_text(str(target))
        self._snapshot = target
        self._stack.push_async_callback(self._remove_snapshot)
        try:
            await asyncio.to_thread(snapshot_directory, self.config.directory, target)
        except SnapshotError as e:
            raise StartError(str(e)) from e
        self.log.info("running on an ephemeral copy", directory=str(self.config.directory), copy=str(target))

    async def _remove_snapshot(self) -> None:
        if self._snapshot is None or self._detaching:  # a re-adopting daemon removes it later
            return
        assert self.config.directory is not None
        await asyncio.to_thread(remove_copy, self._snapshot, self.config.directory)
        (self.runtime.path / COPY_RECORD).unlink(missing_ok=True)
        self._snapshot = None

    async def _remove_leftover_copy(self) -> None:
        """The --ephemeral copy a killed earlier run left behind (its QEMU is gone), if any."""
        record = self.runtime.path / COPY_RECORD
        if self.config.directory is not None and record.is_file():
            await asyncio.to_thread(remove_copy, Path(record.read_text().strip()), self.config.directory)
        record.unlink(missing_ok=True)

    @property
    def _run_config(self) -> MachineConfig:
        """The configuration this run uses: with --ephemeral --directory, the copy is the root."""
        return self.config if self._snapshot is None else self.config.replace(directory=self._snapshot)

    async def _ssh_key_credentials(self, rundir: Path, vsock_cid: int | None) -> list[tuple[str, bytes]]:
        """--pass-ssh-key: a fresh key pair (auto: when the guest has vsock, the way to reach its sshd)."""
        self._ssh_key = None
        setting = self.config.pass_ssh_key
        if setting is Tristate.NO or (setting is Tristate.AUTO and vsock_cid is None):
            return []
        try:
            self._ssh_key = await generate_key_pair(rundir, self.config.ssh_key_type, f"vmspawnd@{self.config.name}")
        except SshKeyError as e:
            if setting is Tristate.YES:
                raise StartError(str(e)) from e
            self.log.warning("continuing without an SSH key for the guest", error=str(e))
            return []
        return self._ssh_key.credentials()

    def _grow_image(self) -> None:
        """--grow-image: only once we own the machine, and never on an --ephemeral run's image."""
        config = self.config
        if not config.grow_image or config.image is None:
            return
        if config.ephemeral:
            self.log.warning("--grow-image is ignored with --ephemeral: the image is never written")
        elif grow_image(config.image.path, config.grow_image):
            self.log.info("image grown", image=str(config.image.path), size=config.grow_image)

    async def _open_notify_channel(self, rundir: Path, pass_fds: list[int]):
        """Listen for the guest's notifications (vsock if usable, else virtio-serial) before QEMU starts."""
        channel = NotifyChannel(self._guest_message)
        self._stack.push_async_callback(channel.close)
        vsock_fd = vsock_cid = None
        if vsock_usable(self.config.vsock):
            vsock_fd, vsock_cid = claim_vsock(self.config.name, fixed_cid=self.config.vsock_cid)
            self._vsock_cid = vsock_cid
            self._stack.callback(os.close, vsock_fd)
            pass_fds.append(vsock_fd)
            await channel.listen_vsock(peer_cid=vsock_cid)
            self._vsock_port = channel.port
        else:
            if self.config.vsock_cid is not None:
                self.log.warning("--vsock-cid is ignored: no usable /dev/vhost-vsock", cid=self.config.vsock_cid)
            await channel.listen_virtio_serial(rundir / "notify.sock")
        return channel, vsock_cid, vsock_fd

    async def _start_scope_and_helpers(self, rundir: Path, vsock_cid: int | None) -> AuxServices:
        """The scope (around the launcher) and the helpers, as units where systemd runs, else children."""
        systemd, why = await connect_systemd()
        if systemd is not None:
            self._stack.push_async_callback(systemd.aclose)
        scope = await self._allocate_scope(systemd, why)
        runner = await choose_runner(die_with_parent=self._die_with_parent, manager=systemd)
        self._stack.push_async_callback(runner.aclose)
        try:
            aux = await start_aux_services(self._run_config, runner, rundir, bound_to=scope, guest_cid=vsock_cid)
        except AuxServiceError as e:
            raise StartError(str(e)) from e
        for what, service in aux.services:
            self._stack.push_async_callback(self._stop_service, service)
            self._spawn_watch(self._watch_service(what, service))
        self.tpm_state_path = aux.tpm_state
        self.units = ([scope] if scope else []) + aux.units
        return aux

    def _listen_qmp(self, rundir: Path, pass_fds: list[int]) -> socket.socket:
        """QMP's listening socket, created by us (no race) and inherited by QEMU."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(sock.close)
        sock.bind(str(rundir / "qmp.sock"))
        sock.listen(4)
        pass_fds.append(sock.fileno())
        return sock

    def _open_console(self, rundir: Path) -> Path | None:
        """A PTY for vmspawn's console, or (daemon) a socket QEMU serves in the runtime dir."""
        if self.config.console not in (ConsoleMode.INTERACTIVE, ConsoleMode.READ_ONLY):
            return None
        if self._console_socket:
            return rundir / "console.sock"
        self.pty = Pty()
        self._stack.callback(self._close_pty)
        return None

    def _prepare_firmware(self, rundir: Path):
        config = self.config
        firmware = config.firmware_choice()
        nvram = None
        template = firmware.nvram_template(config.efi_nvram_template)
        if template is not None:
            base = config.image.path if config.image is not None else config.directory
            nvram = prepare_nvram(template, nvram_state_path(config.efi_nvram_state, base, config.ephemeral), rundir)
        self.log.info("firmware", kind=firmware.kind.value, reason=firmware.reason,
                      descriptor=str(firmware.descriptor.path) if firmware.descriptor else None,
                      nvram=str(nvram) if nvram else None)
        return firmware, nvram

    async def _connect_qmp(self, path: Path) -> None:
        assert self.qemu is not None
        self._qmp = Qmp(self.config.name)
        self._stack.push_async_callback(self._qmp.close)
        try:
            await self._qmp.connect(str(path))
        except Exception as e:
            rc = None if self.qemu.alive else self.qemu.returncode
            raise StartError(f"QEMU did not come up (exit status {rc})" if rc is not None
                             else f"cannot connect to QEMU's monitor: {e}") from e

    # ---------------------------------------------------------------- systemd
    async def _allocate_scope(self, systemd: SystemdManager | None, why: str) -> str | None:
        """Put the (not yet exec'd) QEMU launcher into its own scope; None where there is none."""
        config = self.config
        if config.keep_unit:
            if config.slice != DEFAULT_SLICE or config.properties:
                self.log.warning("--slice= and --property= have no effect with --keep-unit")
            return None
        if systemd is None:
            if config.slice != DEFAULT_SLICE or config.properties:
                self.log.warning("no systemd manager: --slice= and --property= are not applied", reason=why)
            else:
                self.log.debug("QEMU runs without a scope", reason=why)
            return None
        assert self.qemu is not None
        try:
            scope = await allocate_scope(systemd, config.name, self.qemu.pid, config.slice, config.properties)
        except UnitStartError as e:
            raise StartError(str(e)) from e
        self.log.info("QEMU's scope", unit=scope, slice=config.slice)
        return scope

    async def _register(self, vsock_cid: int | None) -> None:
        """Register with systemd-machined over varlink (--register=auto tolerates its absence)."""
        config = self.config
        if config.register is Tristate.NO:
            return
        assert self.qemu is not None
        reg = Registration(config.name, self.qemu.pid, machine_id=config.uuid,
                           root_directory=self._run_config.directory,
                           vsock_cid=vsock_cid, ssh_private_key=self._ssh_key.private_key if self._ssh_key else None)
        try:
            await register(reg)
        except RegistrationError as e:
            if config.register is Tristate.YES:
                raise StartError(f"cannot register with systemd-machined: {e}") from e
            self.log.info("not registered with systemd-machined", reason=str(e))
            return
        self._registered = True
        self._stack.push_async_callback(self._unregister)

    async def _unregister(self) -> None:
        if self._detaching or not self._registered:
            return
        self._registered = False
        try:
            await unregister(self.config.name)
        except Exception as e:  # machinectl terminate already removed it, or machined is gone
            self.log.debug("unregister", result=str(e))

    # ---------------------------------------------------------------- restart safety
    def _save_run_info(self) -> None:
        """Record what a restarted daemon needs to re-adopt this run (``run.json`` in the runtime dir)."""
        if self.qemu is None:
            return
        write_json_atomic(self.runtime.path / "run.json", {
            "pid": self.qemu.pid, "starttime": process_start_time(self.qemu.pid),
            "ready": self.ready, "status": self.guest_status, "guestExitStatus": self._guest_exit_status,
            "vsockPort": self._vsock_port, "vsockCid": self._vsock_cid, "units": self.units,
            "registered": self._registered,
            "tpmState": str(self.tpm_state_path) if self.tpm_state_path else None,
        })

    async def adopt(self) -> bool:
        """Re-attach to a QEMU that outlived a previous daemon.  False if there is none."""
        info_path = self.runtime.path / "run.json"
        try:
            info = read_json(info_path)
            pid, starttime = int(info["pid"]), int(info["starttime"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self.runtime.lock()  # raises if someone else holds the machine
        if process_start_time(pid) != starttime or str(self.runtime.path) not in process_cmdline(pid):
            self.log.info("stale runtime directory, the QEMU it names is gone", pid=pid)
            await self._remove_leftover_copy()
            self.runtime.remove()
            return False
        self._stack = contextlib.AsyncExitStack()
        self._detaching = False
        self._exited.clear()
        self._stack.callback(self._release_runtime_dir)
        self.ready, self.guest_status = bool(info.get("ready")), info.get("status")
        self._guest_exit_status = info.get("guestExitStatus")
        self.units = [str(u) for u in info.get("units") or []]
        self.tpm_state_path = Path(info["tpmState"]) if info.get("tpmState") else None
        self._registered = bool(info.get("registered"))
        self._vsock_cid = info.get("vsockCid")
        record = self.runtime.path / COPY_RECORD
        self._snapshot = Path(record.read_text().strip()) if record.is_file() else None
        if self._snapshot is not None:
            self._stack.push_async_callback(self._remove_snapshot)
        if self._registered:
            self._stack.push_async_callback(self._unregister)
        channel = NotifyChannel(self._guest_message)
        self._stack.push_async_callback(channel.close)
        if info.get("vsockPort"):
            await channel.listen_vsock(int(info["vsockPort"]), peer_cid=info.get("vsockCid"))
        else:
            await channel.listen_virtio_serial(self.runtime.path / "notify.sock")
        self._vsock_port = channel.port
        self.qemu = QemuProcess.adopt(pid)
        self._stack.push_async_callback(self._stop_recorded_units)  # runs after _reap_qemu
        self._stack.push_async_callback(self._reap_qemu)
        self._qmp = Qmp(self.config.name)
        self._stack.push_async_callback(self._qmp.close)
        await self._qmp.connect(str(self.runtime.path / "qmp.sock"))
        self._set_state(State.RUNNING, pid=pid, adopted=True)
        if self.ready and not info.get("ready"):  # it became ready while no daemon was listening
            self._emit("ready")
        self.log.info("re-adopted running VM", pid=pid)
        self._watch = asyncio.get_running_loop().create_task(self._watch_exit())
        return True

    def mark_failed(self, reason: str) -> None:
        """Record that this machine is in no state we can drive (e.g. a failed re-adoption)."""
        self.failure = reason
        self._set_state(State.FAILED, reason=reason)

    async def detach(self) -> None:
        """Let go of a running VM without stopping it (daemon shutdown): it stays adoptable."""
        self._detaching = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._stack.aclose()

    def _previous_qemu(self) -> int | None:
        """The pid of a QEMU that an earlier run of this machine left running, if there is one."""
        try:
            info = read_json(self.runtime.path / "run.json")
            pid, starttime = int(info["pid"]), int(info["starttime"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if process_start_time(pid) == starttime and str(self.runtime.path) in process_cmdline(pid):
            return pid
        return None

    def _release_runtime_dir(self) -> None:
        """Remove the runtime dir — unless a live QEMU still needs it (detaching, or an earlier run's)."""
        if self._detaching or self._keep_runtime_dir:
            self._keep_runtime_dir = False
            self.runtime.unlock()
        else:
            self.runtime.remove()

    def _spawn_watch(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._watches.add(task)
        task.add_done_callback(self._watches.discard)

    def _cancel_watches(self) -> None:
        for task in list(self._watches):
            task.cancel()

    async def _watch_service(self, what: str, service) -> None:
        """A helper that dies while the VM runs takes the VM down, with a clear reason."""
        rc = await service.wait()
        if self.qemu is None or self._exited.is_set() or self._stopping is not None:
            return
        if service.lost:
            self.log.warning("no longer watching an auxiliary service; the VM keeps running", service=what)
            return
        with contextlib.suppress(TimeoutError):  # helpers also end when QEMU does: give QEMU a moment
            await asyncio.wait_for(asyncio.shield(self._exited.wait()), 1.0)
            return
        if self.state is not State.RUNNING:
            return
        self._aux_failure = f"{what} exited unexpectedly ({describe_status(rc)}); stopping the VM"
        self.log.error("auxiliary service died", service=what, status=rc)
        await self.kill(forced=True)

    async def _stop_service(self, service) -> None:
        """Stop a helper with its VM — but not when the daemon merely detaches from a running VM."""
        if self._detaching:
            service.detach()
            return
        try:
            await service.stop()
        except Exception as e:  # e.g. the bus went away: log, and let the rest of the cleanup run
            self.log.warning("could not stop an auxiliary service", service=service.name, error=str(e))

    async def _stop_recorded_units(self) -> None:
        """Stop an adopted run's units once its QEMU is gone (the helpers are bound to the scope,
        but systemd stops them only when it notices the scope emptied), unless we merely detach."""
        if self._detaching or not self.units:
            return
        systemd, why = await connect_systemd()
        if systemd is None:
            self.log.debug("not stopping recorded units", reason=why)
            return
        try:
            for unit in reversed(self.units):
                try:
                    await systemd.stop_unit(unit, timeout=30)
                except Exception as e:  # already gone (collected) is the common case
                    self.log.debug("stop unit", unit=unit, result=str(e))
        finally:
            await systemd.aclose()

    def on_cleanup(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when this run's resources are released (before those acquired earlier)."""
        self._stack.callback(callback)

    def _synthesized_cmdline(self) -> tuple[str, ...]:
        """``root=PARTUUID=…`` when a plain kernel boots with an image and the user named no root."""
        config = self.config
        if config.image is None or config.linux is None:
            return ()
        if any(w.startswith(("root=", "mount.usr=")) for w in config.kernel_cmdline):
            return ()
        return (root_cmdline_word(config.image.path),)

    def _merge_initrds(self, rundir: Path) -> Path:
        if len(self.config.initrds) == 1:
            return self.config.initrds[0]
        merged = rundir / "initrd.merged"
        with open(merged, "wb") as out:
            for piece in self.config.initrds:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out)
                out.write(b"\0" * (-out.tell() % 4))
        return merged

    def _guest_message(self, key: str, value: str) -> None:
        if key == "READY" and value == "1":
            if not self.ready:
                self.ready = True
                self.log.info("guest is ready")
                self._save_run_info()
                if self.state in (State.RUNNING, State.STOPPING):  # else emitted once the machine runs
                    self._emit("ready")
        elif key == "STATUS":
            status = value[:512]
            if status == self.guest_status:
                return
            self.guest_status = status  # kept in memory: a chatty guest must not make us fsync per line
            now = time.monotonic()
            if now - self._status_window >= 1.0:
                self._status_window, self._status_events = now, 0
            self._status_events += 1
            if self._status_events <= STATUS_EVENTS_PER_SECOND:
                self._emit("status", status=status)
        elif key == "EXIT_STATUS":
            if value.isdigit() and 0 <= int(value) <= 255:
                self._guest_exit_status = int(value)
                self._save_run_info()
            else:
                self.log.warning("guest sent an invalid EXIT_STATUS", value=value[:32])

    async def _watch_exit(self) -> None:
        assert self.qemu is not None
        rc = await self.qemu.wait()
        # give the notify channel a moment to deliver what the guest wrote just before power-off
        await asyncio.sleep(0.05)
        self.exit_status = self._exit_status(rc)
        if rc is not None and rc != 0:
            self.log.warning("QEMU exited abnormally", status=rc)
        try:
            await self._stack.aclose()
        except Exception:  # cleanup trouble must never leave the machine stuck "running"
            self.log.exception("cleaning up after the VM failed")
        finally:
            self._finish(rc)

    def _finish(self, rc: int | None) -> None:
        failed = rc is not None and (rc > 0 or (rc < 0 and not self._forced and self._stopping is None))
        if self._aux_failure is not None:
            self.failure = self._aux_failure
            self.exit_status = 1
            self._set_state(State.FAILED, reason=self.failure, exit_status=self.exit_status)
        elif failed:
            self.failure = f"QEMU exited with status {rc}" if rc > 0 else f"QEMU killed by signal {-rc}"
            self._set_state(State.FAILED, reason=self.failure, exit_status=self.exit_status)
        else:
            self._set_state(State.STOPPED, exit_status=self.exit_status)
        self._exited.set()

    def _exit_status(self, rc: int | None) -> int:
        """Guest's EXIT_STATUS, else 0 after a clean end, 1 if QEMU failed or had to be forced."""
        if self._guest_exit_status is not None:
            return self._guest_exit_status
        if rc is None:
            return 1 if self._forced else 0
        if rc != 0 or self._forced:
            return 1
        return 0

    async def wait(self) -> int:
        """Wait until the VM ended; return the exit status vmspawn should exit with."""
        await self._exited.wait()
        assert self.exit_status is not None
        return self.exit_status

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Ask the guest to power off (ACPI over QMP); force it after ``timeout`` seconds."""
        if self.state is not State.RUNNING and self._stopping is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(timeout))
        await asyncio.shield(self._stopping)

    async def _stop(self, timeout: float) -> None:
        self._set_state(State.STOPPING)
        try:
            if self._qmp is not None:
                await self._qmp.powerdown()
            await asyncio.wait_for(self._exited.wait(), timeout)
        except (TimeoutError, Exception) as e:
            if not self._exited.is_set():
                self.log.info("guest did not power off in time, forcing it", timeout=timeout,
                              error=str(e) if not isinstance(e, TimeoutError) else None)
                await self.kill(forced=True)
        finally:
            self._stopping = None

    async def kill(self, forced: bool = True, sig: int | None = None) -> None:
        """End QEMU now: QMP ``quit``, SIGKILL if that does not work.

        With ``sig``, only send that signal and wait a little: not every signal ends QEMU."""
        if self.qemu is None or self._exited.is_set():
            return
        self._forced = self._forced or forced
        if sig is not None:
            self.qemu.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited.wait()), 5)
            return
        else:
            if self._qmp is not None and self._qmp.connected:
                await self._qmp.quit()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited.wait()), 5)
            if not self._exited.is_set():
                self.qemu.send_signal(signal.SIGKILL)
        await self._exited.wait()

    async def _reap_qemu(self) -> None:
        """Exit-stack callback: never leave QEMU running behind a failed or aborted start."""
        if self._detaching:
            return
        if self.qemu is not None and self.qemu.alive:
            self.qemu.send_signal(signal.SIGKILL)
            await self.qemu.wait()

    def _close_pty(self) -> None:
        if self.pty is not None:
            self.pty.close()
            self.pty = None

