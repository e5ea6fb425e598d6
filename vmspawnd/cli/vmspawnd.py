# SPDX-License-Identifier: LGPL-2.1-or-later
"""``vmspawnd``: the daemon.  Serves io.vmspawnd.Manager on a socket-activated or given socket."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import grp
import os
import resource
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from asyncvarlink import VarlinkInterfaceRegistry
from asyncvarlink.serviceinterface import VarlinkServiceInterface

from vmspawnd import __version__, docs_url
from vmspawnd.api import ManagerCalls, call_error
from vmspawnd.cli import settle_caches
from vmspawnd.errors import HostError, VmspawndError
from vmspawnd.interface import DEFAULT_SOCKET, ManagerInterface
from vmspawnd.log import get_logger, setup_logging
from vmspawnd.manager import Manager
from vmspawnd.proc import check_socket_path
from vmspawnd.server import DEFAULT_MAX_CONNECTIONS, ServerLimits
from vmspawnd.server import serve as serve_varlink
from vmspawnd.systemd import unitfile
from vmspawnd.systemd.fdstore import FdStore, for_service
from vmspawnd.systemd.notify import ManagerNotifier
from vmspawnd.systemd.service import SystemdServiceInterface
from vmspawnd.values import is_decimal

log = get_logger()

FDS_FOR_VMS = 512  # file descriptors the connection cap leaves for VMs and their helpers


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _positive(value: str) -> int:
    """``--max-connections``: a number of at least 1."""
    if not is_decimal(value) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value!r}")
    return int(value)


def _group(value: str) -> str:
    """``--socket-group``: a group this host has."""
    try:
        grp.getgrnam(value)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {value!r} on this host") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmspawnd", description="The vmspawnd daemon: runs VMs, served over varlink.")
    p.add_argument("--version", action="version", version=f"vmspawnd {__version__}")
    p.add_argument("--socket", metavar="PATH",
                   help=f"listen here when not socket-activated (default: {DEFAULT_SOCKET})")
    p.add_argument("--socket-group", metavar="GROUP", type=_group,
                   help="make the socket 0660 for this group only (default: 0666, every local user; each "
                        "caller may look at all machines, and define and control its own, which run as it)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="machine definitions (default: $STATE_DIRECTORY or /var/lib/vmspawnd)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="per-VM runtime dirs (default: $RUNTIME_DIRECTORY or /run/vmspawnd)")
    p.add_argument("--max-connections", type=_positive, metavar="N",
                   help=f"at most N clients at once, of which a user but root may have N/4, and all "
                        f"users but root N less N/16; more are closed as they come (default: "
                        f"{DEFAULT_MAX_CONNECTIONS}, or fewer if the file-descriptor limit is low)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--print-unit", choices=("service", "socket"),
                   help="print vmspawnd's systemd unit (set up for this installation and this host's systemd) "
                        "and exit")
    return p


def activated_fds() -> tuple[socket.socket | None, dict[str, list[int]]]:
    """What systemd passed us (LISTEN_FDS): the listening socket of vmspawnd.socket, if any, and the
    descriptors an earlier daemon stored (systemd/fdstore.py), by name.  Without $LISTEN_FDS (started by
    hand, or by another service manager) libsystemd is not loaded for it (≈ 0.85 MB resident)."""
    if "LISTEN_FDS" not in os.environ:
        return None, {}
    from systemd import daemon  # on first use: start-up speed of the commands that share this module

    listener: socket.socket | None = None
    stored: dict[str, list[int]] = {}
    for fd, name in sorted(daemon.listen_fds_with_names().items()):
        if FdStore.stored_name(name):
            stored.setdefault(name, []).append(fd)
        elif listener is None:
            listener = socket.socket(fileno=fd)
        else:
            os.close(fd)
    return listener, stored


def withhold_inherited_fds() -> None:
    """Make the descriptors we were started with, beyond stdio (systemd's socket, whatever a shell left
    open), close-on-exec: QEMU is spawned from us (Run._spawn_qemu), and they are not its."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with contextlib.suppress(OSError):  # (the listing's own fd, closed by now)
                os.set_inheritable(int(name), False)


@contextlib.contextmanager
def naming_option(*options: tuple[str, Path]) -> Iterator[None]:
    """An OSError inside becomes a HostError naming the option whose path it concerns (the first one
    when its file is under none of them), and the file too when it is another."""
    try:
        yield
    except OSError as e:
        where = Path(os.fsdecode(e.filename)) if e.filename else None
        option, path = next(((o, p) for o, p in options if where and (where == p or p in where.parents)), options[0])
        inside = f" ({where})" if where and where != path else ""
        raise HostError(f"cannot use {option}={path}{inside}", e) from None


class AlreadyRunning(Exception):
    """Another vmspawnd serves these paths (the message says which pid)."""


