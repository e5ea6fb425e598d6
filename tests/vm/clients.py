# SPDX-License-Identifier: LGPL-2.1-or-later
"""Concurrent varlink clients against a test daemon: one connection each, typed outcomes counted."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import subprocess
import time
from collections.abc import Callable

from asyncvarlink import VarlinkClientProtocol, VarlinkErrorReply, VarlinkInterfaceProxy, connect_unix_varlink

from tests.conftest import Daemon
from tests.polling import poll
from vmspawnd.interface import ManagerInterface

CALL_TIMEOUT = 120.0
#: the typed errors a call may end in (besides "ok") while other clients act on the same machines
TYPED = {"NoSuchMachine", "MachineExists", "InvalidConfig", "WrongState", "StartFailed", "HostFailed"}


class Client:
    """One varlink connection to the daemon."""

    def __init__(self, transport, proxy) -> None:
        self.transport, self.proxy = transport, proxy

    @classmethod
    async def connect(cls, daemon: Daemon) -> Client:
        transport, protocol = await connect_unix_varlink(VarlinkClientProtocol, daemon.socket)
        return cls(transport, VarlinkInterfaceProxy(protocol, ManagerInterface))

    async def call(self, method: str, **params) -> str:
        """``ok`` or the short name of the typed error; raises on anything else (a hang included)."""
        try:
            await asyncio.wait_for(getattr(self.proxy, method)(**params), CALL_TIMEOUT)
        except VarlinkErrorReply as e:
            return e.name.rsplit(".", 1)[-1]
        return "ok"

    async def state(self, name: str) -> str:
        reply = await asyncio.wait_for(self.proxy.Describe(name=name), CALL_TIMEOUT)
        return reply["machine"].state.value

    def close(self) -> None:
        self.transport.close()


def at_once(daemon: Daemon, *commands: list[str]) -> list[tuple[int, str, str]]:
    """Each vmspawnctl command from its own client, all at once: (exit status, stdout, stderr) each."""
    procs = [subprocess.Popen([*daemon.ctl_argv(), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for command in commands]
    return [(p.wait(60), *p.communicate()) for p in procs]


def settle(daemon: Daemon, names) -> dict[str, dict]:
    """Kill what runs, then wait until no machine is starting, running or stopping."""
    def states() -> dict[str, dict]:
        found = {}
        for name in names:
            p = daemon.ctl("--json", "status", name)
            if p.returncode == 0:
                found[name] = json.loads(p.stdout)
        return found
    for name, st in states().items():
        if st["state"] == "running":
            daemon.ctl("kill", name)
    return poll(states, lambda s: all(m["state"] in ("stopped", "failed") for m in s.values()), 60)


def hammer(daemon: Daemon, clients: int, seconds: float,
           next_call: Callable[[random.Random, int], tuple[str, dict]]) -> collections.Counter[tuple[str, str]]:
    """``clients`` connections, each making the calls ``next_call(its random generator, its number)``
    picks, one after another, for ``seconds``: how often each (method, outcome) came back."""
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    deadline = time.monotonic() + seconds

    async def client(seed: int) -> None:
        rnd = random.Random(seed)
        c = await Client.connect(daemon)
        try:
            while time.monotonic() < deadline:
                op, params = next_call(rnd, seed)
                outcomes[(op, await c.call(op, **params))] += 1
        finally:
            c.close()

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(clients)))

    asyncio.run(main())
    return outcomes
