# SPDX-License-Identifier: LGPL-2.1-or-later
"""A software TPM (swtpm) for the guest: where its state lives, manufacturing, the daemon, QEMU args.

State (``--tpm-state=``): a persistent directory (an explicit PATH, or ``<image>.tpmstate``
beside the image/directory) that is created 0700 and never emptied, or a transient one in the
runtime directory.  First use manufactures it with ``swtpm_setup`` (never ``--create-ek-cert``:
that writes a machine-global CA to /var/lib/swtpm-localca); then
``swtpm socket --tpm2 --tpmstate dir=DIR --ctrl type=unixio,fd=0 --terminate --log file=LOG`` runs
through a :class:`~vmspawnd.services.runner.ServiceRunner`, socket-activated: its standard input is the
socket SOCK, made and listening before swtpm runs, so QEMU need not wait for swtpm to come up (≈ 3 ms
here): QEMU's first request to the TPM waits in the socket until swtpm reads it.  LOG (beside SOCK)
gets swtpm's errors only, so that a run can tell a state swtpm cannot use (:func:`state_unusable`), or
a swtpm that could not start, from QEMU failing for its own reasons, whoever ran swtpm.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.log import get_logger
from vmspawnd.proc import check_socket_path
from vmspawnd.qemu import qemu_escape
from vmspawnd.services.runner import RunningService, ServiceError, ServiceRunner, ServiceSpec
from vmspawnd.values import StateLocation, Tristate

log = get_logger()

SWTPM_SETUP_TIMEOUT = 30.0
#: free space a TPM state directory's file system must have when the TPM starts: swtpm saves the
#: state by writing it anew beside the old copy, and libtpms keeps up to ≈ 128 KiB of NV data; a
#: save that fails puts the TPM in failure mode, and the guest's kernel then finds no TPM at all
STATE_ROOM = 128 << 10
#: A manufactured TPM 2 state directory holds this file (swtpm's "dir" backend).
STATE_FILE = "tpm2-00.permall"
#: what swtpm logs when it cannot load the state it was given (damaged, or of another swtpm); QEMU
#: then fails its CMD_INIT and exits
STATE_UNUSABLE = "Could not initialize the TPM"
#: what swtpm logs (beside STATE_UNUSABLE) when another swtpm holds the state's lock: the state is fine
STATE_LOCKED = "Could not lock access to lockfile"
#: what swtpm logs when QEMU went away without shutting the TPM down first (it was killed)
CLIENT_GONE = "Data client disconnected"
#: QEMU's TPM front end per host architecture (others have no TPM support here).
TPM_DEVICES = {"x86_64": "tpm-tis", "amd64": "tpm-tis", "aarch64": "tpm-tis-device", "arm64": "tpm-tis-device",
               "armv7l": "tpm-tis-device"}


def tpm_state_dir(location: StateLocation, image_or_directory: Path | None, ephemeral: bool,
                  runtime_dir: Path) -> tuple[Path, bool]:
    """Where ``--tpm-state=`` puts the TPM's state: ``(directory, persistent)``.

    ``auto`` → ``<image-or-dir>.tpmstate`` (full file name + ``.tpmstate``), unless there is no
    image/directory or the run is ephemeral; ``off`` and those cases → a fresh transient
    ``<runtime_dir>/tpm``.  The directory is created (0700); a persistent one is never emptied.
    Raises ConfigError for a path that is not a directory, ServiceError if it cannot be created (a
    full or read-only file system: the TPM cannot run, as when swtpm cannot).
    """
    path = location.resolve(image_or_directory, ephemeral, ".tpmstate")
    if path is None:
        transient = runtime_dir / "tpm"
        if transient.exists() or transient.is_symlink():
            shutil.rmtree(transient) if transient.is_dir() and not transient.is_symlink() else transient.unlink()
        transient.mkdir(mode=0o700)
        return transient, False
    if path.exists() and not path.is_dir():
        raise ConfigError("tpm-state", str(path), "exists and is not a directory")
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ServiceError("swtpm", f"tpm-state={path}: cannot create the directory: {e.strerror}") from e
        os.chmod(path, 0o700)
        log.info("created persistent TPM state directory", path=str(path))
    return path, True


def find_swtpm() -> Path | None:
    """The ``swtpm`` binary from $PATH, or None."""
    found = shutil.which("swtpm")
    return Path(found) if found else None


def find_swtpm_setup() -> Path | None:
    found = shutil.which("swtpm_setup")
    return Path(found) if found else None


def tpm_enabled(setting: Tristate, arch: str | None = None) -> bool:
    """``--tpm=``: auto = swtpm installed (on an architecture with a TPM device); yes = insist."""
    if setting is Tristate.NO:
        return False
    arch = arch or os.uname().machine
    if arch not in TPM_DEVICES:
        if setting is Tristate.YES:
            raise ConfigError("tpm", "yes", f"no TPM support for architecture {arch}")
        return False
    if find_swtpm() is None:
        if setting is Tristate.YES:
            raise ConfigError("tpm", "yes", "swtpm is not installed (no swtpm in $PATH; Debian: apt install swtpm "
                                            "swtpm-tools)")
        log.info("no TPM: swtpm is not installed")
        return False
    return True


def check_swtpm_path(field: str, path: Path) -> None:
    """swtpm's option parser splits on ',' with no escape: such paths cannot be passed to it."""
    if "," in str(path):
        raise ConfigError(field, str(path), "swtpm cannot use a path containing ','")


