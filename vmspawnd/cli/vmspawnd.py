"""``vmspawnd``: the daemon.  Serves io.vmspawnd.Manager on a socket-activated or given socket."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import structlog
from asyncvarlink import VarlinkInterfaceRegistry, create_unix_server
from asyncvarlink.serviceinterface import VarlinkServiceInterface

from vmspawnd import __version__
from vmspawnd.api import ManagerInterface, protocol_factory
from vmspawnd.log import setup_logging
from vmspawnd.manager import Manager
from vmspawnd.systemd.notify import ManagerNotifier

log = structlog.get_logger()

DEFAULT_SOCKET = "/run/vmspawnd/io.vmspawnd.Manager"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmspawnd", description="The vmspawnd daemon: runs VMs, served over varlink.")
    p.add_argument("--version", action="version", version=f"vmspawnd {__version__}")
    p.add_argument("--socket", metavar="PATH",
                   help=f"listen here when not socket-activated (default: {DEFAULT_SOCKET})")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="let this group use the socket (mode 0660, not 0600). Members can make the daemon "
                        "open any file or device as root (images, binds, TPM state): trust them like root")
    p.add_argument("--state-dir", metavar="DIR",
                   help="machine definitions (default: $STATE_DIRECTORY or /var/lib/vmspawnd)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="per-VM runtime dirs (default: $RUNTIME_DIRECTORY or /run/vmspawnd)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def activated_socket() -> socket.socket | None:
    """The listening socket systemd passed us (LISTEN_FDS), if any."""
    from systemd import daemon

    fds = daemon.listen_fds()
    if not fds:
        return None
    for extra in fds[1:]:
        os.close(extra)
    return socket.socket(fileno=fds[0])


def bind_socket(path: Path, group: str | None) -> socket.socket:
    """Bind our own socket: 0600 (or 0660 for --socket-group), never world-accessible."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177 if group is None else 0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    return sock


async def serve(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "/var/lib/vmspawnd")
    runtime_dir = Path(args.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
                       or "/run/vmspawnd")
    notifier = ManagerNotifier()
    manager = Manager(state_dir, runtime_dir / "machines")
    manager.on_change = lambda: notifier.send(STATUS=f"{manager.running_count()} VM(s) running")
    await manager.load()

    registry = VarlinkInterfaceRegistry()
    registry.register_interface(VarlinkServiceInterface("vmspawnd", "vmspawnd", __version__,
                                                        "https://example.invalid/vmspawnd", registry))
    registry.register_interface(ManagerInterface(manager))

    sock = activated_socket()
    if sock is None:
        sock = bind_socket(Path(args.socket or DEFAULT_SOCKET), args.socket_group)
    server = await create_unix_server(protocol_factory(registry), sock=sock)
    sock.listen(socket.SOMAXCONN)  # asyncvarlink listens with a backlog of 1
    log.info("serving", socket=sock.getsockname(), state_dir=str(state_dir), machines=len(manager.machines))
    notifier.send(READY=1, STATUS=f"{manager.running_count()} VM(s) running")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    notifier.send(STOPPING=1)
    log.info("shutting down; VMs keep running", running=manager.running_count())
    server.close()
    await manager.shutdown()
    server.close_clients()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose, journal=bool(os.environ.get("JOURNAL_STREAM")))
    try:
        return asyncio.run(serve(args))
    except (OSError, KeyError) as e:
        print(f"vmspawnd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
