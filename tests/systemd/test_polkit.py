# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who may do what, on a real systemd host: two users who are not root (alice, bob), the
socket-activated daemon with its default 0666 socket, real QEMU, swtpm and virtiofsd as transient
units, machined, and the container's real polkitd deciding what goes beyond a user's own VM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.polling import poll
from tests.systemd.helpers import GUEST_DIR, WITH_GUEST, Ctl, sh, unit_properties, unwanted_libraries, varlinkctl
from vmspawnd.services.virtiofsd import Flavour, find_virtiofsd
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = [
    *WITH_GUEST,
    pytest.mark.skipif(shutil.which("pkcheck") is None and not Path("/usr/lib/polkit-1/polkitd").exists(),
                       reason="no polkitd in this tree"),
]

SOCKET = "/run/vmspawnd/io.vmspawnd.Manager"
REPO = Path(__file__).resolve().parents[2]
POLICY = Path("/usr/share/polkit-1/actions/io.vmspawnd.policy")
RULE = Path("/etc/polkit-1/rules.d/50-vmspawnd-test.rules")
HOME = Path("/home/alice")
VM = "alices"


@pytest.fixture
def users(installed_units: Path) -> Iterator[Ctl]:
    """The policy installed, users alice (with the test guest and a share in her home) and bob."""
    shutil.copy(REPO / "polkit" / "io.vmspawnd.policy", POLICY)
    for user in ("alice", "bob"):
        if sh("id", user, check=False).returncode != 0:
            sh("useradd", "--create-home", user)
    HOME.chmod(0o700)
    (HOME / "share").mkdir(exist_ok=True)
    shutil.copy(GUEST_DIR / "vmlinuz", HOME / "vmlinuz")
    shutil.copy(GUEST_DIR / "initrd.img", HOME / "initrd.img")
    sh("chown", "-R", "alice:alice", str(HOME))
    sh("systemctl", "start", "vmspawnd.socket")
    ctl = Ctl(installed_units)
    try:
        yield ctl
    finally:
        RULE.unlink(missing_ok=True)
        sh("systemctl", "unmask", "--runtime", "polkit.service", check=False)
        ctl("kill", VM, check=False)
        ctl("remove", VM, check=False)


def call(user: str, method: str, parameters: dict, *, more: bool = False) -> tuple[bool, Any]:
    """``varlinkctl call`` as ``user``: (True, reply, or the replies' text with ``more``) or (False,
    error name + its parameters)."""
    p = sh("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *varlinkctl(), "call",
           *(["--more"] if more else []), SOCKET, f"io.vmspawnd.Manager.{method}", json.dumps(parameters),
           check=False, timeout=120)
    if p.returncode != 0:
        return False, p.stderr + p.stdout
    return True, p.stdout if more else json.loads(p.stdout or "{}")  # a reply without parameters prints nothing