def check_state_room(state_dir: Path, identity: Identity = ROOT) -> None:
    """ServiceError unless ``state_dir``'s file system has room for swtpm to save the state in it
    (:data:`STATE_ROOM`, or twice the state's size if larger), as ``identity``."""
    with acting_as(identity):
        fs = os.statvfs(state_dir)
        try:
            size = (state_dir / STATE_FILE).stat().st_size
        except FileNotFoundError:
            size = 0
    free = fs.f_frsize * (fs.f_bfree if identity.root else fs.f_bavail)
    needed = max(STATE_ROOM, 2 * size)
    inodes = fs.f_ffree if identity.root else fs.f_favail
    if free < needed or (fs.f_files and inodes < 2):
        room = f"{free >> 10} KiB free" if free < needed else "no free inodes"
        raise ServiceError("swtpm", f"tpm-state={state_dir}: its file system has {room}; the TPM needs "
                                    f"{needed >> 10} KiB to save its state (else it fails, and the guest "
                                    "finds no TPM): free some space, or move the state elsewhere")


async def manufacture(state_dir: Path, swtpm_setup: Path | None = None, identity: Identity = ROOT) -> bool:
    """Run ``swtpm_setup`` (as ``identity``) once for a fresh state dir; False if it was already manufactured.
    Starts that share a new state dir take turns (a lock on it): the first manufactures it, the others
    find it made (a second ``swtpm_setup`` on it at once would wait forever for the first's lock)."""
    with acting_as(identity):
        if (state_dir / STATE_FILE).exists():
            return False
    making = asyncio.ensure_future(_manufacture_once(state_dir, swtpm_setup, identity))
    try:
        return await asyncio.shield(making)
    except asyncio.CancelledError:  # (a start undone): finished first, as a half-made state would pass for made
        with contextlib.suppress(Exception):
            await making
        raise


async def _manufacture_once(state_dir: Path, swtpm_setup: Path | None, identity: Identity) -> bool:
    with acting_as(identity):
        held = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        await _lock(held, state_dir)
        with acting_as(identity):
            if (state_dir / STATE_FILE).exists():  # made by the start we waited for
                return False
        return await _manufacture(state_dir, swtpm_setup, identity)
    finally:
        os.close(held)  # (the lock with it)


async def _lock(fd: int, state_dir: Path) -> None:
    """Lock ``fd`` (``state_dir``'s) for us alone, waiting while another start holds it (a manufacture's time)."""
    deadline = asyncio.get_running_loop().time() + SWTPM_SETUP_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if asyncio.get_running_loop().time() > deadline:
                raise ServiceError("swtpm_setup", f"tpm-state={state_dir}: another start has been manufacturing "
                                                  f"this TPM state for over {SWTPM_SETUP_TIMEOUT:g} s") from None
            await asyncio.sleep(0.02)  # (only while another start manufactures the same state)


async def _manufacture(state_dir: Path, swtpm_setup: Path | None, identity: Identity) -> bool:
    setup = swtpm_setup or find_swtpm_setup()
    if setup is None:
        log.info("swtpm_setup not installed: the TPM starts unmanufactured (no EK)", state=str(state_dir))
        return False
    argv = [str(setup), "--tpm2", "--tpmstate", str(state_dir), "--pcr-banks", "sha256", "--not-overwrite"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True, **identity.popen_kwargs())
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), SWTPM_SETUP_TIMEOUT)
    except BaseException:  # (a timeout): the swtpm it runs goes with it, not on alone
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        raise
    if proc.returncode != 0:
        lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()][-10:]
        raise ServiceError("swtpm_setup", f"manufacturing the TPM in {state_dir} failed (exit status "
                                          f"{proc.returncode})", status=proc.returncode, output=lines)
    log.info("manufactured TPM state", state=str(state_dir))
    return True


