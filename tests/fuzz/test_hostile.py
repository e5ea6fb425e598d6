# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon under hostile and heavy load: it never stops accepting, never blocks, never hoards.

Every test runs a real vmspawnd and ends by checking that it is alive, that a fresh client is
answered within a second, and (where it applies) that its file descriptors and memory are back
near where they started.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, call_as, public_daemon
from tests.polling import poll
from tests.rawvarlink import list_all
from vmspawnd.interface import Config

pytestmark = pytest.mark.fuzz

IFACE = "io.vmspawnd.Manager"
ERRORS = {f"{IFACE}.{e}" for e in ("NoSuchMachine", "MachineExists", "InvalidConfig", "WrongState",
                                    "StartFailed", "HostFailed")} | {
    "org.varlink.service.InvalidParameter", "org.varlink.service.MethodNotFound",
    "org.varlink.service.InterfaceNotFound", "org.varlink.service.ExpectedMore",
    "invalid.asyncvarlink.ProtocolViolation"}


def raw_call(path: Path, payload: bytes, timeout: float = 5) -> tuple[str, dict | None]:
    """Send one NUL-terminated payload; ("reply", first reply) or ("closed", None)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(payload + b"\0")
        data = b""
        while b"\0" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return "closed", None
            data += chunk
    return "reply", json.loads(data.split(b"\0")[0])


def connected(daemon: Daemon, timeout: float = 5) -> socket.socket:
    """A new client connection to the daemon."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(daemon.socket))
    return s


def call(path: Path, method: str, parameters: dict | None = None, **kw) -> dict:
    outcome, reply = raw_call(path, json.dumps({"method": method, "parameters": parameters or {}, **kw}).encode())
    assert outcome == "reply" and reply is not None
    return reply


def assert_healthy(daemon: Daemon) -> None:
    """Alive, and a fresh client is answered within a second."""
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
    started = time.monotonic()
    reply = call(daemon.socket, "org.varlink.service.GetInfo")
    assert IFACE in reply["parameters"]["interfaces"]
    assert time.monotonic() - started < 1.0


def assert_clean_log(daemon: Daemon) -> None:
    log = daemon.log.read_text()
    for bad in ("Traceback", "Exception in callback", "never awaited", "AssertionError", "InternalError"):
        assert bad not in log, log[-3000:]