def claim_runtime_dir(runtime_dir: Path) -> int:
    """Lock ``<runtime_dir>/vmspawnd.lock`` for this daemon's life (the fd is returned and kept);
    raise AlreadyRunning, naming the holder's pid, if another daemon holds it."""
    runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(runtime_dir / "vmspawnd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another vmspawnd (pid {holder}) uses {runtime_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def socket_holder(path: Path) -> int | None:
    """The pid of whoever answers on the unix socket ``path`` (None if nobody does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]


def bind_socket(path: Path, group: str | None) -> socket.socket:
    """Bind our own socket: 0666 (every call is authorized by its caller, see auth.py), or 0660 for
    --socket-group.  A live socket (one that answers) is never taken over; a stale one is replaced."""
    check_socket_path(path, "socket")  # (before its directory is made: a path too long leaves nothing)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            holder = socket_holder(path)
            if holder is not None:
                raise AlreadyRunning(f"{path} is served already (by pid {holder})")
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o111 if group is None else 0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o666)
    return sock


def raise_fd_limit() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit (clients and VMs all need fds); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def connection_cap(requested: int | None, fd_limit: int) -> int:
    """The connection cap: as asked, else the default, lowered so clients leave fds for the VMs."""
    if requested is not None:
        return requested
    return max(16, min(DEFAULT_MAX_CONNECTIONS, (fd_limit - FDS_FOR_VMS) // 2))


async def serve(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "/var/lib/vmspawnd")
    runtime_dir = Path(args.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
                       or "/run/vmspawnd")
    withhold_inherited_fds()
    with naming_option(("--runtime-dir", runtime_dir)):
        lock_fd = claim_runtime_dir(runtime_dir)  # noqa: F841 - held (open) for the daemon's life
    fd_limit = raise_fd_limit()
    notifier = ManagerNotifier()
    sock, stored = activated_fds()
    manager = Manager(state_dir, runtime_dir / "machines", fdstore=for_service(stored))
    manager.on_change = lambda: notifier.send(STATUS=f"{manager.running_count()} VM(s) running")
    if sock is None:
        path = Path(args.socket or DEFAULT_SOCKET)
        with naming_option(("--socket", path)):
            sock = bind_socket(path, args.socket_group)
    with naming_option(("--state-dir", state_dir), ("--runtime-dir", runtime_dir)):
        await manager.load()
    reloading = asyncio.Lock()

    async def reload() -> None:
        """SIGHUP (``systemctl reload``, Type=notify-reload) or io.systemd.service.Reload."""
        async with reloading:
            notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
            try:
                changes = await manager.reload()
                log.info("machine definitions re-read", changes="; ".join(changes) or "none")
            finally:
                notifier.send(READY=1, STATUS=f"{manager.running_count()} VM(s) running")

    registry = VarlinkInterfaceRegistry()
    registry.register_interface(VarlinkServiceInterface("vmspawnd", "vmspawnd", __version__, docs_url(), registry))
    registry.register_interface(ManagerInterface(ManagerCalls(manager)))
    registry.register_interface(SystemdServiceInterface(
        lambda level: setup_logging(level=level, journal=bool(os.environ.get("JOURNAL_STREAM"))), reload))
    limits = ServerLimits(max_connections=connection_cap(args.max_connections, fd_limit))
    server = await serve_varlink(sock, registry, limits, call_error)
    log.info("serving", socket=sock.getsockname(), state_dir=str(state_dir), machines=len(manager.machines),
             max_connections=limits.max_connections, fd_limit=fd_limit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)  # before READY=1: systemd ≥ 262 checks for it
    # what start-up made lives as long as we do: the collector no longer walks it (a full collection of
    # it had taken ≈ 10 ms, in the middle of some request); what the imports made and settle_caches froze is
    # looked at once more, for the little garbage they left
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    notifier.send(READY=1, STATUS=f"{manager.running_count()} VM(s) running")
    await stop.wait()
    notifier.send(STOPPING=1)
    log.info("shutting down; VMs keep running", running=manager.running_count())
    server.close()
    await manager.shutdown()
    await limits.drain(timeout=2.0)  # e.g. subscriptions' last replies
    server.close_clients()
    return 0


def unit_text(kind: str) -> str:
    """Our ``vmspawnd.service``/``.socket`` as installed with this copy (the wheel puts the units
    under ``<prefix>/share/vmspawnd/units``; a checkout has them in ``units/``), set up to run it
    under this host's systemd."""
    name = f"vmspawnd.{kind}"
    for candidate in (Path(sys.prefix) / "share/vmspawnd/units" / name,
                      Path(__file__).resolve().parents[2] / "units" / name):
        if candidate.is_file():
            text = candidate.read_text()
            break
    else:
        raise FileNotFoundError(f"{name} is not installed with this copy of vmspawnd")
    bindir = Path(sys.argv[0]).absolute().parent if Path(sys.argv[0]).name == "vmspawnd" \
        else Path(sys.executable).parent
    return unitfile.render(text, str(bindir), str(Path(sys.prefix) / "share/doc/vmspawnd"),
                           unitfile.host_systemd_version())


def main(argv: list[str] | None = None) -> int:
    settle_caches()  # (our modules are imported)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.print_unit:
        try:
            print(unit_text(args.print_unit), end="")
        except OSError as e:
            print(f"vmspawnd: {e}", file=sys.stderr)
            return 1
        return 0
    setup_logging(args.verbose, journal=bool(os.environ.get("JOURNAL_STREAM")))
    try:
        return asyncio.run(serve(args))
    except (OSError, KeyError, AlreadyRunning, VmspawndError) as e:
        print(f"vmspawnd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