def swtpm_argv(swtpm: Path, state_dir: Path, socket_path: Path) -> list[str]:
    """``swtpm socket --tpm2 --tpmstate dir=DIR --ctrl type=unixio,fd=0 --terminate --log file=LOG``:
    its control socket (``socket_path``) is its standard input (LOG: :func:`log_path`, beside it: the
    command line names the run's directory, where a killed run's leftovers are looked for)."""
    check_swtpm_path("tpm-state", state_dir)
    check_swtpm_path("runtime-directory", socket_path)
    return [str(swtpm), "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
            "--ctrl", "type=unixio,fd=0", "--terminate", "--log", f"file={log_path(socket_path)}"]


def log_path(socket_path: Path) -> Path:
    """Where the swtpm of ``socket_path`` logs (its errors only, at swtpm's default level)."""
    return socket_path.with_name(socket_path.stem + ".log")


def logged_errors(swtpm: RunningService) -> list[str]:
    """What ``swtpm`` logged, less the line it logs when its client went away without shutting the TPM
    down (QEMU killed): that is no error of the TPM's."""
    return [line for line in swtpm.logged() if line != CLIENT_GONE]


def state_unusable(swtpm: RunningService, state_dir: Path) -> str | None:
    """Why ``swtpm`` could not use its state in ``state_dir``, what to do, and what it logged (None if
    it could): held by another swtpm (the state is fine), or damaged or of another swtpm."""
    lines = swtpm.logged()
    if not any(STATE_UNUSABLE in line for line in lines):
        return None
    if any(STATE_LOCKED in line for line in lines):
        why = ("the TPM state is in use by another swtpm (of another VM that runs with it); it is left as it is: "
               "stop that VM first, or use another --tpm-state")
    else:
        why = ("swtpm cannot use the TPM state in it (damaged, or made by another swtpm); it is left as it is: "
               "move it away to start with a new TPM, or use --tpm-state=off")
    return f"tpm-state={state_dir}: {why} (swtpm said: {' / '.join(lines)})"


async def start_swtpm(runner: ServiceRunner, machine: str, state_dir: Path, socket_path: Path, *,
                      bound_to: str | None = None, swtpm: Path | None = None,
                      identity: Identity = ROOT) -> RunningService:
    """Manufacture the state on first use, then run swtpm on ``socket_path``, socket-activated (it is
    listening when this returns; swtpm itself may still be coming up).

    swtpm_setup (one-shot, ≈0.6 s) always runs as our own short-lived child, whichever runner
    runs the daemon.  swtpm exits by itself (status 0) when QEMU closes the control socket.
    """
    swtpm = swtpm or find_swtpm()
    if swtpm is None:
        raise ServiceError(f"vmspawnd-{machine}-tpm", "swtpm is not installed")
    check_socket_path(socket_path)
    argv = swtpm_argv(swtpm, state_dir, socket_path)
    check_state_room(state_dir, identity)
    await manufacture(state_dir, identity=identity)
    with acting_as(identity):
        log_path(socket_path).unlink(missing_ok=True)  # (an earlier run's: its errors are not this one's)
    spec = ServiceSpec(name=f"vmspawnd-{machine}-tpm", argv=tuple(argv), description=f"TPM for VM {machine}",
                       bound_to=bound_to, listen_on=socket_path, identity=identity, log_path=log_path(socket_path))
    return await runner.start(spec)


def qemu_tpm_args(socket_path: Path, arch: str | None = None) -> list[str]:
    """QEMU arguments for the swtpm at ``socket_path``.

    The front end is ``tpm-tis`` on x86_64 (``tpm-tis-device`` on arm), as upstream vmspawn
    does: it works with every firmware choice (SeaBIOS, OVMF, direct kernel boot) and TPM 1.2
    or 2.0 drivers.  ``tpm-crb`` (TPM 2.0 only) works too;
    both were booted here with the test guest and give it /dev/tpm0.
    """
    device = TPM_DEVICES.get(arch or os.uname().machine)
    if device is None:
        raise ConfigError("tpm", "yes", f"no TPM support for architecture {arch or os.uname().machine}")
    return ["-chardev", f"socket,id=chrtpm,path={qemu_escape(socket_path)}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", f"{device},tpmdev=tpm0"]