@pytest.fixture
def fds_unlimited() -> Iterator[None]:
    """This test process may hold a few thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ----------------------------------------------------------------------------- hostile requests
METHODS: dict[str, list[str]] = {
    "Create": ["name", "config"], "Start": ["name"], "Stop": ["name", "timeout"], "Kill": ["name", "signal"],
    "Remove": ["name"], "Describe": ["name"], "List": [], "Subscribe": ["name"], "ListFirmware": [],
    "OpenConsole": ["name"], "Reboot": ["name"], "Pause": ["name"], "Resume": ["name"],
}
WRONG = [None, True, False, 0, -1, 2**63, -2**63 - 1, 1.5, 1e308, "", "x" * 5000, [], [1, "a"], {}, {"a": 1},
         "../../etc/shadow", "/dev/vda", "\u0000", "é\u202e", "/", "auto"]
HOSTILE_NAMES = ["../x", "", ".", "..", "a/b", "a\u0000b", "x" * 300, "-rf", "é", "a b", "\n", "x.json", ".hidden",
                 "1" * 64, "/etc/passwd", "${HOME}", "$(reboot)", "a;b", "*", "name\\"]
CONFIG_FIELDS = [f.name for f in dataclasses.fields(Config)]


def hostile_payloads(count: int, seed: int = 7) -> list[bytes]:
    rnd = random.Random(seed)
    out: list[bytes] = []

    def request(method: str, params: object, **extra: object) -> bytes:
        return json.dumps({"method": f"{IFACE}.{method}", "parameters": params, **extra}).encode()

    for method, params in METHODS.items():  # wrong types for every method and parameter
        for param in params:
            for value in WRONG:
                out.append(request(method, {p: (value if p == param else "fz") for p in params}))
        out.append(request(method, {"extra": 1}))
        out.append(request(method, None))
        out.append(request(method, []))
        for name in HOSTILE_NAMES if "name" in params else []:
            out.append(request(method, {"name": name, **({"config": {}} if method == "Create" else {})}))
    for field in CONFIG_FIELDS:  # wrong types and hostile values for every config field
        for value in WRONG:
            out.append(request("Create", {"name": "fz", "config": {field: value}}))
    fixed = [
        b"", b"{", b"}", b"[]", b"null", b"42", b'"str"', b"{}", b'{"method": 5}', b'{"method": null}',
        b'{"method": "io.vmspawnd.Manager.Describe"}', b'{"method": "nope"}', b'{"method": "a.b.C", "parameters": {}}',
        b'{"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "../x"}}',
        b'{"method": "io.vmspawnd.Manager.Describe", "parameters": {"name": "\xff\xfe"}}',  # invalid UTF-8
        b'\xff\xfe\xfd', b'{"method": "io.vmspawnd.Manager.List", "more": "yes"}',
        b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000,  # deep nesting
        b'{"method": "io.vmspawnd.Manager.Stop", "parameters": {"name": "x", "timeout": 1' + b"0" * 5000 + b"}}",
        b'{"method": "io.vmspawnd.Manager.Kill", "parameters": {"name": "x", "signal": ' + b"9" * 5000 + b"}}",
        b"9" * 10_000, request("Describe", {"name": "x"}, more=True), request("List", {}, upgrade=True),
        request("Create", {"name": "fz", "config": {"credentials": ["a:" + "b" * 600_000]}}),
    ]
    out += fixed
    values = WRONG + HOSTILE_NAMES + [{"linux": "/bin/sh"}, {"ram": "1G", "cpus": "2"}, 3.0, 10**30, [[[]]]]
    while len(out) < count:  # then random well-formed calls with random values, and random byte mutations
        if rnd.random() < 0.5:
            method = rnd.choice([*METHODS, "Nope"])
            names = [*METHODS.get(method, []), "x"]
            params = {p: rnd.choice(values) for p in rnd.sample(names, rnd.randint(0, len(names)))}
            if method == "Create" and rnd.random() < 0.5:
                params["config"] = {f: rnd.choice(values) for f in rnd.sample(CONFIG_FIELDS, rnd.randint(1, 4))}
            out.append(request(method, params, **({"more": True} if rnd.random() < 0.2 else {})))
            continue
        base = bytearray(rnd.choice(out[:5000]) or b"{}")
        for _ in range(rnd.randint(1, 4)):
            kind = rnd.random()
            pos = rnd.randrange(len(base) + 1)
            if kind < 0.4:
                base[pos:pos] = bytes([rnd.randrange(256)])
            elif kind < 0.7 and base:
                del base[min(pos, len(base) - 1)]
            else:
                base[pos:pos] = rnd.choice([b'"', b"{", b"[", b"\\u0000", b"\xc3", b"1e999", b"-0", b"\\"])
        out.append(bytes(base).replace(b"\0", b""))
    return out


def test_ten_thousand_hostile_requests(daemon: Daemon) -> None:
    payloads = hostile_payloads(10_000)
    assert len(payloads) >= 10_000
    baseline = daemon.fds()
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    hung: list[bytes] = []

    async def worker(queue: asyncio.Queue[bytes]) -> None:
        while not queue.empty():
            payload = queue.get_nowait()
            reader, writer = await asyncio.open_unix_connection(str(daemon.socket), limit=1 << 22)
            try:
                writer.write(payload + b"\0")
                await writer.drain()
                data = await asyncio.wait_for(reader.readuntil(b"\0"), 10)
                reply = json.loads(data[:-1])
                outcomes["reply"] += 1
                if "error" in reply:
                    errors[reply["error"]] += 1
            except (asyncio.IncompleteReadError, ConnectionError):
                outcomes["closed"] += 1
            except TimeoutError:
                hung.append(payload[:200])
            finally:
                writer.close()

    async def main() -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for p in payloads:
            queue.put_nowait(p)
        await asyncio.gather(*(worker(queue) for _ in range(16)))

    asyncio.run(main())
    assert hung == [], hung[:5]  # every request answered, or its connection closed
    assert set(errors) <= ERRORS, errors
    assert outcomes["reply"] > 9000, outcomes
    assert_healthy(daemon)
    poll(daemon.fds, lambda n: n <= baseline + 2, 5)
    assert_clean_log(daemon)
    for entry in (daemon.state / "machines").glob("*.json"):  # nothing hostile got defined
        assert "/" not in entry.stem and ".." not in entry.stem


# ----------------------------------------------------------------------------- unterminated messages
@pytest.mark.parametrize("size_mb", [16, 64])
def test_an_unterminated_huge_message_blocks_nobody(daemon: Daemon, size_mb: int) -> None:
    baseline_rss = daemon.rss()
    sent = [0]

    def stream() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(daemon.socket))
            chunk = b"x" * (1 << 16)
            try:
                while sent[0] < size_mb << 20:
                    s.sendall(chunk)
                    sent[0] += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass

    latencies: list[float] = []
    sender = threading.Thread(target=stream)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(daemon.socket))
        c.settimeout(5)
        sender.start()
        while sender.is_alive() or len(latencies) < 50:
            started = time.monotonic()
            c.sendall(json.dumps({"method": f"{IFACE}.Describe", "parameters": {"name": "ghost"}}).encode() + b"\0")
            data = b""
            while not data.endswith(b"\0"):
                data += c.recv(65536)
            latencies.append(time.monotonic() - started)
            assert json.loads(data[:-1])["error"] == f"{IFACE}.NoSuchMachine"
    sender.join()
    assert sent[0] < 8 << 20, sent  # hung up on once over the limit, not after draining it all
    assert max(latencies) < 0.25, sorted(latencies)[-5:]  # (it used to be 17.6 s for 16 MB)
    assert_healthy(daemon)
    assert daemon.rss() < baseline_rss + (32 << 20)


# ----------------------------------------------------------------------------- many connections
@pytest.mark.parametrize("cap", ["default", "above the fd limit"])
def test_more_connections_than_file_descriptors(tmp_path: Path, fds_unlimited: None, cap: str) -> None:
    d = Daemon(tmp_path)
    d.nofile = 1024
    if cap != "default":
        d.args = ["--max-connections=5000"]  # the cap cannot save us: accept() hits EMFILE
    d.start()
    try:
        baseline = d.fds()
        clients = []
        for _ in range(1100):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(str(d.socket))
            except BlockingIOError:
                pass
            clients.append(s)
        time.sleep(1)
        assert d.proc is not None and d.proc.poll() is None
        for s in clients:
            s.close()
        poll(lambda: _answered(d), bool, 5)  # the listener survived
        assert_healthy(d)
        poll(d.fds, lambda n: n <= baseline + 2, 5)
        assert "Traceback" not in d.log.read_text()
    finally:
        d.stop_daemon()


# Run as another user: opens argv[2] connections to argv[1], calls GetInfo on each, prints how many
# were answered, and holds them all until its stdin closes.
HOLDER = """
import json, socket, sys
held, answered = [], 0
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sys.argv[1])
    held.append(s)
    try:
        s.sendall(json.dumps({"method": "org.varlink.service.GetInfo"}).encode() + b"\\0")
        answered += s.recv(65536).endswith(b"\\0")
    except OSError:
        pass
