# SPDX-License-Identifier: LGPL-2.1-or-later
"""``vmspawn``'s work: run one VM in the foreground, with systemd-vmspawn's options (the command's
entry point, cli/vmspawn.py, starts QEMU's launcher first and then calls :func:`main`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError, HostError, StartError, WrongState
from vmspawnd.launcher import QemuProcess
from vmspawnd.log import command_level, get_logger, setup_logging
from vmspawnd.machine import Machine, State
from vmspawnd.options import InfoRequest, parse_vmspawn_command_line
from vmspawnd.plan import LaunchPlan, plan_launch
from vmspawnd.ptyfwd import PtyForwarder
from vmspawnd.runtime import runtime_base
from vmspawnd.systemd.notify import ManagerNotifier
from vmspawnd.tint import query_terminal_background, tint_from_background
from vmspawnd.values import FALSE_WORDS, ConsoleMode

log = get_logger()


def main(argv: list[str] | None = None, launcher: tuple[int, int] | None = None) -> int:
    """Run vmspawn; ``launcher``: (pid, socket fd) of an exec-late launcher started for QEMU already."""
    setup_logging(program="vmspawn", level=command_level())
    try:
        terminal = os.isatty(0) and os.isatty(1)
        config, front_end = parse_vmspawn_command_line(sys.argv[1:] if argv is None else argv, terminal=terminal)
        if config.console is ConsoleMode.INTERACTIVE and not terminal:
            raise ConfigError("console", "interactive", "needs a terminal on standard input and output "
                              "(use --console=read-only or headless)")
        plan = plan_launch(config)  # what this host offers, looked at once, before anything is shown
    except InfoRequest as info:
        try:
            print(info.text, flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as e:
        print(f"vmspawn: {e}", file=sys.stderr)
        return 1
    setup_logging(program="vmspawn", level=front_end.log_level)
    try:
        status = asyncio.run(_run_and_leave(config, front_end.background, plan, launcher))
    except KeyboardInterrupt:
        status = 1
    _leave(status)


async def _run_and_leave(config: MachineConfig, background: str | None, plan: LaunchPlan,
                         launcher: tuple[int, int] | None) -> int:
    """:func:`run`, then leave at once if nothing else runs in the event loop (the usual end): closing
    a loop with nothing left in it still took 0.5-0.9 ms of the 4-5 between QEMU's exit and ours."""
    status = await run(config, background, plan, launcher)
    if asyncio.all_tasks() == {asyncio.current_task()}:
        _leave(status)
    return status  # (asyncio.run ends what still runs first)


