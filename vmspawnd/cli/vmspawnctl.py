# SPDX-License-Identifier: LGPL-2.1-or-later
"""``vmspawnctl``: drive vmspawnd over varlink.  Human tables by default, ``--json`` for scripts."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import enum
import json
import os
import pwd
import select
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from asyncvarlink import (
    VarlinkClientProtocol,
    VarlinkErrorReply,
    VarlinkInterfaceProxy,
    VarlinkTransport,
    connect_unix_varlink,
)

from vmspawnd import __version__
from vmspawnd.cli import settle_caches
from vmspawnd.errors import ConfigError
from vmspawnd.interface import DEFAULT_SOCKET, Config, ManagerInterface
from vmspawnd.log import command_level, setup_logging
from vmspawnd.options import (
    OptionParser,
    add_machine_options,
    config_from_args,
    parse_command_line,
    split_at_double_dash,
)
from vmspawnd.ptyfwd import PtyForwarder
from vmspawnd.qemu.vsock import connect_guest_port
from vmspawnd.settings import BY_KEY, SETTINGS, config_to_json
from vmspawnd.values import is_decimal, parse_signal, printable

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


JSON_MODES = ("short", "pretty", "off")


#: varlink's address schemes that name no local socket (``unix:PATH`` names one)
_OTHER_SCHEMES = ("tcp", "exec", "ssh", "ssh-unix", "ssh-exec")


def _socket_address(value: str) -> str:
    """--address: the socket's path, also spelled as a varlink address (``unix:PATH``, as varlinkctl takes it)."""
    scheme, colon, rest = value.partition(":")
    if colon and scheme == "unix" and rest:
        return rest
    if not value or (colon and scheme in ("unix", *_OTHER_SCHEMES)):
        raise argparse.ArgumentTypeError(f"expected a socket's path or unix:PATH, got {value!r} (another host's "
                                         "vmspawnd: -H HOST)")
    return value