print(answered, flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_one_user_cannot_take_every_connection_from_root_or_other_users() -> None:
    with public_daemon("--max-connections=32") as d:  # a user may hold 8 (a quarter), root is kept 2
        holder = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                                   "-c", HOLDER, str(d.socket), "40"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "8\n"
            for uid in (0, 1):  # root, and another user (daemon)
                assert "error" not in call_as(uid, d.socket, "org.varlink.service.GetInfo")
            assert "connection limit reached" in d.log.read_text()
        finally:
            holder.communicate("")
        assert_healthy(d)


# Run as another user: Create calls (argv[2]: a JSON list of [name, config]) on one connection to
# argv[1] until one fails; prints how many succeeded and the failing reply.
CREATOR = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
made, reply = 0, None
for name, config in json.loads(sys.stdin.read()):
    call = {"method": "io.vmspawnd.Manager.Create", "parameters": {"name": name, "config": config}}
    s.sendall(json.dumps(call).encode() + b"\\0")
    data = b""
    while not data.endswith(b"\\0"):
        data += s.recv(1 << 20)
    reply = json.loads(data[:-1])
    if "error" in reply:
        break
    made += 1
print(json.dumps([made, reply]))
"""


def create_as(uid: int, d: Daemon, machines: list[tuple[str, dict]]) -> tuple[int, dict]:
    """Create ``machines`` as ``uid`` until one fails: (how many were made, the last reply)."""
    p = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c",
                        CREATOR, str(d.socket)], input=json.dumps(machines), capture_output=True, text=True,
                       timeout=300, check=True)
    made, reply = json.loads(p.stdout)
    return made, reply


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_one_user_cannot_fill_the_daemons_disk_and_memory_with_definitions(public_dir: Path) -> None:
    kernel = public_dir / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    kernel.chmod(0o644)
    with public_daemon() as d:
        credential = base64.b64encode(random.randbytes(700_000)).decode()  # (a Create message holds 1 MiB)
        big = [(f"big{i}", {"linux": str(kernel), "credentials": [f"blob:{credential}"]}) for i in range(100)]
        made, reply = create_as(65534, d, big)
        assert reply["error"] == "io.vmspawnd.Manager.LimitReached", reply
        assert reply["parameters"]["limit"] == "definitions" and 60 <= made < 72, (made, reply)
        used = sum(f.stat().st_size for f in (d.state / "machines").glob("big*.json"))
        assert used <= 64 << 20, used
        for i in range(made):
            assert "error" not in call_as(65534, d.socket, "io.vmspawnd.Manager.Remove", {"name": f"big{i}"})
        made, reply = create_as(65534, d, [(f"m{i}", {"linux": str(kernel)}) for i in range(300)])
        assert (made, reply["error"], reply["parameters"]["limit"]) == (256, "io.vmspawnd.Manager.LimitReached",
                                                                         "machines"), reply
        assert "remove one first" in reply["parameters"]["reason"]
        # root has no such limits, and another user has their own
        assert "error" not in call_as(1, d.socket, "io.vmspawnd.Manager.Create",
                                      {"name": "other", "config": {"linux": str(kernel)}})
        assert "error" not in call_as(0, d.socket, "io.vmspawnd.Manager.Create",
                                      {"name": "roots", "config": {"linux": str(kernel)}})
        assert_healthy(d)


def _answered(d: Daemon) -> bool:
    try:
        return "error" not in call(d.socket, "org.varlink.service.GetInfo")
    except (OSError, AssertionError):
        return False


def test_partial_messages_are_capped_and_their_memory_returned(daemon: Daemon, fds_unlimited: None) -> None:
    baseline = daemon.rss()
    clients = []
    for _ in range(300):
        s = connected(daemon)
        try:
            s.sendall(b'{"method": "' + b"x" * 1_000_000)
        except (BrokenPipeError, ConnectionResetError):
            pass  # over the total cap: that client was dropped
        clients.append(s)
    time.sleep(0.5)
    held = daemon.rss()
    assert held < baseline + (128 << 20), (baseline, held)  # 300 MB were sent; at most 64 MiB are kept
    for s in clients:
        s.close()
    poll(daemon.rss, lambda rss: rss < baseline + (16 << 20), 5)
    assert_healthy(daemon)


def test_calls_sent_without_reading_the_answers_are_read_only_as_they_are_answered(daemon: Daemon) -> None:
    """A client pipelines calls for 3 s and reads nothing: the daemon stops reading it (its memory
    stays put, others are answered); once the client reads, every call it sent is answered."""
    baseline = daemon.rss()
    one = json.dumps({"method": f"{IFACE}.Describe", "parameters": {"name": "nope"}}).encode() + b"\0"
    calls = one * 1000
    with connected(daemon) as s:
        s.setblocking(False)
        sent, deadline = 0, time.monotonic() + 3
        while time.monotonic() < deadline and sent < 512 << 20:
            try:
                sent += s.send(calls[sent % len(calls):])
            except BlockingIOError:
                time.sleep(0.01)
        held = daemon.rss()
        assert_healthy(daemon)
        assert sent < 4 << 20, sent  # (≈ 0.3 MB: what the sockets buffer)
        assert held < baseline + (16 << 20), (baseline, held)  # (reading on, a daemon took 25 MB in: +358 MB)
        s.setblocking(True)
        s.settimeout(30)
        s.shutdown(socket.SHUT_WR)  # (an incomplete last call is dropped; the others are answered)
        answers, data = 0, b""
        while chunk := s.recv(1 << 20):
            data += chunk
            *replies, data = data.split(b"\0")
            answers += len(replies)
            assert all(r.startswith(b'{"error":"io.vmspawnd.Manager.NoSuchMachine"') for r in replies), replies[:1]
    assert answers == sent // len(one), (answers, sent // len(one))
    assert_clean_log(daemon)


# ----------------------------------------------------------------------------- subscriptions
def test_subscribers_that_hang_up_are_let_go(daemon: Daemon, fds_unlimited: None) -> None:
    baseline = daemon.fds()
    subscribers = []
    for _ in range(200):
        s = connected(daemon)
        s.sendall(json.dumps({"method": f"{IFACE}.Subscribe", "parameters": {"name": None}, "more": True}).encode()
                  + b"\0")
        subscribers.append(s)
    for s in subscribers:
        assert b'"subscribed"' in s.recv(4096)
    assert daemon.fds() >= baseline + 200
    for s in subscribers:
        s.close()
    poll(daemon.fds, lambda n: n <= baseline + 2, 2.5)  # without any event arriving
    assert_healthy(daemon)
    assert_clean_log(daemon)


def test_subscribing_to_an_unknown_machine_is_refused(daemon: Daemon) -> None:
    reply = call(daemon.socket, f"{IFACE}.Subscribe", {"name": "ghost"}, more=True)
    assert reply["error"] == f"{IFACE}.NoSuchMachine"


def test_stopping_the_daemon_ends_subscriptions_cleanly(daemon: Daemon) -> None:
    subscribers = []
    for _ in range(20):
        s = connected(daemon, timeout=10)
        s.sendall(json.dumps({"method": f"{IFACE}.Subscribe", "parameters": {}, "more": True}).encode() + b"\0")
        assert b'"subscribed"' in s.recv(4096)
        subscribers.append(s)
    daemon.stop_daemon(signal.SIGTERM)
    for s in subscribers:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        last = json.loads(data.split(b"\0")[0])
        assert last["parameters"]["event"]["event"] == "unsubscribed" and not last.get("continues"), last
        assert "stopping" in last["parameters"]["event"]["reason"]
        s.close()
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert_clean_log(daemon)


# ----------------------------------------------------------------------------- many machines
LIST_CLIENT = """
import json, socket, sys, time
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sys.argv[1])
        s.sendall(json.dumps({"method": "io.vmspawnd.Manager.List", "parameters": {}, "more": True}).encode() + b"\\0")
        data = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\\0") and b'"continues"' not in data.rsplit(b"\\0", 2)[-2]:
                break
