# SPDX-License-Identifier: LGPL-2.1-or-later
"""Run: one start (or one adoption) of a machine, and everything that run holds.

A Run is made fresh for each start or adoption and never reused, so nothing is ever reset by
hand and nothing leaks from one run into the next.  It owns three exit stacks, closed top to
bottom when the run ends:

- *session* (``_stack`` itself): what lives only as long as this process — QMP, the notify
  channel, watcher tasks, the console PTY;
- *durable* (``_durable``): what outlives a daemon that merely detaches — QEMU, its helpers,
  the machined registration, the ``--ephemeral`` copy, the runtime dir.  Detaching is one
  ``pop_all()`` of this stack;
- *handles* (``_handles``): our file descriptors on durable things (pidfds, the runtime dir's
  lock, D-Bus connections), always released.

``run.json`` (see runrecord.py) is written before QEMU is exec'd and whenever a helper starts,
so every process a run starts is found again, whatever point the daemon is killed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmspawnd import messages
from vmspawnd.config import MachineConfig
from vmspawnd.console import ConsoleRelay
from vmspawnd.errors import ConfigError, HostError, StartError, WrongState, naming_file
from vmspawnd.faults import crash_point
from vmspawnd.guest.channel import NotifyChannel
from vmspawnd.guest.credentials import write_credentials
from vmspawnd.guest.readiness import MAX_STATUS, OUTSIDE_SIGNAL, Readiness, exit_status, failure
from vmspawnd.guest.ssh import SshKeyError, SshKeyPair, generate_key_pair
from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.launcher import QemuProcess
from vmspawnd.log import get_logger
from vmspawnd.pathwatch import writes
from vmspawnd.plan import LaunchPlan, needs_privileges, plan_launch
from vmspawnd.proc import CAP_NET_ADMIN, check_socket_path, has_capability, process_cmdline, process_start_time
from vmspawnd.ptyfwd import Pty
from vmspawnd.qemu.accel import Accelerator, choose_accelerator, find_qemu, qemu_version
from vmspawnd.qemu.argv import (
    Resources,
    build_qemu_argv,
    check_cmdline_length,
    cmdline_smbios_strings,
    qemu_extra_args,
    tap_mac,
)
from vmspawnd.qemu.disks import drive_path, grow_image, root_cmdline_word
from vmspawnd.qemu.firmware import FirmwareChoice, nvram_state_path, prepare_nvram
from vmspawnd.qemu.output import QemuOutput
from vmspawnd.qemu.qmp import Qmp
from vmspawnd.qemu.vsock import (
    HYBRID_NOTIFY_PORT,
    HYBRID_SOCKET,
    GuestVsock,
    VsockBackend,
    choose_vsock,
    claim_vsock,
    hybrid_cid,
)
from vmspawnd.runrecord import COPY_RECORD, RUNNING, HelperRecord, RunRecord, end_leftovers, stop_units
from vmspawnd.runtime import RuntimeDir
from vmspawnd.services.runner import (
    AdoptedChildService,
    RunningService,
    ServiceError,
    UnitRunner,
    choose_runner,
    describe_status,
)
from vmspawnd.services.setup import TPM, AuxServiceError, AuxServices, start_aux_services
from vmspawnd.services.swtpm import logged_errors, state_unusable
from vmspawnd.settings import config_to_json
from vmspawnd.snapshot import EphemeralCopy, SnapshotError
from vmspawnd.spares import Spares
from vmspawnd.systemd.control import ControlListener, control_path
from vmspawnd.systemd.fdstore import FdStore, notify_name, output_name
from vmspawnd.systemd.machined import (
    MachineRegistration,
    Registration,
    RegistrationError,
    forgotten,
    start_machined,
    unregister_quietly,
)
from vmspawnd.systemd.machined import reachable as machined_reachable
from vmspawnd.systemd.scope import allocate_scope, scope_unit_name
from vmspawnd.systemd.units import SystemdManager, UnitStartError, connect_systemd
from vmspawnd.values import DEFAULT_SLICE, ConsoleMode, DiskType, Network, Tristate

log = get_logger()

NOTIFY_GRACE = 0.5  # at most this long after QEMU exits, for what the guest wrote just before power-off
HELPER_GRACE = 1.0  # a helper ending within this long after QEMU is QEMU's doing, not a failure
HELPER_END_GRACE = 0.25  # s a helper that failed QEMU's start has for its end to reach us (a unit's: over D-Bus)
KILL_GRACE = 5.0  # QMP quit, then SIGKILL
REGISTER_RETRY = 2.0  # seconds between attempts to register with a machined that was not reachable

#: ``on_event(run, kind, data)``: "ready", "status" (data: status), "reset" (data: reason) or "ended".
RunEventHandler = Callable[["Run", str, dict[str, Any]], None]


def qemu_of_record(record: RunRecord, runtime: Path) -> bool:
    """True if the QEMU ``record`` names still runs (same process, serving this runtime dir)."""
    return (record.starttime is not None and process_start_time(record.pid) == record.starttime
            and str(runtime) in process_cmdline(record.pid))


#: QEMU's run state of a VM it paused itself on a disk error (``werror``'s default stops on a full disk)
DISK_ERROR_STATUS = "io-error"
PAUSED_BY_QEMU = "QEMU paused the VM until it is resumed"
DISK_ERROR_PAUSE = f"a disk of the VM failed (its file system full, say): {PAUSED_BY_QEMU}"
NOTIFY_RECONNECT_GRACE = 3.0  # s QEMU has to connect to a restarted daemon's notify socket (it retries every 1 s)
QEMU_EXIT_GRACE = 1.0  # s a QEMU whose monitor hung up has to exit, to be told apart from one that runs on


class Run:
    """One run of one VM; ``ended`` is set once everything it held is released (or handed on)."""

    def __init__(self, config: MachineConfig, runtime: RuntimeDir, *, on_event: RunEventHandler,
                 die_with_parent: bool = True, console_socket: bool = False, plan: LaunchPlan | None = None,
                 identity: Identity = ROOT, spares: Spares | None = None, launcher: QemuProcess | None = None,
                 fdstore: FdStore | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.identity = identity  # whom QEMU and its helpers run as; the daemon acts as them on their files
        self._spares = spares  # a launcher and a TPM state made ahead of need (the daemon's)
        self._launcher = launcher  # a launcher started for this run ahead of need (vmspawn's)
        self._fdstore = fdstore  # the daemon's service's, where the notify listener outlives a restart
        self.log = log.bind(machine=config.name)
        self.readiness = Readiness()
        self.qemu: QemuProcess | None = None
        self.pty: Pty | None = None
        self.units: list[str] = []
        self.tpm_state_path: Path | None = None
        self._tpm: RunningService | None = None  # the swtpm this run started, if any
        self._quoted: RunningService | None = None  # a helper whose log the run's failure quotes
        self._helpers: list[RunningService] = []  # the helpers this run started or adopted
        self._logging: list[RunningService] = []  # the helpers with a log file, watched while the VM runs
        self.vsock: GuestVsock | None = None  # the guest's vsock device, if it has one
        self.vsock_port: int | None = None  # the host port its notifications go to
        self._vsock_backend: VsockBackend | None = None  # chosen before anything starts
        self.registered = False
        self._plan = plan  # what the host offers this start, if the caller looked already
        self.control_socket: Path | None = None  # io.systemd.MachineInstance, while this process serves it
        self.console: ConsoleRelay | None = None  # the daemon's relay of the console socket, if any
        self.forced = False  # we had to end it (kill): the exit status says so
        self.stop_requested = False  # a stop or kill was asked for: a signal death is expected
        self._forcing_off = False  # a stop timed out: the VM is being forced off
        self._signals_sent = 0  # Kills whose signal was just sent: QEMU may end of it (asked for, then)
        #: its vCPUs are stopped (a Pause, machinectl pause, or QEMU's own stop on a disk error)
        self.paused = False
        #: its guest suspended itself to RAM (ACPI S3): QEMU runs, the guest waits to be woken (a Resume)
        self.suspended = False
        #: held while the run changes its vCPUs' state (pause, resume, reset, a stop's press of the power
        #: button): a pause never slips between a stop's resume and its press; a kill never waits for it
        self._controlling = asyncio.Lock()
        self.returncode: int | None = None
        self.exit_status: int | None = None
        self.failure: str | None = None
        #: what went wrong without failing the run (a helper logged errors, a stop had to force the VM
        #: off, QEMU paused it on a disk error): the machine shows it from then until its next start.
        #: Replaced, never changed in place (see :meth:`warn`).
        self.warnings: list[str] = []
        self._paused_why: str | None = None  # why QEMU is about to pause the VM (a disk error)
        self.ended = asyncio.Event()
        self._qemu_exited = asyncio.Event()
        self._on_event = on_event
        self._die_with_parent = die_with_parent
        self._console_socket = console_socket
        self._output: QemuOutput | None = None  # QEMU's stdout and stderr, read by a daemon's run
        self._running = False
        self._detached = False
        self.failing = False  # its start failed, and it is releasing what it had acquired
        self._failure: str | None = None  # why the run fails, known before QEMU ends (a helper died, terminated)
        self._qmp: Qmp | None = None
        self._channel: NotifyChannel | None = None  # the guest's notifications
        self._ssh_key: SshKeyPair | None = None
        self._systemd: SystemdManager | None = None  # the connection to the service manager (maybe shared)
        self._record: RunRecord | None = None
        self._watch: asyncio.Task[None] | None = None
        self._watches: set[asyncio.Task[None]] = set()
        self._stack = contextlib.AsyncExitStack()
        self._handles = contextlib.AsyncExitStack()
        self._durable = contextlib.AsyncExitStack()
        self._after_exec: list[Callable[[], None]] = []  # see after_exec

    @property
    def ssh_key(self) -> Path | None:
        """--pass-ssh-key's private key for the guest, while the run has one."""
        return self._ssh_key.private_key if self._ssh_key is not None else None

    @property
    def pid(self) -> int | None:
        return self.qemu.pid if self.qemu is not None else None

    # ---------------------------------------------------------------- start
    async def start(self) -> None:
        """Set everything up and exec QEMU.  On failure everything acquired is released (and
        ``ended`` is set) before the error is raised."""
        try:
            await self._open_stacks()
            await self._start()
        except BaseException:
            self.failing = True  # (a Kill now waits for this, rather than cutting it short)
            await self._close_failed()
            raise
        self._running = True
        self._watch = asyncio.get_running_loop().create_task(self._watch_exit())
        for service in self._logging:  # (what they logged so far; from now on, as they write)
            self._note_logged(service)

    def after_exec(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once QEMU is exec'd, in the event loop's next turn (off the way to the exec);
        never if the start fails before."""
        self._after_exec.append(callback)

    async def _open_stacks(self) -> None:
        await self._stack.enter_async_context(self._handles)
        await self._stack.enter_async_context(self._durable)
        self._stack.callback(self._cancel_watches)  # before helpers stop: their end is then ours

    async def _start(self) -> None:
        config = self.config
        systemd, why = await self._connect_systemd()
        self._systemd = systemd
        if self._needs_launcher(systemd):
            # fork early, exec late: the launcher that becomes QEMU starts first, while we set up
            if self._spares is not None and not self._die_with_parent:  # (a spare outlives us, as VMs do)
                self.qemu = self._spares.launcher.take()
            else:
                self.qemu = QemuProcess.reuse_or_fork(self._launcher, die_with_parent=self._die_with_parent)
            self._handles.callback(self.qemu.close)
            self._durable.push_async_callback(self.qemu.end)
        elif self._launcher is not None:
            await self._launcher.end()  # started for us, not needed: ended and reaped
        self._launcher = None
        with self._as_owner():
            plan = self._plan or plan_launch(config)  # the host, looked at once for this start
        config = self.config = plan.effective(config)  # (a directory's own kernel, when it has no --linux)
        if self.identity.switches and (needs := needs_privileges(config, plan)):
            raise ConfigError(*needs[0])
        qemu_binary, accel, mac, extra_args = self._preflight()
        self.runtime.lock()
        self._handles.callback(self.runtime.unlock)
        earlier = RunRecord.load(self.runtime.records)
        if earlier is not None and earlier.phase == RUNNING and qemu_of_record(earlier, self.runtime.path):
            raise StartError(f"the QEMU of an earlier run still runs (pid {earlier.pid}); stop or kill it first")
        await end_leftovers(self.runtime, config.directory)
        rundir = self.runtime.renew(self.identity)
        self._durable.callback(self.runtime.remove_files)
        pid = self.qemu.pid if self.qemu is not None else 0  # (0 until QEMU is spawned)
        self._record = RunRecord(pid=pid, starttime=process_start_time(pid) if pid else None, name=config.name,
                                 uid=self.identity.uid, gid=self.identity.gid, groups=list(self.identity.groups))
        self._save(required=True)
        run_config = await self._ephemeral_copy()
        pass_fds: list[int] = []
        version = qemu_version(qemu_binary, cache_dir=self.runtime.path.parent)
        channel = await self._open_notify_channel(rundir, pass_fds, version)
        aux = await self._start_scope_and_helpers(run_config, plan, rundir, systemd, why)
        crash_point("helpers-started")
        if self.qemu is not None:
            self._durable.push_async_callback(self.qemu.end)  # on a failure from here: QEMU ends before its helpers
        generated = aux.credentials + await self._ssh_key_credentials(rundir)

        if channel.credential:
            generated.append((channel.credential[0], channel.credential[1].encode()))
        ours = {cred_id for cred_id, _ in generated}
        if taken := next((cred_id for cred_id, _ in config.credentials if cred_id in ours), None):
            raise ConfigError("credential", taken, "vmspawn passes the guest a credential of this name itself")
        credentials = list(config.credentials) + generated
        term = os.environ.get("TERM")
        extra_cmdline = self._synthesized_cmdline() + tuple(aux.cmdline)
        uki = plan.uki
        if config.linux is not None and not uki:  # (what a run adds counts too: root=PARTUUID=…, binds)
            check_cmdline_length(config, term, extra_cmdline)
        with self._as_owner():
            self._grow_image()  # (the last change to the host's files before QEMU: nothing refuses the start after it)
            credential_files = write_credentials(rundir / "smbios", credentials, config.smbios11
                                                 + tuple(cmdline_smbios_strings(config, term, extra_cmdline, uki)))
            qmp_sock = self._listen(rundir / "qmp.sock", pass_fds)
            console_sock = self._open_console(rundir, pass_fds)
            firmware, nvram = self._prepare_firmware(rundir, plan.firmware)
            initrd = self._merge_initrds(rundir) if config.initrds else None
        kernel_vsock = self.vsock if self.vsock is not None and self.vsock.fd is not None else None
        resources = Resources(
            qemu=qemu_binary, kvm=accel.kvm, qmp_fd=qmp_sock.fileno(), qemu_version=version,
            console_pty=self.pty.slave_path if self.pty else None,
            console_fd=console_sock.fileno() if console_sock else None,
            notify_args=tuple(channel.qemu_args), vsock_cid=kernel_vsock.cid if kernel_vsock else None,
            vsock_fd=kernel_vsock.fd if kernel_vsock else None,
            smbios_files=tuple(credential_files.smbios), fw_cfg_files=tuple(credential_files.fw_cfg),
            initrd=initrd,
            vmgenid=uuid.uuid4(), term=term, extra_cmdline=extra_cmdline,
            firmware_args=tuple(firmware.qemu_args(nvram)),
            smm=firmware.smm, aux_args=tuple(aux.qemu_args), uki=uki,
            mac=mac, extra_args=extra_args,
        )
        argv = build_qemu_argv(run_config, resources)
        self.log.debug("spawning qemu", argv=" ".join(argv))
        keep_stdin = config.console is ConsoleMode.NATIVE
        output = self._output = QemuOutput(self.log) if self._console_socket else None  # (a daemon's run)
        if output is not None:
            self._handles.callback(output.close)
        output_fd = output.write_fd if output is not None else None
        if self.qemu is None:
            self._spawn_qemu(argv, pass_fds, keep_stdin, output_fd)
        else:
            self.qemu.exec(argv, pass_fds, self.identity, keep_stdin=keep_stdin, output=output_fd)
            if self._spares is not None:
                self._spares.launcher.refill()  # the next start's, while QEMU comes up
        # (shown by a next daemon for a running VM whose definition went; one that undoes a start needs none)
        self._record.config = config_to_json(config, secrets=False)
        if output is not None:
            output.start()
            self._store_output(output)  # (after the exec: not on its path)
        for callback in self._after_exec:
            asyncio.get_running_loop().call_soon(callback)
        # (logged once QEMU runs: a line costs ≈ 0.1 ms after idling)
        self.log.info("firmware", kind=firmware.kind.value, reason=firmware.reason,
                      descriptor=str(firmware.descriptor.path) if firmware.descriptor else None,
                      nvram=str(nvram) if nvram else None)
        self.log.info("accelerator", kvm=accel.kvm, reason=accel.reason)
        for sock in (qmp_sock, console_sock):  # QEMU has its copies
            if sock is not None:
                sock.close()
        crash_point("exec")
        await self._connect_qmp(rundir / "qmp.sock")
        await self._serve_control()
        await self._register(run_config)
        assert self._record is not None
        self._record.phase = RUNNING
        self._save(required=True)
        crash_point("recorded")

    def _needs_launcher(self, systemd: SystemdManager | None) -> bool:
        """Whether QEMU's process needs something done before its first instruction, so that a launcher
        must exec it late: moved into its scope, switched to the VM's user, or bound to die with us
        (vmspawn's).  Else it is spawned at once when everything is ready (:meth:`_spawn_qemu`)."""
        has_scope = systemd is not None and not self.config.keep_unit
        return has_scope or self.identity.switches or self._die_with_parent

    def _spawn_qemu(self, argv: list[str], fds: list[int], keep_stdin: bool, output: int | None) -> None:
        """Start QEMU at once (no launcher) and record its pid, which only now exists."""
        try:
            self.qemu = QemuProcess.spawn(argv, fds, keep_stdin=keep_stdin, output=output)
        except OSError as e:
            raise StartError(f"cannot run QEMU ({argv[0]}): {e.strerror or e}") from None
        self._handles.callback(self.qemu.close)
        self._durable.push_async_callback(self.qemu.end)  # (after the helpers': it ends before them)
        assert self._record is not None
        self._record.pid, self._record.starttime = self.qemu.pid, process_start_time(self.qemu.pid)
        self._save(required=True)

    def _preflight(self) -> tuple[Path, Accelerator, str | None, tuple[str, ...]]:
        """Checks and look-ups that need no resources: QEMU binary, accelerator, TAP rights, MAC."""
        config = self.config
        check_cmdline_length(config, os.environ.get("TERM"))
        if config.network is Network.TAP and not has_capability(CAP_NET_ADMIN):
            raise ConfigError("network-tap", "", "TAP networking needs CAP_NET_ADMIN (run as root)")
        self._vsock_backend = choose_vsock(config.vsock)
        if config.forward_journal is not None and self._vsock_backend is None:
            raise ConfigError("forward-journal", str(config.forward_journal), "needs vsock (the guest sends its "
                              "journal over AF_VSOCK), and this host has neither a usable /dev/vhost-vsock nor "
                              "vhost-device-vsock")
        # $SYSTEMD_VMSPAWN_NETWORK_MAC is one VM's (vmspawn's); a daemon's would give all VMs one MAC
        environ = {} if self._console_socket else os.environ
        mac = tap_mac(config.name, environ) if config.network is Network.TAP else None
        extra_args = tuple(qemu_extra_args())
        qemu_binary = find_qemu()
        with self._as_owner():  # /dev/kvm as QEMU will open it
            accel = choose_accelerator(config.kvm)
        return qemu_binary, accel, mac, extra_args

    async def _ephemeral_copy(self) -> MachineConfig:
        """--ephemeral --directory: the configuration of a run on a copy of the tree (removed after)."""
        config = self.config
        if not (config.ephemeral and config.directory is not None):
            return config
        try:
            copy = EphemeralCopy(config.directory, self.runtime.records / COPY_RECORD)
            root = await self._durable.enter_async_context(copy)
        except SnapshotError as e:
            raise StartError(str(e)) from e
        except OSError as e:
            raise ConfigError("directory", str(config.directory), e.strerror or str(e)) from None
        return config.replace(directory=root)

    def _grow_image(self) -> None:
        """--grow-image: only once we own the machine, and never on an --ephemeral run's image."""
        config = self.config
        if not config.grow_image or config.image is None:
            return
        if config.ephemeral:
            self.log.warning("--grow-image is ignored with --ephemeral: the image is never written")
        elif config.image.disk_type is DiskType.SCSI_CD:
            self.log.warning("--grow-image is ignored with --image-disk-type=scsi-cd: a CD-ROM is never written")
        elif grow_image(config.image.path, config.grow_image):
            self.log.info("image grown", image=str(config.image.path), size=config.grow_image)

    def _store_output(self, output: QemuOutput) -> None:
        """Keep a copy of the read end of QEMU's output pipe in the daemon's store until the run ends:
        what QEMU writes while no daemon runs waits there for the daemon that adopts the VM."""
        if self._fdstore is None:
            return
        stored_as = output_name(self.config.name)
        output.hold_while_away()
        self._fdstore.keep(stored_as, output.read_fd)
        self._durable.callback(self._fdstore.forget, stored_as)

    def _resume_output(self) -> None:
        """Read QEMU's output on from the pipe an earlier daemon kept in the store, if it did."""
        if self._fdstore is None:
            return
        stored_as = output_name(self.config.name)
        fd = self._fdstore.take_fd(stored_as)
        if fd is None:
            return
        self._durable.callback(self._fdstore.forget, stored_as)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # (not what we stored)
            os.close(fd)
            return
        output = self._output = QemuOutput(self.log, read_fd=fd)
        self._handles.callback(output.close)
        output.start()

    async def _new_notify_channel(self) -> NotifyChannel:
        """The channel of the guest's notifications, its listener kept in the daemon's store until the
        run ends (not when the daemon only detaches: a restarted daemon listens on it again)."""
        stored_as = notify_name(self.config.name)
        channel = NotifyChannel(self._guest_message, self._fdstore, stored_as)
        self._channel = await self._stack.enter_async_context(channel)
        if self._fdstore is not None:
            self._durable.callback(self._fdstore.forget, stored_as)
        return channel

    async def _open_notify_channel(self, rundir: Path, pass_fds: list[int],
                                   version: tuple[int, int] = (0, 0)) -> NotifyChannel:
        """Listen for the guest's notifications (over vsock if it gets one, else virtio-serial) before
        QEMU starts."""
        channel = await self._new_notify_channel()
        name, fixed_cid = self.config.name, self.config.vsock_cid
        if self._vsock_backend is VsockBackend.KERNEL:
            fd, cid = claim_vsock(name, fixed_cid=fixed_cid)
            self._stack.callback(os.close, fd)
            pass_fds.append(fd)
            self.vsock = GuestVsock(VsockBackend.KERNEL, cid, fd=fd)
            await channel.listen_vsock(peer_cid=cid)
        elif self._vsock_backend is VsockBackend.VHOST_USER:
            self.vsock = GuestVsock(VsockBackend.VHOST_USER, hybrid_cid(name, fixed_cid),
                                    socket=rundir / HYBRID_SOCKET)
            check_socket_path(self.vsock.host_port_path(HYBRID_NOTIFY_PORT))
            await channel.listen_hybrid(self.vsock.host_port_path(HYBRID_NOTIFY_PORT), HYBRID_NOTIFY_PORT,
                                        self.identity)
        else:
            if fixed_cid is not None:
                self.log.warning("--vsock-cid is ignored: the guest has no vsock here", cid=fixed_cid)
            await channel.listen_virtio_serial(rundir / "notify.sock", version, identity=self.identity)
        self.vsock_port = channel.port
        if self.vsock is not None:
            self.log.info("vsock", backend=str(self.vsock.backend), cid=self.vsock.cid)
        return channel

    async def _start_scope_and_helpers(self, run_config: MachineConfig, plan: LaunchPlan, rundir: Path,
                                       systemd: SystemdManager | None, why: str) -> AuxServices:
        """The scope (around the launcher) and the helpers, as units where ``systemd`` runs, else children."""
        scope = await self._allocate_scope(systemd, why)
        self.units = [scope] if scope else []
        runner = await choose_runner(die_with_parent=self._die_with_parent, manager=systemd)
        self._handles.push_async_callback(runner.aclose)
        try:
            aux = await start_aux_services(run_config, plan, runner, rundir, bound_to=scope, vsock=self.vsock,
                                           on_started=self._helper_started, identity=self.identity,
                                           tpm_spares=self._spares.tpm if self._spares is not None else None)
        except AuxServiceError as e:
            raise StartError(str(e)) from e
        for what, service in aux.services:
            self._hold_service(what, service)
        self._tpm = aux.tpm
        self.tpm_state_path = aux.tpm_state
        self.units += aux.units
        if self.units and not aux.services:  # (a helper's start saved the record, which named the scope then)
            self._save(required=True)
        return aux

    async def _connect_systemd(self) -> tuple[SystemdManager | None, str]:
        """The service manager: the daemon's connection, else one of this run's own."""
        if self._spares is not None:
            return await self._spares.systemd.get()
        systemd, why = await connect_systemd()
        if systemd is not None:
            self._handles.push_async_callback(systemd.aclose)
        return systemd, why

    def _helper_started(self, what: str, service: RunningService) -> None:
        """Record a helper the moment it is up, so a daemon killed from now on leaves no orphan (a start
        that cannot record it fails)."""
        assert self._record is not None
        self._record.helpers.append(HelperRecord(what, service.name, service.pid,
                                                 process_start_time(service.pid) if service.pid else None,
                                                 service.unit, str(service.log_path) if service.log_path else None))
        self._save(required=True)

    def _hold_service(self, what: str, service: RunningService) -> None:
        """The run owns a running helper: stopped with the run, watched while the VM runs."""
        self._helpers.append(service)
        self._handles.callback(service.detach)
        self._durable.push_async_callback(self._stop_service, service)
        self._spawn(self._watch_service(what, service))
        if service.log_path is not None:
            self._logging.append(service)
            self._spawn(self._watch_log(service))

    def _spawn(self, coro: Any) -> None:
        """A task of this run's, cancelled when the run ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._watches.add(task)
        task.add_done_callback(self._watches.discard)

    async def _ssh_key_credentials(self, rundir: Path) -> list[tuple[str, bytes]]:
        """--pass-ssh-key: a fresh key pair (auto: when the guest has vsock, the way to reach its sshd)."""
        setting = self.config.pass_ssh_key
        if setting is Tristate.NO or (setting is Tristate.AUTO and self.vsock is None):
            return []
        try:
            self._ssh_key = await generate_key_pair(rundir, self.config.ssh_key_type, f"vmspawnd@{self.config.name}",
                                                    self.identity)
        except SshKeyError as e:
            if setting is Tristate.YES:
                raise StartError(str(e)) from e
            self.log.warning("continuing without an SSH key for the guest", error=str(e))
            return []
        with self._as_owner():
            return self._ssh_key.credentials()

    def _listen(self, path: Path, pass_fds: list[int]) -> socket.socket:
        """A listening socket QEMU serves (QMP, the daemon's console): created by us, so it accepts
        connections before QEMU runs (no race, no polling for it), and inherited by QEMU."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(sock.close)
        sock.bind(str(path))
        sock.listen(4)
        pass_fds.append(sock.fileno())
        return sock

    def _open_console(self, rundir: Path, pass_fds: list[int]) -> socket.socket | None:
        """A PTY for vmspawn's console, or (daemon) the socket QEMU serves it on, in the runtime dir."""
        if self.config.console not in (ConsoleMode.INTERACTIVE, ConsoleMode.READ_ONLY):
            return None
        if self._console_socket:
            return self._listen(rundir / "console.sock", pass_fds)
        self.pty = Pty()
        self._stack.callback(self.pty.close)
        return None

    def _prepare_firmware(self, rundir: Path, firmware: FirmwareChoice) -> tuple[FirmwareChoice, Path | None]:
        config = self.config
        nvram = None
        template = firmware.nvram_template(config.efi_nvram_template)
        if template is not None:
            base = config.image.path if config.image is not None else config.directory
            nvram = prepare_nvram(template, nvram_state_path(config.efi_nvram_state, base, config.ephemeral), rundir)
        return firmware, nvram

    async def _connect_qmp(self, path: Path) -> None:
        assert self.qemu is not None
        self._qmp = await self._stack.enter_async_context(Qmp(self.config.name))
        self._qmp.add_listener(self._qemu_event)
        try:
            await self._qmp.connect(str(path), identity=self.identity)
        except Exception as e:
            with contextlib.suppress(TimeoutError):  # a QEMU that fails at start-up may be still exiting
                await asyncio.wait_for(self.qemu.wait(), QEMU_EXIT_GRACE)
            rc = None if self.qemu.alive else self.qemu.returncode
            if rc is None:
                raise StartError(f"cannot connect to QEMU's monitor: {e}") from e
            lines: list[str] = []
            if self._output is not None:  # (else QEMU said it on our own stderr: vmspawn's user saw it)
                await self._output.ended(1.0)
                lines = [line for line in self._output.last if line.strip()]
            said = ": " + " / ".join(lines) if lines else ""
            qemu_failed = f"QEMU did not come up (exit status {rc}){said}"
            helper_failed = await self._helper_failure(qemu_failed)
            raise StartError(helper_failed or qemu_failed) from e

    async def _helper_failure(self, qemu_failed: str) -> str | None:
        """Why a helper failed QEMU's start (which ``qemu_failed`` tells), if one did: a TPM state swtpm
        cannot use, or a helper that ended with an error (they are socket-activated: QEMU found that out,
        not us; their end may reach us a moment after QEMU's).  The helper's log is then quoted by the
        failure, not warned of."""
        if self._tpm is not None and self.tpm_state_path is not None:
            if unusable := state_unusable(self._tpm, self.tpm_state_path):
                self._quoted = self._tpm
                return unusable
        running = [asyncio.ensure_future(service.wait()) for service in self._helpers if service.alive]
        if running:
            await asyncio.wait(running, timeout=HELPER_END_GRACE)
            for waiting in running:
                waiting.cancel()
        for service in self._helpers:
            if failed := service.failed_early():
                self._quoted = service
                return f"{failed}; {qemu_failed}"
        return None

    async def _serve_control(self) -> None:
        """The VM's ``io.systemd.MachineInstance`` socket (machinectl poweroff/reboot… on systemd ≥ 261), in
        the records dir: the daemon's alone (in the VM's directory, its user could put another VM's
        socket in its place, which machined would then drive)."""
        path = control_path(self.runtime.records)
        if path is None:
            self.log.warning("no control socket: the records directory's path is too long",
                             path=str(self.runtime.records))
            return
        try:
            await self._stack.enter_async_context(ControlListener(path, self))  # (served once called)
        except OSError as e:
            self.log.warning("no control socket", path=str(path), error=str(e))
            return
        self.control_socket = path

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
        self._handles.push_async_callback(systemd.unref_unit, scope_unit_name(config.name))  # (AddRef)
        try:
            scope = await allocate_scope(systemd, config.name, self.qemu.pid, config.slice, config.properties)
        except UnitStartError as e:
            raise StartError(str(e)) from e
        self.log.info("QEMU's scope", unit=scope, slice=config.slice)
        return scope

    async def _register(self, run_config: MachineConfig) -> None:
        """Register with systemd-machined over varlink, starting machined first if it is not running;
        with --register=auto a machined that cannot be reached is retried in the background."""
        config = self.config
        if config.register is Tristate.NO:
            return
        assert self.qemu is not None and self._record is not None
        reg = Registration(config.name, self.qemu.pid, machine_id=config.uuid,
                           root_directory=run_config.directory, vsock=self.vsock,
                           ssh_private_key=self._ssh_key.private_key if self._ssh_key else None,
                           control_address=self.control_socket)
        if self._systemd is not None:
            why = await start_machined(self._systemd)
            if why is not None:
                self.log.warning("systemd-machined is not running", reason=why)
        try:
            await self._enter_registration(reg)
        except RegistrationError as e:
            if config.register is Tristate.YES:
                raise StartError(f"cannot register with systemd-machined: {e}") from e
            if self._systemd is None:  # no systemd here: no machined to wait for
                self.log.info("not registered with systemd-machined", reason=str(e))
                return
            self.log.warning("not registered with systemd-machined yet; retrying while the VM runs",
                             reason=str(e), message_id=messages.REGISTRATION_FAILED)
            self._spawn(self._register_later(reg))

    async def _enter_registration(self, reg: Registration) -> None:
        assert self._record is not None
        self._record.registered = True  # recorded first: a daemon killed meanwhile still unregisters it
        self._record.control_address = str(reg.control_address) if reg.control_address else None
        self._save()
        try:
            registration = await self._durable.enter_async_context(MachineRegistration(reg))
        except RegistrationError:
            self._record.registered = False
            self._save()
            raise
        if not registration.with_control and self._record.control_address is not None:
            self._record.control_address = None  # (machined < 261 took none)
            self._save()
        self.registered = True

    async def _register_later(self, reg: Registration) -> None:
        """Register as soon as machined answers (it may be started later, or restarted)."""
        while True:
            await asyncio.sleep(REGISTER_RETRY)
            if not await machined_reachable():
                continue
            try:
                await self._enter_registration(reg)
            except RegistrationError as e:
                self.log.debug("still not registered with systemd-machined", reason=str(e))
                continue
            self.log.info("registered with systemd-machined")
            return

    def _synthesized_cmdline(self) -> tuple[str, ...]:
        """``root=PARTUUID=…`` when a plain kernel boots with an image and the user named no root; ``ro``
        after the user's ``rw`` when the image is a CD-ROM (the last of the two counts)."""
        config = self.config
        if config.image is None:
            return ()
        words: list[str] = []
        if config.linux is not None and not any(w.startswith(("root=", "mount.usr=")) for w in config.kernel_cmdline):
            with self._as_owner():
                words.append(root_cmdline_word(config.image.path))
        if config.image.disk_type is DiskType.SCSI_CD and "rw" in config.kernel_cmdline:
            words.append("ro")
        return tuple(words)

    def _merge_initrds(self, rundir: Path) -> Path:
        if len(self.config.initrds) == 1:
            return self.config.initrds[0]
        merged = rundir / "initrd.merged"
        with naming_file(merged), open(merged, "wb") as out:
            for piece in self.config.initrds:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out)
                out.write(b"\0" * (-out.tell() % 4))
        return merged

    # ---------------------------------------------------------------- adoption
    async def adopt(self, record: RunRecord) -> None:
        """Take over the running QEMU ``record`` names (checked by the caller with :func:`qemu_of_record`):
        its helpers, notify channel and QMP.  On failure the run is ended, QEMU included."""
        try:
            await self._open_stacks()
            await self._adopt(record)
        except BaseException:
            await self._close_failed()
            raise
        self._running = True
        self._watch = asyncio.get_running_loop().create_task(self._watch_exit())
        for service in self._logging:  # (what they logged so far; from now on, as they write)
            self._note_logged(service)

    async def _adopt(self, record: RunRecord) -> None:
        self.identity = record.identity()  # as it was started
        self.runtime.lock()  # raises if someone else holds the machine
        self._handles.callback(self.runtime.unlock)
        rundir = self.runtime.keep(self.identity)
        self._durable.callback(self.runtime.remove_files)
        self._record = record
        self.readiness = Readiness(record.ready, record.status, record.guest_exit_status)
        self.warnings = list(record.warnings)
        self.units = list(record.units)
        self.tpm_state_path = Path(record.tpm_state) if record.tpm_state else None
        self.registered = record.registered
        self.vsock = record.vsock(rundir)
        self._ssh_key = SshKeyPair(Path(record.ssh_key)) if record.ssh_key else None
        self.qemu = QemuProcess.adopt(record.pid)
        self._handles.callback(self.qemu.close)
        self._durable.push_async_callback(self.qemu.end)
        root = self.config.directory
        copy = EphemeralCopy.recorded(self.runtime.records / COPY_RECORD, root)
        if copy is not None:  # (its own tree's, whatever the definition says now)
            self._durable.push_async_callback(copy.remove)
            root = copy.path
        if record.registered:
            self._durable.push_async_callback(unregister_quietly, self.config.name)
        await self._adopt_helpers(record)
        self._durable.push_async_callback(self.qemu.end)  # QEMU ends before its helpers
        self._resume_output()
        channel = await self._new_notify_channel()
        if self.vsock is not None and self.vsock.backend is VsockBackend.VHOST_USER and record.vsock_port:
            await channel.listen_hybrid(self.vsock.host_port_path(record.vsock_port), record.vsock_port,
                                        self.identity)
        elif record.vsock_port:
            await channel.listen_vsock(record.vsock_port, peer_cid=record.vsock_cid)
        else:
            await channel.listen_virtio_serial(rundir / "notify.sock", identity=self.identity)
        self.vsock_port = channel.port
        self._qmp = await self._stack.enter_async_context(Qmp(self.config.name))
        self._qmp.add_listener(self._qemu_event)
        await self._qmp.connect(str(rundir / "qmp.sock"), identity=self.identity)
        await self._note_pause()
        await self._serve_control()
        if record.registered and record.control_address is not None and record.control_address != str(
                self.control_socket):
            await self._register_again(root)

    async def _note_pause(self) -> None:
        """An adopted VM is paused if QEMU says so (paused while no daemon watched, say), and suspended if
        its guest suspended itself (for which QEMU sends no STOP)."""
        try:
            running, status = await self._monitor().query_status()
        except Exception as e:  # (its next STOP or RESUME says it)
            self.log.warning("cannot ask QEMU whether the VM is paused", error=str(e) or type(e).__name__)
            return
        self.paused = not running and status != "suspended"
        self.suspended = status == "suspended"
        said = any(w.endswith(PAUSED_BY_QEMU) for w in self.warnings)  # (the previous daemon's, naming the disk)
        if status == DISK_ERROR_STATUS and not said and self.warn(await self._failed_disk()):
            self.log.warning("QEMU paused the VM after a disk error")

    async def _failed_disk(self) -> str:
        """Why QEMU paused the VM after a disk error that no daemon saw: the disk QEMU says failed."""
        try:
            failed = await self._monitor().failed_disks()
        except Exception as e:  # (the generic reason, then)
            self.log.warning("cannot ask QEMU which disk failed", error=str(e) or type(e).__name__)
            failed = []
        if not failed:
            return DISK_ERROR_PAUSE
        drive, io_status = failed[0]
        return self._disk_paused(drive, "request", "No space left on device" if io_status == "nospace" else "")

    def _disk_paused(self, drive: str, operation: str, reason: str) -> str:
        """The warning of a VM that QEMU paused as ``operation`` on ``drive`` (its name in QEMU) failed."""
        disk = drive_path(self.config.image, self.config.extra_drives, drive) or drive
        return f"a {operation} of its disk {disk} failed ({reason or 'I/O error'}): {PAUSED_BY_QEMU}"

    async def _register_again(self, root: Path | None) -> None:
        """Tell machined where this daemon serves the VM's control socket, when the run was registered
        with another address (an older version kept it in the VM's runtime dir, which its user may
        write to): registered anew, under the same name and leader.  A failure leaves it unregistered."""
        assert self.qemu is not None
        reg = Registration(self.config.name, self.qemu.pid, machine_id=self.config.uuid, root_directory=root,
                           vsock=self.vsock, ssh_private_key=self._ssh_key.private_key if self._ssh_key else None,
                           control_address=self.control_socket)
        await unregister_quietly(self.config.name)
        await forgotten(self.config.name)
        try:
            await self._enter_registration(reg)
        except RegistrationError as e:
            self.registered = False
            self.log.warning("could not register the adopted VM with systemd-machined again", reason=str(e),
                             message_id=messages.REGISTRATION_FAILED)
            return
        self.log.info("registered with systemd-machined again, with the control socket's new address",
                      control_address=str(self.control_socket))

    async def _adopt_helpers(self, record: RunRecord) -> None:
        """Watch the recorded helpers again, exactly like a fresh run's; a helper that is gone fails
        the adoption (the VM lost its TPM or a shared folder while no daemon watched)."""
        runner: UnitRunner | None = None
        if any(h.unit for h in record.helpers):
            systemd, why = await self._connect_systemd()
            if systemd is None:
                raise StartError(f"cannot watch the helper units: {why}")
            runner = UnitRunner(systemd)
        for helper in record.helpers:
            service: RunningService
            log_path = Path(helper.log) if helper.log else None
            try:
                if helper.unit is not None:
                    assert runner is not None
                    service = await runner.adopt(helper.name, helper.unit, log_path=log_path, identity=self.identity)
                elif process_start_time(helper.pid) == helper.starttime:
                    service = AdoptedChildService(helper.name, helper.pid, log_path=log_path, identity=self.identity)
                else:
                    raise ProcessLookupError(helper.pid)
            except (ServiceError, ProcessLookupError) as e:
                raise StartError(f"{helper.what} ended while no daemon watched it ({e})") from e
            if helper.what == TPM:
                self._tpm = service
            self._hold_service(helper.what, service)
        if not record.helpers and record.units:  # a record of an older version: units, no helpers
            self._durable.push_async_callback(stop_units, record.units)

    # ---------------------------------------------------------------- while it runs
    def _guest_message(self, message: list[tuple[str, str]]) -> None:
        """One notification of the guest: its ``KEY=VALUE`` lines in order.  "ready" carries the STATUS=
        sent with it (systemd-vmspawn's own status says it then)."""
        sent_with = [value[:MAX_STATUS] for key, value in message if key == "STATUS"]
        for key, value in message:
            change = self.readiness.feed(key, value)
            if change.warning:
                self.log.warning(change.warning)
            if change.event == "ready":
                self.log.info("guest is ready", message_id=messages.READY)
            if change.persist:
                self._save()
            if change.event == "status":
                self._on_event(self, "status", {"status": self.readiness.status})
            elif change.event == "ready":
                self._on_event(self, "ready", {"status": sent_with[-1]} if sent_with else {})
            elif change.event is not None:
                self._on_event(self, change.event, {})

    def _qemu_event(self, name: str, data: dict[str, Any]) -> None:
        """A reset (machinectl reboot, or the guest's own) starts a new boot: not ready until it says so.
        QEMU's STOP and RESUME (whoever asked) pause and resume it; SUSPEND and WAKEUP say that the
        guest suspended itself to RAM and woke up."""
        if name in ("STOP", "RESUME"):
            self._set_paused(name == "STOP")
            return
        if name in ("SUSPEND", "WAKEUP"):
            self._set_suspended(name == "SUSPEND")
            return
        if name == "BLOCK_IO_ERROR" and data.get("action") == "stop":  # (a STOP follows)
            self._paused_why = self._disk_paused(str(data.get("device") or data.get("node-name") or ""),
                                                 str(data.get("operation") or "request"), str(data.get("reason") or ""))
            if self.warn(self._paused_why):
                self.log.warning("disk error: QEMU pauses the VM", device=data.get("device"),
                                 node=data.get("node-name"), operation=data.get("operation"), reason=data.get("reason"))
            return
        if name != "RESET":
            return
        reason = str(data.get("reason") or "reset")
        self._set_suspended(False)  # (a reset wakes a suspended guest: it boots again)
        self.log.info("VM reset; waiting for the guest to be ready again", reason=reason, message_id=messages.RESET)
        self.readiness = Readiness()
        self._save()
        self._on_event(self, "reset", {"reason": reason})

    def _set_paused(self, paused: bool) -> None:
        """Note that the vCPUs stopped or run again (told by QEMU's event, or by the command's answer,
        whichever comes first), once."""
        if paused != self.paused and not self._qemu_exited.is_set():
            self.paused = paused
            why, self._paused_why = (self._paused_why if paused else None), None
            self.log.info("VM paused" if paused else "VM resumed", reason=why)
            self._on_event(self, "paused" if paused else "resumed", {"reason": why} if why else {})

    def _set_suspended(self, suspended: bool) -> None:
        """Note that the guest suspended itself to RAM, or woke up (told by QEMU's event, or by the
        wake-up's answer, whichever comes first), once."""
        if suspended != self.suspended and not self._qemu_exited.is_set():
            self.suspended = suspended
            self.log.info("the guest suspended itself to RAM" if suspended else "the guest woke up")
            self._on_event(self, "suspended" if suspended else "woke", {})

    def warn(self, text: str) -> bool:
        """Add ``text`` to the run's warnings, unless it is there (False).  The list is replaced, so a
        reply made from the old one is seen to be out of date."""
        if text in self.warnings:
            return False
        self.warnings = [*self.warnings, text]
        self._save()  # (a restarted daemon shows them too)
        return True

    # ---------------------------------------------------------------- io.systemd.MachineInstance
    @property
    def monitored(self) -> bool:
        """QEMU's monitor can be given commands (QEMU runs, and QMP is connected)."""
        return self._qmp is not None and self._qmp.connected and not self._qemu_exited.is_set()

    def _monitor(self) -> Qmp:
        if not self.monitored:
            from vmspawnd.systemd.instance import NotConnected  # (see systemd/control.py)

            raise NotConnected(f"{self.config.name} is not running")
        assert self._qmp is not None
        return self._qmp

    async def terminate(self) -> None:
        """End QEMU at once on request from outside (machinectl terminate): the run fails, exit status 1."""
        self._monitor()
        self._failure = self._failure or "terminated through its control socket (e.g. machinectl terminate)"
        self._spawn(self.kill(forced=True))

    async def power_off(self) -> None:
        """Press the ACPI power button; the guest decides (as ``machinectl poweroff`` expects)."""
        await self._monitor().powerdown()

    async def reboot(self) -> None:
        """Press the reset button: the guest boots again in the same QEMU (still registered); a paused
        VM runs again (else it would stay paused before its first instruction); a suspended guest is
        woken first (else QEMU waits for a ``cont``), its suspend forgotten before (else its firmware takes
        the reset for the wake-up and resumes the guest, not boots it)."""
        async with self._controlling:
            self._check_not_stopping("rebooted")
            if self.suspended:
                await self._monitor().forget_suspend()
                await self._wake()
            await self._monitor().reset()
            await self._resume_if_paused()

    async def pause(self) -> None:
        """Stop the vCPUs; memory and devices stay as they are."""
        async with self._controlling:
            self._check_not_stopping("paused")
            await self._monitor().pause()
            self._set_paused(True)

    async def resume(self) -> None:
        async with self._controlling:
            await self._resume()

    async def _resume_if_paused(self) -> None:
        if self.paused:
            await self._resume()

    async def _resume(self) -> None:
        """Let the vCPUs run again, and wake a guest that suspended itself, once QEMU is connected to the
        guest's notify port again (a VM paused while the daemon restarted: the guest's first words after
        it could be lost, READY=1 say)."""
        if self._channel is not None:
            await self._channel.qemu_connected(NOTIFY_RECONNECT_GRACE)
        await self._monitor().resume()
        self._set_paused(False)
        if self.suspended:
            await self._wake()

    async def _wake(self) -> None:
        """Wake the guest that suspended itself to RAM, and note it (once QEMU has)."""
        await self._monitor().wakeup()
        self._set_suspended(False)

    def _check_not_stopping(self, done: str) -> None:
        if self.stop_requested:
            raise WrongState(self.config.name, "stopping", f"only a running machine can be {done}")

    async def describe(self) -> tuple[bool, str]:
        return await self._monitor().query_status()

    def add_event_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        return self._monitor().add_listener(listener)

    async def _watch_service(self, what: str, service: RunningService) -> None:
        """A helper that dies while the VM runs takes the VM down, with a clear reason."""
        rc = await service.wait()
        if not self._running or self._qemu_exited.is_set() or self.stop_requested:
            return
        if service.lost:
            self.log.warning("no longer watching an auxiliary service; the VM keeps running", service=what)
            return
        with contextlib.suppress(TimeoutError):  # helpers also end when QEMU does: give QEMU a moment
            await asyncio.wait_for(asyncio.shield(self._qemu_exited.wait()), HELPER_GRACE)
            return
        self._failure = f"{what} exited unexpectedly ({describe_status(rc)}); stopping the VM"
        self.log.error("auxiliary service died", service=what, status=rc)
        await self.kill(forced=True)

    async def _stop_service(self, service: RunningService) -> None:
        try:
            await service.stop()
        except Exception as e:  # e.g. the bus went away: log, and let the rest of the cleanup run
            self.log.warning("could not stop an auxiliary service", service=service.name, error=str(e))
        self._note_logged(service)  # (its log file goes with the runtime dir: what it said stays in ours)

    async def _watch_log(self, service: RunningService) -> None:
        """Show what a helper logs while the VM runs, as it is written (swtpm that could not save the
        TPM state, say), not only when the run ends."""
        assert service.log_path is not None
        try:
            async for _ in writes(service.log_path):
                if self._running:  # (a start that fails quotes it in its error instead)
                    self._note_logged(service)
        except OSError as e:  # (cannot be watched: read when the helper stops)
            self.log.debug("cannot watch an auxiliary service's log", service=service.name, error=str(e))

    def _note_logged(self, service: RunningService) -> None:
        """What ``service`` logged so far, as the run's one warning about it (replacing an earlier one)."""
        said = logged_errors(service) if service is self._tpm else service.logged()
        if not said or service is self._quoted:  # (the start's error quoted it)
            return
        unsaved = (f"; the TPM state in {self.tpm_state_path} may not have been saved"
                   if service is self._tpm and self.tpm_state_path is not None else "")
        text = f"{service.name} logged errors: {' | '.join(said)}{unsaved}"
        earlier = [w for w in self.warnings if w.startswith(f"{service.name} logged errors: ")]
        if earlier == [text]:
            return
        self.warnings = [w for w in self.warnings if w not in earlier]
        self.warn(text)
        self.log.warning("auxiliary service logged errors", service=service.name, output=" | ".join(said))

    def _cancel_watches(self) -> None:
        for task in list(self._watches):
            task.cancel()

    def _save(self, *, required: bool = False) -> None:
        """Persist what a restarted daemon needs (``run.json``).  Where the start depends on it
        (``required``: without it, a restarted daemon would end the VM as a start it interrupted), a
        failure fails the start; later, it costs only the record's news (the last one stays whole)."""
        record = self._record
        if record is None or self._detached:
            return
        record.units, record.tpm_state = list(self.units), str(self.tpm_state_path) if self.tpm_state_path else None
        record.ready, record.status = self.readiness.ready, self.readiness.status
        record.guest_exit_status = self.readiness.exit_status
        record.vsock_port = self.vsock_port
        record.vsock_cid = self.vsock.cid if self.vsock is not None else None
        record.vsock_backend = str(self.vsock.backend) if self.vsock is not None else None
        record.ssh_key = str(self._ssh_key.private_key) if self._ssh_key is not None else None
        record.warnings = self.warnings
        try:
            record.save(self.runtime.records)
        except OSError as e:
            if required:
                raise HostError(f"cannot record the run in {self.runtime.records}", e) from e
            self.log.warning("cannot record the run's news (a restarted daemon finds its last record)", error=str(e))

    def _as_owner(self) -> contextlib.AbstractContextManager[None]:
        """The daemon's file accesses in this (synchronous) block are the VM's user's."""
        return acting_as(self.identity)

    def on_cleanup(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when this run's resources are released (before those acquired earlier)."""
        self._stack.callback(callback)

    def on_cleanup_async(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await ``callback()`` when this run's resources are released."""
        self._stack.push_async_callback(callback)

    # ---------------------------------------------------------------- ending
    async def _watch_exit(self) -> None:
        assert self.qemu is not None
        rc = await self.qemu.wait()
        self._qemu_exited.set()
        if self._signals_sent:  # the signal a Kill just sent ended it: asked for
            self.forced = self.stop_requested = True
        if self._channel is not None:
            await self._channel.drained(NOTIFY_GRACE)
        self.returncode = rc
        terminated = self._qmp is not None and self._qmp.shutdown_reason == OUTSIDE_SIGNAL
        expected = self.forced or self.stop_requested
        self.exit_status = exit_status(self.readiness.exit_status, rc, self.forced, terminated and not expected)
        if rc is not None and rc != 0:
            self.log.warning("QEMU exited abnormally", status=rc)
        try:
            await self._stack.aclose()
        except Exception:  # cleanup trouble must never leave the machine stuck "running"
            self.log.exception("cleaning up after the VM failed")
        self._let_go()
        self.failure = self._failure or failure(rc, expected_end=expected, terminated=terminated)
        if self._failure is not None:
            self.exit_status = 1
        self._end()

    def _end(self) -> None:
        self._running = False
        self._on_event(self, "ended", {})  # before waiters wake: they see the machine's final state
        self._qemu_exited.set()
        self.ended.set()

    def _let_go(self) -> None:
        """Drop the connections the run closed (QMP's client, the notify channel): the machine keeps
        its last run until the next start, and what they held (streams, buffers, tasks) would stay
        with it, scattered over the allocator's pools (bench/notes.md, session 15)."""
        self._qmp = self._channel = None

    async def _close_failed(self) -> None:
        """A start or adoption failed: release everything, then mark the run ended."""
        try:
            await self._stack.aclose()
        except Exception:
            self.log.exception("cleaning up a failed start failed")
        self._let_go()
        self._qemu_exited.set()
        self.ended.set()

    async def stop(self, timeout: float) -> None:
        """Ask the guest to power off (ACPI over QMP); force it after ``timeout`` seconds."""
        if self.ended.is_set():
            return
        self.stop_requested = True
        try:
            async with asyncio.timeout(timeout):  # (the power button's press included: QEMU may not answer)
                if self._qmp is not None:
                    async with self._controlling:
                        if self.paused or self.suspended:  # a paused or suspended guest cannot see the power button
                            self.log.info("resuming the paused VM to power it off" if self.paused else
                                          "waking the suspended guest to power it off")
                            await self._resume()
                        await self._qmp.powerdown()
                await asyncio.shield(self.ended.wait())
        except Exception as e:  # TimeoutError, or QMP trouble
            if not self.ended.is_set() and not self._detached:
                # once (two clients' stops may time out together), and not when a Kill ends it anyway
                # (whose QMP quit the power button's press may have met)
                if not self._forcing_off and not self.forced:
                    self._forcing_off = True
                    why = (f"the guest did not power off within {timeout:g} s; it was forced off"
                           if isinstance(e, TimeoutError) else
                           f"the guest could not be asked to power off ({e}); it was forced off")
                    self.log.warning(why)  # (vmspawn's user sees why its exit status is 1)
                    self.warn(why)
                await self.kill(forced=True)

    async def kill(self, forced: bool = True, sig: int | None = None) -> None:
        """End QEMU now: QMP ``quit``, SIGKILL if that does not work; returns once the run ended.

        With ``sig``, only send that signal and wait a little: not every signal ends QEMU (an end within
        that wait was asked for, and forced)."""
        if self.qemu is None or self.ended.is_set() or self._detached:
            return
        if sig is not None:  # (SIGCONT, SIGUSR1… leave QEMU running: the run is not stopping then)
            self._signals_sent += 1
            self.qemu.send_signal(sig)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.ended.wait()), KILL_GRACE)
            finally:
                self._signals_sent -= 1
            return
        self.forced = self.forced or forced
        self.stop_requested = True
        if self._qmp is not None and self._qmp.connected and await self._qmp.quit():
            with contextlib.suppress(TimeoutError):  # (QEMU said it quits: give it the time to)
                await asyncio.wait_for(asyncio.shield(self._qemu_exited.wait()), KILL_GRACE)
        if not self._qemu_exited.is_set() and not self._detached:  # (a daemon that shut down meanwhile keeps it)
            self.qemu.send_signal(signal.SIGKILL)
        await self.ended.wait()

    @property
    def detached(self) -> bool:
        """The daemon let go of the VM without ending it (it shut down)."""
        return self._detached

    async def detach(self) -> None:
        """Let go of the running VM without stopping it (daemon shutdown): it stays adoptable."""
        if self.ended.is_set():
            return
        if self._qemu_exited.is_set() or (self.qemu is not None and not self.qemu.alive):
            await self.ended.wait()  # it ended just now: its clean-up is finished, not cut short
            return
        self._save()
        self._detached = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        self._durable.pop_all()  # QEMU, helpers, registration, copy and runtime dir stay
        try:
            await self._stack.aclose()
        except Exception:
            self.log.exception("detaching from the VM failed")
        self._running = False
        self.ended.set()