def _output_options(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command (after it, they override nothing unless given)."""
    default = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", default=default, metavar="MODE",
                   help="print JSON: --json=short (compact: one line, or one per event; also bare --json), "
                        "pretty (indented), or off")
    p.add_argument("--no-legend", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="no column headers and footer in tables")
    p.add_argument("--no-pager", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="accepted for compatibility (nothing is paged)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="log only errors")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="log what vmspawnctl does")
    p.add_argument("--log-level", metavar="LEVEL", default=default,
                   help="debug, info, notice, warning (the default), err…; also $SYSTEMD_LOG_LEVEL")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmspawnctl", description="Control virtual machines run by vmspawnd (no command: list them).",
        parents=[_output_options(suppress=False)],
        epilog="Exit status: 0 on success, 1 if the daemon refused or failed the request (or cannot be "
               "reached, or ended the events being followed; Ctrl-C ends them with 0), 2 for usage errors.")
    p.add_argument("--version", action="version", version=f"vmspawnctl {__version__}")
    p.add_argument("--address", metavar="SOCKET", type=_socket_address,
                   default=os.environ.get("VMSPAWND_ADDRESS") or DEFAULT_SOCKET,
                   help=f"the daemon's varlink socket, a path or unix:PATH (default: $VMSPAWND_ADDRESS or "
                        f"{DEFAULT_SOCKET})")
    p.add_argument("-H", "--host", metavar="[USER@]HOST[:PORT]",
                   help="drive the vmspawnd of another host, over ssh (its --address socket there; "
                        "$SYSTEMD_SSH names the ssh command)")
    common = [_output_options(suppress=True)]
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    create = sub.add_parser("create", help="define a machine, with vmspawn's options (see: create --help)",
                            add_help=False)
    create.add_argument("rest", nargs=argparse.REMAINDER)
    for cmd, text in [("start", "start a machine"), ("remove", "forget a stopped machine"),
                      ("status", "show one machine"),
                      ("console", "attach to a machine's console until Ctrl-] is pressed three times within 1s "
                                  "(or SIGTERM); standard input may be a file, typed in as the guest reads it")]:
        sub.add_parser(cmd, help=text, parents=common).add_argument("name", metavar="NAME")
    stop = sub.add_parser("stop", help="power a machine off (ACPI), forced after --timeout", parents=common)
    stop.add_argument("name", metavar="NAME")
    stop.add_argument("--timeout", type=float, metavar="SECONDS", help="force it off after this long (default 10)")
    kill = sub.add_parser("kill", help="end a machine's QEMU now, or undo its start (or send it --signal)",
                          parents=common)
    kill.add_argument("name", metavar="NAME")
    kill.add_argument("--signal", metavar="SIGNAL", help="signal name or number to send QEMU")
    for cmd, text in [("reboot", "reset a running machine: its guest boots again (a paused one runs again)"),
                      ("pause", "stop a running machine's CPUs (its memory stays) until it is resumed"),
                      ("resume", "let a paused machine run again, or wake one whose guest suspended itself")]:
        sub.add_parser(cmd, help=text, parents=common).add_argument("name", metavar="NAME")
    sub.add_parser("list", help="list machines (the default command)", parents=common)
    events = sub.add_parser("events", help="follow lifecycle events (of NAME, or of all machines) until Ctrl-C",
                            parents=common)
    events.add_argument("name", metavar="NAME", nargs="?")
    sub.add_parser("firmware", help="list QEMU firmware descriptors the daemon sees", parents=common)
    ssh = sub.add_parser("ssh", help="ssh into a running machine over vsock, with the key --pass-ssh-key made",
                         parents=common)
    ssh.add_argument("name", metavar="NAME")
    ssh.add_argument("ssh_args", nargs=argparse.REMAINDER, metavar="SSH-ARGS",
                     help="more ssh arguments; after the options, a command to run (e.g. -- uname -a)")
    proxy = sub.add_parser("vsock-proxy", help="relay stdin/stdout to a guest's vsock port: an ssh ProxyCommand "
                           "(ssh -o ProxyCommand='vmspawnctl vsock-proxy ADDRESS %%p' root@ADDRESS, ADDRESS as "
                           "status shows it; not ssh's %%h, which ssh lowercases)", parents=common)
    proxy.add_argument("vsock_address", metavar="ADDRESS", help="vsock/CID or vsock-mux/SOCKET")
    proxy.add_argument("port", metavar="PORT", type=int, nargs="?", default=22)
    return p


def create_parser() -> OptionParser:
    p = OptionParser(prog="vmspawnctl create", usage="%(prog)s NAME [OPTIONS...] [ARGUMENTS...]",
                     description="Define a machine. Takes the same options as vmspawn.")
    p.add_argument("name", metavar="NAME")
    add_machine_options(p, create=True)
    return p


def parse_create(argv: list[str]) -> tuple[str, Any]:
    """``create NAME [vmspawn options…] [KERNEL-CMDLINE…]`` → (name, MachineConfig), via vmspawn's parser."""
    parser = create_parser()
    if any(a in ("-h", "--help") for a in split_at_double_dash(argv)[0]):
        parser.print_help()
        raise SystemExit(0)
    ns = parse_command_line(parser, argv)
    ns.machine = ns.name
    try:
        return ns.name, config_from_args(ns, machine_pool=False)  # the client never looks at the host
    except ConfigError as e:
        if e.field == "linux" and e.value == "":  # (create takes no machine pool's image by its name)
            raise ConfigError("linux", "", "nothing to boot: pass --linux=KERNEL, --image=IMAGE or "
                                           "--directory=DIR") from None
        raise


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # (its interface's fields: those of init)
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def _printable(value: Any) -> Any:
    """``value`` (plain data) with the control characters of its strings shown as escapes, for text
    output: a guest's status or a user's path can never drive the reader's terminal (JSON escapes them)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def _dump(obj: Any, mode: str | None) -> None:
    """Print ``obj`` as JSON: one line (short) or indented (pretty)."""
    if mode == "pretty":
        print(json.dumps(obj, indent=2, sort_keys=True), flush=True)
    else:
        print(json.dumps(obj, sort_keys=True), flush=True)


def _when(us: int | None) -> str:
    if not us:
        return "-"
    return datetime.datetime.fromtimestamp(us / 1e6).strftime("%Y-%m-%d %H:%M:%S")


def _print_table(rows: list[list[str]], header: list[str], legend: bool = True) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows] if legend else rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _listed_state(info: Any) -> str:
    """A machine's STATE in ``list``: a running one that is paused or suspended says so."""
    return "paused" if info.paused else "suspended" if info.suspended else info.state.value


def _print_machine(info: Any, as_json: str | None) -> None:
    d = _plain(info)
    if as_json:
        _dump(d, as_json)
        return
    d = _printable(d)
    flags = ", ".join(flag for flag in ("ready", "paused", "suspended") if d.get(flag))
    state = d["state"] + (f" ({flags})" if flags else "")
    print(f"● {d['name']}")
    print(f"      State: {state} since {_when(d['since'])}")
    owner, run_as = d.get("owner", 0), d.get("runAs", 0)
    print(f"      Owner: {_user_name(owner)}" + (f" (runs as {_user_name(run_as)})" if run_as != owner else ""))
    if d["pid"]:
        print(f"        PID: {d['pid']} (qemu)")
    if d["status"]:
        print(f"     Status: {d['status']}")
    if d["runtimeDirectory"]:
        print(f"    Runtime: {d['runtimeDirectory']}")
    _print_labelled("Units", d["units"])
    if d["tpmStatePath"]:
        print(f"  TPM state: {d['tpmStatePath']}")
    if d.get("vsockBackend"):
        print(f"      Vsock: {d['vsockBackend']}, ssh: {d['sshAddress']}")
    if d["exitStatus"] is not None:
        print(f"Exit status: {d['exitStatus']}")
    if d["failure"]:
        print(f"    Failure: {d['failure']}")
    _print_labelled("Warning", d.get("warnings") or [])
    if d.get("definitionError") and d["definitionError"] != d["failure"]:
        print(f" Definition: {d['definitionError']}")
    c = d["config"]
    kernel = c.get("linux") or ("its directory's boot loader entry" if c.get("directory") else "-")
    print(f"     Kernel: {kernel}")
    print(f"  Resources: {c.get('cpus')} CPU(s), {int(c.get('ram', '0').split(':')[0]) // (1024 * 1024)} MiB RAM, "
          f"console {c.get('console')}")


def _print_labelled(label: str, items: list[str]) -> None:
    """``items`` one per line, the first after ``label:`` (right-aligned, as status's other fields)."""
    for i, item in enumerate(items):
        print(f"{f'{label}:' if i == 0 else '':>12} {item}")


JOURNAL_LINES = 10


def _print_host_details(name: str, units: list[str]) -> None:
    """Where systemd runs this host: each unit's processes and the machine's last journal lines
    (the daemon logs with MACHINE=NAME), as ``systemctl status`` and ``machinectl status`` do."""
    if not Path("/run/systemd/system").is_dir():
        return
    for unit in (u for u in units if u.endswith((".scope", ".service"))):
        cgroup = _run(["systemctl", "show", "--property=ControlGroup", "--value", unit]).strip()
        try:
            pids = Path(f"/sys/fs/cgroup{cgroup}/cgroup.procs").read_text().split() if cgroup else []
        except OSError:
            pids = []
        print(f"{'     CGroup:'} {unit}")
        for i, pid in enumerate(pids):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            print(f"{' ' * 13}{'└─' if i == len(pids) - 1 else '├─'}{pid} {_printable(cmdline.strip()[:100])}")
    journal = _run(["journalctl", "--no-pager", "--quiet", f"--lines={JOURNAL_LINES}", "--output=short",
                    f"MACHINE={name}"])
    if journal.strip():
        print()
        print(journal.rstrip())


def _run(argv: list[str]) -> str:
    """A host tool's output ('' if it is missing or fails: the details are a bonus)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _print_event(ev: Any, as_json: str | None) -> None:
    d = _plain(ev)
    if as_json:
        _dump(d, as_json)
        return
    d = _printable(d)
    extra = " ".join(f"{k}={d[k]}" for k in ("pid", "status", "exitStatus", "reason") if d.get(k) is not None)
    print(f"{_when(d['timestamp'])} {d['machine'] or '*'} {d['event']} {extra}".rstrip(), flush=True)


#: the commands that tell a running machine something: their method, and what the done thing is called
CONTROLS = {"reboot": ("Reboot", "Rebooted"), "pause": ("Pause", "Paused"), "resume": ("Resume", "Resumed")}


async def _console(proxy: Any, name: str) -> int:
    read_only = (await proxy.Describe(name=name))["machine"].config.console == "read-only"
    with await proxy.OpenConsole(name=name) as reply:
        fd = os.dup(reply["fileDescriptor"].fileno())
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def detach() -> None:
        if not done.done():
            done.set_result(0)

    fwd = PtyForwarder(fd, read_only=False, on_escape=detach, on_hangup=detach)
    try:
        fwd.start()
    except OSError as e:  # e.g. a terminal whose modes cannot be set
        fwd.stop()
        os.close(fd)
        print(f"vmspawnctl: cannot forward the console of {name}: {e.strerror or e}", file=sys.stderr)
        return 1
    what = " (a read-only console: what is typed is not passed on)" if read_only else ""
    print(f"░ Attached to {name}{what}. Press Ctrl-] three times within 1s to detach.", file=sys.stderr)
    for signum in DETACHING_SIGNALS:
        loop.add_signal_handler(signum, detach)
    try:
        return await done
    finally:
        for signum in DETACHING_SIGNALS:
            loop.remove_signal_handler(signum)
        fwd.stop()
        os.close(fd)


#: what detaches a console as Ctrl-] thrice does, the terminal restored (in raw mode Ctrl-C is the guest's:
#: these come from kill, or from a terminal that went away)
DETACHING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


#: Run on the remote host (by its python3, which vmspawnd needs anyway): relay stdin/stdout to and
#: from the daemon's socket there.  (OpenSSH's ``-W`` forwards to host:port only.)
REMOTE_BRIDGE = """\
import os, select, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    sys.exit(f"vmspawnctl: cannot reach vmspawnd at {sys.argv[1]} on {sys.argv[2]}: {e.strerror}")
route = {0: s.fileno(), s.fileno(): 1}
while route:
    for fd in select.select(list(route), [], [])[0]:
        data = os.read(fd, 65536)
        if not data:
            if fd == 0:
                s.shutdown(socket.SHUT_WR)
                del route[fd]
                continue
            sys.exit(0)
        while data:
            data = data[os.write(route[fd], data):]
"""


def ssh_argv(host: str, socket_path: str) -> list[str]:
    """``ssh`` to ``[USER@]HOST[:PORT]`` relaying our stdio to the daemon's socket there;
    ``$SYSTEMD_SSH`` names another ssh command."""
    port = None
    if ":" in host.rsplit("@", 1)[-1]:
        host, _, port = host.rpartition(":")
        if not is_decimal(port):
            raise ConfigError("host", f"{host}:{port}", "the port must be a number")
    if not host or host.startswith("-"):
        raise ConfigError("host", host, "expected [USER@]HOST[:PORT]")
    ssh = os.environ.get("SYSTEMD_SSH") or "ssh"
    remote = " ".join(shlex.quote(word) for word in ("python3", "-c", REMOTE_BRIDGE, socket_path, host))
    return [ssh, "-x", "-T", "-e", "none", *(["-p", port] if port else []), "--", host, remote]


async def connect(args: argparse.Namespace) -> tuple[Any, Any]:
    """A varlink connection to the daemon: its local socket, or over SSH to another host's."""
    if not args.host:
        return await connect_unix_varlink(VarlinkClientProtocol, args.address)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = ssh_argv(args.host, args.address)
    try:
        ssh = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(), start_new_session=True)
    except OSError as e:
        ours.close()
        raise ConfigError("SYSTEMD_SSH" if os.environ.get("SYSTEMD_SSH") else "host", argv[0],
                          f"cannot run {argv[0]}: {e.strerror}") from None
    finally:
        theirs.close()
    ours.setblocking(False)
    protocol = VarlinkClientProtocol()
    transport = VarlinkTransport(asyncio.get_running_loop(), ours, ours, protocol)
    await asyncio.sleep(0)

    def end_ssh(_: object) -> None:
        if ssh.poll() is None:
            ssh.terminate()

    transport.closed_future.add_done_callback(end_ssh)
    return transport, protocol


