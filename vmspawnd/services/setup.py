# SPDX-License-Identifier: LGPL-2.1-or-later
"""Start a VM's auxiliary services (swtpm, virtiofsd) and collect what QEMU and the guest need."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.log import get_logger
from vmspawnd.plan import LaunchPlan
from vmspawnd.qemu.vsock import GuestVsock, VsockBackend
from vmspawnd.services.journal import JournalLimits, start_journal_remote
from vmspawnd.services.journal import guest_credential as journal_credential
from vmspawnd.services.runner import RunningService, ServiceError, ServiceRunner
from vmspawnd.services.swtpm import qemu_tpm_args, start_swtpm, tpm_enabled, tpm_state_dir
from vmspawnd.services.tpmspares import SpareTpmStates
from vmspawnd.services.vhostvsock import qemu_vsock_args, start_vsock_backend
from vmspawnd.services.virtiofsd import (
    ROOT_CHARDEV,
    ROOT_TAG,
    UidMap,
    Virtiofsd,
    bind_tag,
    fstab_extra,
    qemu_shared_memory_args,
    qemu_virtiofs_args,
    start_virtiofsd,
)
from vmspawnd.values import Bind, Tristate

log = get_logger()


class AuxServiceError(Exception):
    """A helper the VM needs could not start (the message says which and why)."""


#: what a run's swtpm is called among its helpers (and in its run record)
TPM = "swtpm"


@dataclass
class AuxServices:
    """The running helpers of one VM and what they contribute to its QEMU and guest."""

    services: list[tuple[str, RunningService]] = field(default_factory=list)
    qemu_args: list[str] = field(default_factory=list)
    credentials: list[tuple[str, bytes]] = field(default_factory=list)
    cmdline: list[str] = field(default_factory=list)
    tpm: RunningService | None = None  # swtpm, if it runs (also in services)
    tpm_state: Path | None = None  # persistent TPM state dir, if any
    needs_shared_memory: bool = False  # a vhost-user backend maps the guest's RAM
    on_started: Callable[[str, RunningService], None] = lambda what, service: None

    def add(self, what: str, service: RunningService) -> None:
        """A helper is up: keep it, and tell the owner at once (so even a killed daemon's run
        record names it)."""
        self.services.append((what, service))
        self.on_started(what, service)

    @property
    def units(self) -> list[str]:
        return [svc.unit or f"{what} (pid {svc.pid})" for what, svc in self.services]


async def start_aux_services(config: MachineConfig, plan: LaunchPlan, runner: ServiceRunner, rundir: Path,
                             bound_to: str | None = None, vsock: GuestVsock | None = None,
                             on_started: Callable[[str, RunningService], None] | None = None,
                             identity: Identity = ROOT, tpm_spares: SpareTpmStates | None = None) -> AuxServices:
    """Start vhost-device-vsock (if that is the guest's ``vsock``), swtpm, one virtiofsd per share
    and journal-remote (which needs ``vsock``), all as ``identity`` (the VM's user).  The caller owns
    (and stops) what is returned; if one fails to start, those already started are stopped before
    the error is raised."""
    if config.forward_journal is not None and vsock is None:
        raise AuxServiceError("--forward-journal needs vsock (the guest sends its journal over AF_VSOCK), "
                              "and this host has neither /dev/vhost-vsock nor vhost-device-vsock")
    aux = AuxServices()
    if on_started is not None:
        aux.on_started = on_started
    try:
        if vsock is not None and vsock.backend is VsockBackend.VHOST_USER:
            await _start_vsock_backend(aux, config, runner, vsock, bound_to, identity)
        await _start(aux, config, plan, runner, rundir, bound_to, identity, tpm_spares)
        if aux.needs_shared_memory:
            aux.qemu_args = qemu_shared_memory_args(config.ram.size_mib) + aux.qemu_args
        if config.forward_journal is not None:
            assert vsock is not None
            await _start_journal_remote(aux, config, runner, vsock, bound_to, identity)
    except BaseException:
        for _, svc in reversed(aux.services):
            with contextlib.suppress(Exception):
                await svc.stop()
        raise
    return aux


async def _start(aux: AuxServices, config: MachineConfig, plan: LaunchPlan, runner: ServiceRunner, rundir: Path,
                 bound_to: str | None, identity: Identity, tpm_spares: SpareTpmStates | None) -> None:
    base = config.image.path if config.image is not None else config.directory
    if tpm_enabled(config.tpm):
        socket_path = rundir / "tpm.sock"
        try:
            with acting_as(identity):
                state_dir, persistent = tpm_state_dir(config.tpm_state, base, config.ephemeral, rundir)
            if not persistent and tpm_spares is not None:
                tpm_spares.take_into(state_dir, identity)  # else start_swtpm manufactures it
            svc = await start_swtpm(runner, config.name, state_dir, socket_path, bound_to=bound_to, identity=identity)
        except (ServiceError, OSError) as e:
            if config.tpm is Tristate.YES:
                raise AuxServiceError(f"swtpm failed to start: {e}") from e
            log.warning("continuing without a TPM: swtpm failed to start", machine=config.name, error=str(e))
        else:
            aux.add(TPM, svc)
            aux.tpm = svc
            aux.qemu_args += qemu_tpm_args(socket_path)
            aux.tpm_state = state_dir if persistent else None

    shares: list[tuple[int | str, str, str, Path, bool, UidMap | None]] = []
    if config.directory is not None:
        uid_map = None if identity.switches else root_uid_map(config, plan.virtiofsd)  # a user's files stay theirs
        shares.append(("root", ROOT_TAG, ROOT_CHARDEV, config.directory, False, uid_map))
        aux.cmdline += ["root=root", "rootfstype=virtiofs", "rw"]
    shares += [(i, bind_tag(i), bind_tag(i), b.source, b.read_only, None) for i, b in enumerate(config.binds)]
    users = plan.bound_users
    binds = [*config.binds, *(Bind(user.host_home, user.vm_home) for user in users)]
    shares += [(i, bind_tag(i), bind_tag(i), user.host_home, False,
                UidMap(user.vm_uid, user.host_uid, 1, user.host_gid, squash_others=True))
               for i, user in enumerate(users, len(config.binds))]
    for index, tag, chardev, source, read_only, uid_map in shares:
        socket_path = rundir / f"fs-{tag}.sock"
        try:
            svc = await start_virtiofsd(runner, config.name, index, source, socket_path, read_only,
                                        virtiofsd=plan.virtiofsd, bound_to=bound_to, uid_map=uid_map,
                                        identity=identity)
        except (ServiceError, OSError) as e:
            raise AuxServiceError(f"virtiofsd for {source} failed to start: {e}") from e
        aux.add(f"virtiofsd {tag}", svc)
        aux.qemu_args += qemu_virtiofs_args(tag, socket_path, chardev)
    aux.needs_shared_memory |= bool(shares)
    if binds:
        aux.credentials.append(("fstab.extra", _merged_fstab(config, fstab_extra(binds))))
    for user in users:
        aux.credentials += user.credentials()


async def _start_vsock_backend(aux: AuxServices, config: MachineConfig, runner: ServiceRunner, vsock: GuestVsock,
                               bound_to: str | None, identity: Identity) -> None:
    try:
        svc = await start_vsock_backend(runner, config.name, vsock, bound_to, identity)
    except (ServiceError, OSError) as e:
        raise AuxServiceError(f"vhost-device-vsock failed to start: {e}") from e
    aux.add("vhost-device-vsock", svc)
    aux.qemu_args += qemu_vsock_args(vsock)
    aux.needs_shared_memory = True


async def _start_journal_remote(aux: AuxServices, config: MachineConfig, runner: ServiceRunner, vsock: GuestVsock,
                                bound_to: str | None, identity: Identity) -> None:
    assert config.forward_journal is not None
    limits = JournalLimits(config.forward_journal_max_use, config.forward_journal_keep_free,
                           config.forward_journal_max_file_size, config.forward_journal_max_files)
    try:
        svc = await start_journal_remote(runner, config.name, vsock, config.forward_journal, limits, bound_to,
                                         identity)
    except (ServiceError, OSError) as e:
        raise AuxServiceError(f"systemd-journal-remote failed to start: {e}") from e
    aux.add("journal-remote", svc)
    aux.credentials.append(journal_credential(vsock))


def root_uid_map(config: MachineConfig, virtiofsd: Virtiofsd | None) -> UidMap | None:
    """--private-users, else (where virtiofsd can translate) the directory owner's UID with 65536 IDs."""
    if config.private_users is not None:
        return UidMap(0, config.private_users[0], config.private_users[1])
    assert config.directory is not None
    owner = config.directory.stat().st_uid
    if owner == 0 or virtiofsd is None or not virtiofsd.translate_ids:
        return None
    return UidMap(0, owner, 65536)


def _merged_fstab(config: MachineConfig, ours: str) -> bytes:
    """Our mount lines go after a user-supplied fstab.extra credential (which we then replace)."""
    user = dict(config.credentials).get("fstab.extra", b"")
    if user and not user.endswith(b"\n"):
        user += b"\n"
    return user + ours.encode()


__all__ = ["AuxServiceError", "AuxServices", "ConfigError", "start_aux_services"]