def _leave(status: int) -> typing.NoReturn:
    """Exit now: the VM is gone and everything it held is released.  The interpreter's modules are not
    torn down one by one (that took longer than all of the VM's cleanup)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


#: what ``systemctl status`` says of a VM whose vCPUs stopped (``machinectl pause``, QMP's ``stop``), or
#: whose guest suspended itself to RAM (ACPI S3: a resume wakes it)
HALTED_STATUS = {"paused": "VM paused.", "suspended": "VM suspended: the guest suspended itself to RAM."}


def _events_to_manager(config: MachineConfig, notifier: ManagerNotifier) -> Callable[[str, dict[str, Any]], None]:
    """Map machine events to sd_notify messages for whoever started us."""
    running = "VM running."  # (with the guest's own STATUS=, once it sent one)

    def on_event(kind: str, data: dict) -> None:
        nonlocal running
        if kind in ("ready", "status") and data.get("status"):
            running = f"VM running: {data['status']}"
        elif kind == "reset":  # (what the guest said before it was reset is old news)
            running = "VM running."
        if kind == "running":
            notifier.send(STATUS="VM started.", X_VMSPAWN_LEADER_PID=data["pid"])
            if not config.notify_ready:
                notifier.send(READY=1)
        elif kind == "ready" and config.notify_ready:  # (the guest's own STATUS= sent with it, if any)
            notifier.send(READY=1, STATUS=running)
        elif kind == "status":
            notifier.send(STATUS=running)
        elif kind in HALTED_STATUS:
            notifier.send(STATUS=HALTED_STATUS[kind])
        elif kind in ("resumed", "woke"):
            notifier.send(STATUS=running)
        elif kind == "stopping":
            notifier.send(STOPPING=1)
    return on_event


def console_decoration(config: MachineConfig, background: str | None) -> tuple[str | None, str | None]:
    """The tint colour and window title, when our output is a terminal (and they are not disabled)."""
    if not os.isatty(1):
        return None, None
    title = None
    if os.environ.get("SYSTEMD_ADJUST_TERMINAL_TITLE", "1") not in FALSE_WORDS:
        title = f"Virtual Machine {config.name} on {socket.gethostname()}"
    if os.environ.get("SYSTEMD_TINT_BACKGROUND", "1") in FALSE_WORDS or background == "":
        return None, title
    if background is not None:
        return background, title
    rgb = query_terminal_background(0) if os.isatty(0) else None
    return (tint_from_background(rgb) if rgb else None), title


async def run(config: MachineConfig, background: str | None = None, plan: LaunchPlan | None = None,
              launcher: tuple[int, int] | None = None) -> int:
    """Boot the VM, forward its console, and return the exit status."""
    loop = asyncio.get_running_loop()
    try:
        machine = Machine(config, runtime_base=runtime_base(), die_with_parent=True,
                          on_event=_events_to_manager(config, ManagerNotifier()))
    except ConfigError as e:
        print(f"vmspawn: {e}", file=sys.stderr)
        return 1
    signals_seen = 0
    tasks: set[asyncio.Task[None]] = set()

    def command(coro: Coroutine[Any, Any, None]) -> None:
        """Run a stop or kill in the background; one that finds the VM already gone is fine."""
        async def quietly() -> None:
            with contextlib.suppress(WrongState):
                await coro
        task = loop.create_task(quietly())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    starting: asyncio.Task[None] | None = None

    def on_signal(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if starting is not None and not starting.done():  # nothing to power off yet: the start is undone
            if signals_seen == 1:  # (once: a second cancel would cut short the undoing)
                log.info("not starting the VM", signal=signame)
                starting.cancel()
        elif machine.state is State.RUNNING and signals_seen == 1:
            log.info("stopping the VM (ACPI power-off); send the signal again to kill it", signal=signame)
            command(machine.stop())
        elif machine.state in (State.RUNNING, State.STOPPING):
            command(machine.kill())

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # (SIGHUP: its terminal went away)
        loop.add_signal_handler(sig, on_signal, sig.name)

    if not config.quiet and config.console is not ConsoleMode.GUI:
        what = config.image.path if config.image else config.directory or config.linux
        print(f"░ Spawning VM {config.name} on {what}.", file=sys.stderr)
        if config.console is ConsoleMode.INTERACTIVE:
            print("░ Press Ctrl-] three times within 1s to kill VM.", file=sys.stderr)
        elif config.console is ConsoleMode.NATIVE:
            print("░ Press Ctrl-a x to kill VM.", file=sys.stderr)
    starting = loop.create_task(machine.start(plan=plan, launcher=QemuProcess.spawned(*launcher) if launcher else None))
    try:
        await starting
    except (ConfigError, StartError, HostError) as e:
        print(f"vmspawn: {e}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:  # a signal: what the start had set up is released (an --ephemeral copy too)
        return 1
    if machine.pty is not None:
        tint, title = console_decoration(config, background)
        forwarder = PtyForwarder(machine.pty.master, read_only=config.console is ConsoleMode.READ_ONLY,
                                 on_escape=lambda: command(machine.kill(forced=False)),
                                 tint=tint, title=title)
        try:
            forwarder.start()
        except OSError as e:  # e.g. a terminal whose modes cannot be set
            print(f"vmspawn: cannot forward the console: {e}", file=sys.stderr)
            with contextlib.suppress(WrongState):
                await machine.kill()
            return 1
        machine.on_cleanup(forwarder.stop)
    return await machine.wait()  # (a failure was logged by the machine)