def vsock_proxy(address: str, port: int) -> int:
    """Connect to the guest's vsock ``port`` and relay our stdin and stdout to it."""
    try:
        sock = connect_guest_port(address, port)
    except (OSError, ValueError) as e:
        print(f"vmspawnctl: cannot reach port {port} of {address}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    route = {0: sock.fileno(), sock.fileno(): 1}
    try:
        while route:
            for fd in select.select(list(route), [], [])[0]:
                data = os.read(fd, 65536)
                if not data:
                    if fd != 0:
                        return EXIT_OK
                    sock.shutdown(socket.SHUT_WR)
                    del route[fd]
                    continue
                while data:
                    data = data[os.write(route[fd], data):]
    except OSError as e:
        print(f"vmspawnctl: the connection to port {port} of {address} broke: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


#: the environment variables that give ``vmspawnctl ssh``'s ProxyCommand its interpreter and address
PROXY_PYTHON, PROXY_ADDRESS = "VMSPAWNCTL_PROXY_PYTHON", "VMSPAWNCTL_PROXY_ADDRESS"


def ssh_into(info: Any, ssh_args: list[str]) -> int:
    """exec ``ssh`` to the machine ``info`` describes, through :func:`vsock_proxy`, as root with its key."""
    if not info.sshAddress:
        print(f"vmspawnctl: {info.name} has no vsock (it is not running, or the host has neither "
              "/dev/vhost-vsock nor vhost-device-vsock)", file=sys.stderr)
        return EXIT_FAILURE
    # The interpreter and the address reach the command through the environment (ssh runs it with the
    # user's shell, which expands them): not as ssh's %h (which ssh lowercases: MyVM's address named
    # myvm's socket), and not quoted on ssh's command line (whose own parser refuses a backslash before
    # a quote, and where % is an escape).  -P: ssh runs the command in our working directory, which must
    # not give Python a module of its own (-m puts it first on the path).
    os.environ.update({PROXY_PYTHON: sys.executable, PROXY_ADDRESS: info.sshAddress})
    proxy = f'"${PROXY_PYTHON}" -P -m vmspawnd.cli.vmspawnctl vsock-proxy "${PROXY_ADDRESS}" %p'
    argv = [os.environ.get("SYSTEMD_SSH") or "ssh", "-o", f"ProxyCommand={proxy}",
            "-o", "ProxyUseFdpass=no",  # (systemd's ssh_config sets it for vsock-mux/* hosts; ours relays)
            # the guest's host key is new with every boot, and the address is no network name
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "CheckHostIP=no",
            *(["-i", info.sshKey] if info.sshKey else []), "-l", "root"]
    sys.stdout.flush()
    try:
        os.execvp(argv[0], [*argv, info.sshAddress, *ssh_args])  # ssh reads options after the host too
    except OSError as e:
        print(f"vmspawnctl: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
    return EXIT_FAILURE


async def run(args: argparse.Namespace) -> int:
    if args.command == "vsock-proxy":
        return vsock_proxy(args.vsock_address, args.port)
    where = f"{args.address} on {args.host}" if args.host else args.address
    try:
        transport, protocol = await connect(args)
    except ConfigError as e:
        print(f"vmspawnctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        hint = ""
        if not args.host and isinstance(e, (FileNotFoundError, ConnectionRefusedError)):  # (no daemon there)
            hint = (" (is vmspawnd running? systemctl start vmspawnd.socket)" if args.address == DEFAULT_SOCKET
                    else " (is a vmspawnd serving it? vmspawnd --socket=SOCKET)")
        print(f"vmspawnctl: cannot reach vmspawnd at {where}: {e.strerror}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    if args.host and args.command in ("console", "ssh"):
        transport.close()
        why = ("its terminal is passed as a file descriptor" if args.command == "console"
               else "the guest's vsock is reached on the daemon's host")
        print(f"vmspawnctl: {args.command} needs a local daemon ({why})", file=sys.stderr)
        return EXIT_FAILURE
    proxy = VarlinkInterfaceProxy(protocol, ManagerInterface)
    try:
        cmd = args.command
        if cmd == "create":
            info = (await proxy.Create(name=args.name, config=Config(**config_to_json(args.config))))["machine"]
            _print_machine(info, args.json) if args.json else print(f"Created {args.name}.")
        elif cmd in ("start", "status", "remove"):
            method = {"start": proxy.Start, "status": proxy.Describe, "remove": proxy.Remove}[cmd]
            reply = await method(name=args.name)
            if cmd == "status" or args.json:
                if reply and "machine" in reply:
                    _print_machine(reply["machine"], args.json)
                    if cmd == "status" and not args.json and not args.host:  # (this host's journal)
                        _print_host_details(args.name, list(reply["machine"].units))
            elif cmd == "start":
                print(f"Started {args.name} (QEMU pid {reply['machine'].pid}).")
        elif cmd == "stop":
            info = (await proxy.Stop(name=args.name, timeout=args.timeout))["machine"]
            why = "; ".join(_printable(w) for w in info.warnings or [])  # (why the exit status is what it is)
            _print_machine(info, args.json) if args.json else print(
                f"Stopped {args.name} (exit status {info.exitStatus}){f': {why}' if why else ''}.")
        elif cmd in CONTROLS:
            call, done = CONTROLS[cmd]
            info = (await getattr(proxy, call)(name=args.name))["machine"]
            _print_machine(info, args.json) if args.json else print(f"{done} {args.name}.")
        elif cmd == "kill":
            info = (await proxy.Kill(name=args.name, signal=args.signal_number))["machine"]
            if args.json:
                _print_machine(info, args.json)
            elif args.signal is None:
                print(f"Killed {args.name}.")
            else:  # (not every signal ends QEMU)
                print(f"Sent {args.signal} to {args.name}'s QEMU; the machine is {info.state.value}.")
        elif cmd == "list":
            machines = [r["machine"] async for r in proxy.List() if r.get("machine") is not None]
            if args.json:
                _dump([_plain(m) for m in machines], args.json)
            else:
                _print_table([[m.name, _listed_state(m), "yes" if m.ready else "no",
                               str(m.pid or "-"), _when(m.since)] for m in machines],
                             ["NAME", "STATE", "READY", "PID", "SINCE"], legend=not args.no_legend)
                if not args.no_legend:
                    print(f"\n{len(machines)} machine(s) listed.")
        elif cmd == "events":
            async for r in proxy.Subscribe(name=args.name):
                if r["event"].event == "subscribed":  # from here on nothing is missed
                    print(f"Watching {'machine ' + args.name if args.name else 'all machines'} "
                          "(Ctrl-C to stop).", file=sys.stderr, flush=True)
                else:
                    _print_event(r["event"], args.json)
                if r["event"].event == "unsubscribed":  # the daemon ended the watch: events may be missed now
                    print(f"vmspawnctl: no longer watching: {r['event'].reason}", file=sys.stderr)
                    return EXIT_FAILURE
        elif cmd == "firmware":
            fw = (await proxy.ListFirmware())["firmware"]
            if args.json:
                _dump([_plain(f) for f in fw], args.json)
            else:
                for f in _printable([_plain(f) for f in fw]):
                    print(f"{f['path']}  {','.join(f['features']) or '-'}" + ("" if f["valid"] else "  (malformed)"))
        elif cmd == "console":
            return await _console(proxy, args.name)
        elif cmd == "ssh":
            info = (await proxy.Describe(name=args.name))["machine"]
            transport.close()
            return ssh_into(info, args.ssh_args)
        return EXIT_OK
    except ConfigError as e:
        print(f"vmspawnctl: {e}", file=sys.stderr)
        return EXIT_USAGE if e.field == "arguments" else EXIT_FAILURE
    except VarlinkErrorReply as e:
        print(f"vmspawnctl: {_describe_error(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except ConnectionError as e:
        if isinstance(e, BrokenPipeError) and _reader_gone(sys.stdout.fileno()):
            raise  # (| head: our output's reader hung up, not the daemon; main() stops quietly)
        if args.host:  # (ssh, or the relay on the other host, said why above)
            print(f"vmspawnctl: lost the connection to vmspawnd on {args.host}", file=sys.stderr)
        else:
            print(f"vmspawnctl: lost the connection to vmspawnd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        transport.close()


def _reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe whose reading end was closed."""
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return f"uid {uid}"


def _describe_error(e: VarlinkErrorReply) -> str:
    params = _printable(e.paramstojson() if hasattr(e, "paramstojson") else {})  # (QEMU's words, users' paths)
    short = e.name.rsplit(".", 1)[-1]
    if short == "NoSuchMachine":
        return f"no machine named {params.get('name')}"
    if short == "PermissionDenied":
        return f"permission denied: {params.get('reason') or params.get('action')}"
    if short == "MachineExists":
        return f"a machine named {params.get('name')} exists already"
    if short == "InvalidConfig" and isinstance(params.get("field"), str) and "reason" in params:
        return _as_option(params["field"], str(params["reason"]))
    if "reason" in params:
        return str(params["reason"])
    return f"{e.name} {json.dumps(params)}" if params else e.name


def _as_option(key: str, reason: str) -> str:
    """A daemon's ``invalid KEY=…`` of a setting (its JSON name) as ``create`` spells it: ``invalid option=…``
    (of a JSON field that several options fill, the first: ``binds`` as ``bind``)."""
    setting = BY_KEY.get(key)
    if setting is None or not reason.startswith(f"invalid {key}="):
        return reason
    option = setting.option
    if option is None and setting.attr is not None:  # (filled by options of its own: binds by --bind, --bind-ro)
        option = next((s.option for s in SETTINGS if s.option and s.attr == setting.attr), None)
    return reason if option is None else f"invalid {option.removeprefix('--')}={reason.removeprefix(f'invalid {key}=')}"


def _output_json(words: list[str]) -> tuple[list[str], str | None]:
    """``create``'s words without ``--json[=MODE]`` (an output option, before or after the command, not
    one of vmspawn's), and the last such MODE (bare: short); ``--`` ends the options."""
    options, _ = split_at_double_dash(words)
    mode = None
    for word in options:
        if word == "--json" or word.startswith("--json="):
            mode = word.partition("=")[2] or "short"
    kept = [w for w in options if not (w == "--json" or w.startswith("--json="))]
    return kept + words[len(options):], mode


def _bare_json(argv: list[str]) -> list[str]:
    """Bare ``--json`` means ``--json=short`` (up to ``create``, whose options are vmspawn's)."""
    end = argv.index("create") if "create" in argv else len(argv)
    return [("--json=short" if a == "--json" else a) for a in argv[:end]] + argv[end:]


def main(argv: list[str] | None = None) -> int:
    settle_caches()  # (our modules are imported)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(_bare_json(sys.argv[1:] if argv is None else argv))
        args.command = args.command or "list"
        if args.command == "create":  # vmspawn's options before NAME (e.g. "create --help") are create's
            args.rest, json_mode = _output_json(unknown + args.rest)
            args.json = json_mode or args.json
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.json is not None and args.json not in JSON_MODES:
            parser.error(f"--json: expected one of {', '.join(JSON_MODES)}, got {args.json!r}")
        args.json = None if args.json == "off" else args.json
        setup_logging(program="vmspawnctl", level=command_level(args.quiet, args.verbose, args.log_level))
        if args.command == "create":  # checked (and --help answered) before the daemon is asked
            args.name, args.config = parse_create(args.rest)
        if args.command == "kill":  # (a usage error, before the daemon is asked)
            args.signal_number = None if args.signal is None else parse_signal("signal", args.signal)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    except ConfigError as e:
        print(f"vmspawnctl: {e}", file=sys.stderr)
        return EXIT_USAGE if e.field in ("arguments", "signal") else EXIT_FAILURE
    except ValueError as e:  # --log-level
        print(f"vmspawnctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status = asyncio.run(run(args))
        sys.stdout.flush()  # (here rather than at exit, where a reader that hung up would get a traceback)
        return status
    except BrokenPipeError:  # our output's reader hung up (| head): stop quietly, nothing left to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:  # (how one stops following events: not a failure)
        return EXIT_OK if args.command == "events" else EXIT_FAILURE
    except SystemExit as e:
        return EXIT_OK if e.code in (0, None) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "OptionParser"]