"""


def test_listing_a_thousand_machines_does_not_stall_describe(daemon: Daemon) -> None:
    machines = daemon.state / "machines"
    for i in range(1000):
        (machines / f"m{i:04}.json").write_text(json.dumps({"name": f"m{i:04}", "config": {"linux": "/bin/sh"}}))
    daemon.stop_daemon()
    daemon.start()
    # one whole List alone, the fastest of 3: what a Describe would wait behind if a List held the daemon
    one_list = float("inf")
    for _ in range(3):
        started = time.monotonic()
        assert list_all(daemon.socket) == 1000
        one_list = min(one_list, time.monotonic() - started)
    listers = [subprocess.Popen([sys.executable, "-c", LIST_CLIENT, str(daemon.socket), "6"]) for _ in range(10)]
    try:
        time.sleep(1)
        latencies = []
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(daemon.socket))
            c.settimeout(5)
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                started = time.monotonic()
                c.sendall(json.dumps({"method": f"{IFACE}.Describe", "parameters": {"name": "m0500"}}).encode()
                          + b"\0")
                data = b""
                while not data.endswith(b"\0"):
                    data += c.recv(1 << 20)
                latencies.append(time.monotonic() - started)
                time.sleep(0.005)
    finally:
        for p in listers:
            p.wait(30)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    # A List that held the daemon to its end makes a Describe wait behind most of the 10 Lists: p99 ≈ 9
    # whole Lists here (120-140 ms against a List alone of 14 ms). Lists that let others in leave only
    # the scheduling of 12 processes on 2 CPUs: p99 5-24 ms. 50 ms, or 4 Lists on a slower machine.
    assert p99 < max(0.05, 4 * one_list), (p99, one_list, latencies[-5:], len(latencies))
    assert all(p.returncode == 0 for p in listers)
    assert_healthy(daemon)


# ----------------------------------------------------------------------------- ownership of the paths
def test_a_second_daemon_on_the_same_paths_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.proc is not None
    second = subprocess.run([sys.executable, "-m", "vmspawnd.cli.vmspawnd", f"--socket={daemon.socket}",
                             f"--state-dir={daemon.state}", f"--runtime-dir={daemon.runtime}"],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1 and f"pid {daemon.proc.pid}" in second.stderr, second.stderr
    other_runtime = subprocess.run([sys.executable, "-m", "vmspawnd.cli.vmspawnd", f"--socket={daemon.socket}",
                                    f"--state-dir={tmp_path / 'other'}", f"--runtime-dir={tmp_path / 'other-run'}"],
                                   capture_output=True, text=True, timeout=30)
    assert other_runtime.returncode == 1 and f"pid {daemon.proc.pid}" in other_runtime.stderr, other_runtime.stderr
    assert daemon.socket.exists()  # never unlinked
    assert_healthy(daemon)


def test_unusable_definitions_stay_visible_and_removable(daemon: Daemon) -> None:
    machines = daemon.state / "machines"
    (machines / "garbled.json").write_text("{ not json")
    (machines / "badram.json").write_text(json.dumps({"name": "badram", "config": {"linux": "/bin/sh",
                                                                                   "ram": "banana"}}))
    newer = json.dumps({"name": "newer", "config": {"linux": "/bin/sh", "fromTheFuture": {"x": 1}}})
    (machines / "newer.json").write_text(newer)
    (machines / "deep.json").write_text("[" * 100000 + "]" * 100000)  # deeper than Python's JSON reads
    (machines / "newer.state").write_text("[" * 100000 + "]" * 100000)
    daemon.stop_daemon()
    daemon.start()
    listed = {m["name"]: m for m in json.loads(daemon.ctl("--json", "list").stdout)}
    assert set(listed) == {"garbled", "badram", "newer", "deep"}
    assert "nests too deeply" in listed["deep"]["definitionError"]
    for name in ("garbled", "badram", "deep"):
        assert listed[name]["state"] == "failed" and name in listed[name]["definitionError"], listed[name]
        assert listed[name]["failure"] == listed[name]["definitionError"]
    assert listed["newer"]["state"] == "stopped" and listed["newer"]["definitionError"] is None
    assert (machines / "newer.json").read_text() == newer  # a downgrade loses nothing
    assert "fromTheFuture" in daemon.log.read_text()  # said once, at load
    p = daemon.ctl("start", "garbled")
    assert p.returncode == 1 and "cannot be used" in p.stderr
    assert daemon.ctl("remove", "garbled").returncode == 0
    assert not (machines / "garbled.json").exists()
    assert_healthy(daemon)