def uid_of(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    assert len(set(line.split()[1:5])) == 1, line  # real, effective, saved and file-system uid alike
    return int(line.split()[1])


def alice_config(**extra: object) -> dict:
    return {"linux": str(HOME / "vmlinuz"), "initrds": [str(HOME / "initrd.img")], "ram": "256M",
            "firmware": "bios", **extra}


def test_alices_vm_runs_as_alice_and_bob_may_only_look(users: Ctl) -> None:
    ctl = users
    alice = int(sh("id", "-u", "alice").stdout)

    # what alice may not use is refused up front, and nothing is made anywhere
    for extra, words in [({"image": "/etc/shadow", "linux": None, "initrds": None}, ("image", "permission denied")),
                         ({"binds": ["rw:/root:/mnt"]}, ("binds", "permission denied")),
                         ({"tpmState": "/etc/alice-tpm"}, ("tpmState", "not writable"))]:
        config = {k: v for k, v in alice_config(**extra).items() if v is not None}
        ok, out = call("alice", "Create", {"name": VM, "config": config})
        assert not ok and "InvalidConfig" in out and all(w in out for w in words), (extra, out)
    ok, out = call("alice", "Create", {"name": VM, "config": alice_config(network="tap")})
    assert not ok and "PermissionDenied" in out and "io.vmspawnd.privileged-features" in out, out
    assert not Path("/etc/alice-tpm").exists() and VM not in ctl("list", "--no-legend").stdout
    # (polkit was asked, over the daemon's first D-Bus connection: that loaded no OpenSSL into it)
    assert unwanted_libraries(int(unit_properties("vmspawnd.service", "MainPID")["MainPID"])) == []

    # alice's own VM: hers from QEMU to the files the guest writes
    config = alice_config(tpm="yes", tpmState=str(HOME / "tpm"), binds=[f"rw:{HOME / 'share'}:/mnt/share"],
                          kernelCommandLine=[*GUEST_WORDS, "test.tpm=1", "test.virtiofs=mnt0",
                                             "test.write=mnt0/from-guest", "test.action=acpi"])
    shares = find_virtiofsd().flavour is Flavour.RUST
    if not shares:  # QEMU's C virtiofsd (Debian 12) runs as root only: alice may share nothing through it
        ok, out = call("alice", "Create", {"name": VM, "config": config})
        assert not ok and "PermissionDenied" in out and "runs only as root" in out, out
        config = alice_config(tpm="yes", tpmState=str(HOME / "tpm"), kernelCommandLine=[
            *GUEST_WORDS, "test.tpm=1", "test.action=acpi"])
    ok, out = call("alice", "Create", {"name": VM, "config": config})
    assert ok and out["machine"]["owner"] == out["machine"]["runAs"] == alice, out
    ok, out = call("alice", "Start", {"name": VM})
    assert ok, out
    info = ctl.wait(lambda s: s["ready"] or s["state"] != "running", name=VM)
    assert info["ready"], info
    assert uid_of(info["pid"]) == alice
    tpm_unit = f"vmspawnd-{VM}-tpm.service"
    swtpm = unit_properties(tpm_unit, "MainPID", "User")
    assert swtpm["User"] == str(alice) and uid_of(int(swtpm["MainPID"])) == alice, swtpm
    runtime = Path(info["runtimeDirectory"])
    assert (runtime.stat().st_uid, stat.S_IMODE(runtime.stat().st_mode)) == (alice, 0o700)
    assert (HOME / "tpm").stat().st_uid == alice
    if shares:
        virtiofsd = unit_properties(f"vmspawnd-{VM}-virtiofsd-0.service", "MainPID")
        assert uid_of(int(virtiofsd["MainPID"])) == alice
        written = HOME / "share" / "from-guest"
        poll(written.exists, bool, 30)
        assert written.stat().st_uid == alice  # never root
    assert VM in sh("machinectl", "list", "--no-legend").stdout

    # bob may look, not touch; polkit is asked, and says no until a rule says yes
    ok, out = call("bob", "Describe", {"name": VM})
    assert ok and out["machine"]["owner"] == alice, out
    ok, out = call("bob", "List", {}, more=True)
    assert ok and f'"name":"{VM}"' in out.replace(" ", ""), out
    for method in ("Stop", "Kill", "Reboot", "Pause", "Resume", "Remove", "OpenConsole"):
        ok, out = call("bob", method, {"name": VM})
        assert not ok and "PermissionDenied" in out and "io.vmspawnd.manage-all" in out, (method, out)
    assert ctl.status(VM)["state"] == "running"

    sh("systemctl", "mask", "--runtime", "polkit.service")
    sh("systemctl", "stop", "polkit.service")
    RULE.write_text('polkit.addRule(function(action, subject) {\n'
                    '  if (action.id == "io.vmspawnd.manage-all" && subject.user == "bob") return polkit.Result.YES;\n'
                    '});\n')
    ok, out = call("bob", "Stop", {"name": VM})
    assert not ok and "PermissionDenied" in out, out  # no polkit: no, whatever the rules say
    sh("systemctl", "unmask", "--runtime", "polkit.service")
    sh("systemctl", "start", "polkit.service")
    ok, out = poll(lambda: call("bob", "Stop", {"name": VM}), lambda r: r[0] or "PermissionDenied" not in r[1], 60)
    assert ok and out["machine"]["state"] == "stopped", out  # granted by the rule
    assert ctl.status(VM)["exitStatus"] == 0 and not runtime.exists()

    # root may do everything with alice's machine; alice removes it
    ctl("start", VM)
    ctl("kill", VM)
    ok, out = call("alice", "Remove", {"name": VM})
    assert ok and VM not in ctl("list", "--no-legend").stdout, out


# bob connects, and a child he forks keeps the connection and sends what it reads on stdin
# ("Stop" with a bad timeout: refused before anything else if polkit says no, InvalidConfig if yes)
HANDED_ON = r"""
import json, os, signal, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
print(os.getpid(), flush=True)
if os.fork():
    signal.pause()  # the connecting process: runs until the test ends it
for _ in sys.stdin:
    call = {"method": "io.vmspawnd.Manager.Stop", "parameters": {"name": sys.argv[2], "timeout": -1}}
    conn.sendall(json.dumps(call).encode() + b"\0")
    reply = b""
    while not reply.endswith(b"\0"):
        reply += conn.recv(65536)
    print(reply[:-1].decode(), flush=True)
"""

# takes pid int(argv[1]) for a process of its own (root's), if nothing else takes it first
TAKE_PID = r"""
import os, subprocess, sys
subprocess.run(["mount", "--bind", "/proc/sys", "/proc/sys"], check=True)  # (private mounts: ours only)
subprocess.run(["mount", "-o", "remount,bind,rw", "/proc/sys"], check=True)
want = int(sys.argv[1])
for _ in range(100):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(want - 1))
    taker = subprocess.Popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if taker.pid == want:
        print(taker.pid, flush=True)
        os._exit(0)  # (the sleep runs on, reparented)
    taker.kill()
    taker.wait()
sys.exit("could not take the pid")
"""


def test_a_connection_handed_on_by_a_process_that_ended_is_not_judged_as_the_process_that_took_its_pid(
        users: Ctl) -> None:
    """polkit judges the process that connected; once it has ended, its pid may be another's, and
    what polkit would allow that other process is not what the connection may do."""
    ok, out = call("alice", "Create", {"name": VM, "config": alice_config()})
    assert ok, out
    client = subprocess.Popen(["setpriv", "--reuid=bob", "--regid=bob", "--init-groups", "python3", "-c",
                               HANDED_ON, SOCKET, VM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    connected = int(client.stdout.readline())
    assert connected == client.pid  # (setpriv execs python)

    def ask() -> str:
        client.stdin.write("Stop\n")
        client.stdin.flush()
        return client.stdout.readline()

    taker = None
    try:
        RULE.write_text('polkit.addRule(function(action, subject) {\n'
                        f'  if (action.id == "io.vmspawnd.manage-all" && subject.pid == {connected})\n'
                        '    return polkit.Result.YES;\n});\n')
        # while the connecting process runs, polkit's yes for it holds (once polkitd has read the rule)
        assert "InvalidConfig" in poll(ask, lambda r: "PermissionDenied" not in r, 60)

        client.terminate()  # the connecting process; its child keeps the connection
        client.wait(10)
        taker = sh("unshare", "--mount", "--propagation", "private", "python3", "-c", TAKE_PID,
                   str(connected)).stdout.strip()
        assert taker == str(connected)
        reply = ask()
        assert "PermissionDenied" in reply and "io.vmspawnd.manage-all" in reply, reply
        assert users.status(VM)["state"] == "stopped"
    finally:
        if taker:
            os.kill(int(taker), signal.SIGKILL)
        sh("pkill", "-KILL", "-u", "bob", "-f", "python3 -c", check=False)


# polkit's yes for bob, after a wait (a sleep the test ends: polkitd's sandbox lets its rules write nowhere)
SLOW_YES = """polkit.addRule(function(action, subject) {
  if (action.id == "io.vmspawnd.manage-all" && subject.user == "bob") {
    try { polkit.spawn(["/bin/sleep", "8"]); } catch (e) {}
    return polkit.Result.YES;
  }
});
"""


def test_a_start_polkit_allows_after_a_reload_gave_the_machine_to_root_is_refused(users: Ctl) -> None:
    """bob may manage alice's machine, and asks to start it; while polkitd is deciding, root's edit of
    its definition (it is to run as root now) is read by a reload.  polkit's yes was for a machine
    that runs as alice: the start is refused (try again), and no QEMU runs as root."""
    ok, out = call("alice", "Create", {"name": VM, "config": alice_config()})
    assert ok, out
    RULE.write_text(SLOW_YES)
    ok, out = poll(lambda: call("bob", "Stop", {"name": VM, "timeout": -1}), lambda r: "PermissionDenied" not in r[1],
                   90)
    assert not ok and "InvalidConfig" in out, out  # polkitd has read the rule: bob passes, after its wait

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = pool.submit(call, "bob", "Start", {"name": VM})
        asking = poll(lambda: sh("pgrep", "-u", "polkitd", "-x", "sleep", check=False).stdout.split(), bool, 30)
        definition = Path(f"/var/lib/vmspawnd/machines/{VM}.json")
        definition.write_text(json.dumps({**json.loads(definition.read_text()), "runAs": 0}))
        sh("systemctl", "reload", "vmspawnd.service")
        poll(lambda: users.status(VM)["runAs"], lambda uid: uid == 0, 30)
        assert sh("kill", *asking, check=False).returncode == 0  # polkitd was still deciding: it says yes now
        ok, out = start.result(timeout=60)
    assert not ok and "WrongState" in out and "the user it runs as changed" in out, out
    info = users.status(VM)
    assert (info["state"], info["runAs"]) == ("stopped", 0), info
    assert VM not in sh("machinectl", "list", "--no-legend").stdout
