# SPDX-License-Identifier: LGPL-2.1-or-later
"""A VM defined by a user who is not root runs as that user (real daemon, real QEMU, swtpm and
virtiofsd): ``nobody`` plays the owner, ``daemon`` (uid 1) another user.  The systemd tier does
the same with real accounts, transient units and polkit (tests/systemd/test_owners.py)."""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, call_as, public_daemon
from tests.polling import poll
from vmspawnd.proc import processes_using
from vmspawnd.services.virtiofsd import Flavour, find_virtiofsd
from vmspawnd.testing.guest import GUEST_WORDS

OWNER, OTHER = 65534, 1  # nobody, daemon
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (to call as other users)")


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            real, effective, saved, fs = (int(x) for x in line.split()[1:5])
            assert real == effective == saved == fs, line
            return real
    raise AssertionError(f"no Uid: line for {pid}")


@pytest.fixture
def users_daemon() -> Iterator[Daemon]:
    """A daemon with its default 0666 socket."""
    with public_daemon() as d:
        yield d


@pytest.fixture
def home(public_dir: Path, guest) -> Path:
    """The owner's home: the guest's kernel and initrd, a shared folder, all the owner's, 0700."""
    home = public_dir / "home"
    (home / "share").mkdir(parents=True)
    shutil.copy(guest.kernel, home / "vmlinuz")
    shutil.copy(guest.initrd, home / "initrd")
    for path in (home, home / "share", home / "vmlinuz", home / "initrd"):
        os.chown(path, OWNER, OWNER)
    home.chmod(0o700)
    return home


def call(uid: int, daemon: Daemon, method: str, **parameters: object) -> dict:
    return call_as(uid, daemon.socket, f"io.vmspawnd.Manager.{method}", parameters)


def test_a_users_vm_runs_as_that_user_and_only_they_control_it(users_daemon: Daemon, home: Path) -> None:
    rust_virtiofsd = find_virtiofsd().flavour is Flavour.RUST
    config = {"linux": str(home / "vmlinuz"), "initrds": [str(home / "initrd")], "ram": "256M",
              "firmware": "bios", "tpm": "yes", "tpmState": str(home / "tpm"), "console": "read-only",
              "binds": [f"rw:{home / 'share'}:/mnt/share"],
              "kernelCommandLine": [*GUEST_WORDS, "test.tpm=1", "test.virtiofs=mnt0",
                                    "test.write=mnt0/from-guest", "test.action=acpi"]}
    reply = call(OWNER, users_daemon, "Create", name="mine", config=config)
    if not rust_virtiofsd:  # QEMU's C virtiofsd runs only as root: a user's share needs the Rust one
        assert reply.get("error") == "io.vmspawnd.Manager.PermissionDenied", reply
        assert reply["parameters"]["action"] == "io.vmspawnd.privileged-features"
        assert "C virtiofsd" in reply["parameters"]["reason"], reply
        config["binds"] = []
        reply = call(OWNER, users_daemon, "Create", name="mine", config=config)
    assert "error" not in reply, reply
    with concurrent.futures.ThreadPoolExecutor() as pool:  # another user's commands while the start is in flight
        start = pool.submit(call, OWNER, users_daemon, "Start", name="mine")
        denied = [pool.submit(call, OTHER, users_daemon, method, name="mine") for method in ("Stop", "Kill")]
        reply = start.result()
        assert "error" not in reply, reply
        for future in denied:
            assert future.result().get("error") == "io.vmspawnd.Manager.PermissionDenied", future.result()
    info = users_daemon.wait_for("mine", lambda d: d["ready"] or d["state"] != "running", timeout=180)
    assert info["ready"], info

    # QEMU and every helper run as the owner, in directories that are the owner's, with nothing of the
    # daemon's environment but its PATH and locale
    assert uid_of(info["pid"]) == OWNER
    helpers = [pid for pid in processes_using(Path(info["runtimeDirectory"]))  # (the daemon holds the notify socket)
               if pid not in (info["pid"], users_daemon.proc.pid)]
    assert len(helpers) == 1 + rust_virtiofsd and {uid_of(pid) for pid in helpers} == {OWNER}, helpers
    for pid in (info["pid"], *helpers):
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        assert (env["USER"], env["HOME"]) == ("nobody", pwd.getpwuid(OWNER).pw_dir), env
        assert {n for n in env if not n.startswith("LC_")} <= {"PATH", "LANG", "LANGUAGE", "TZ", "HOME", "USER",
                                                              "LOGNAME"}, env
    runtime = Path(info["runtimeDirectory"])
    assert (runtime.stat().st_uid, stat.S_IMODE(runtime.stat().st_mode)) == (OWNER, 0o700)
    assert {p.stat().st_uid for p in runtime.iterdir()} == {OWNER}, [(p, p.stat().st_uid) for p in runtime.iterdir()]
    records = runtime.with_name("mine.run")  # what the daemon trusts stays root's
    assert (records.stat().st_uid, stat.S_IMODE(records.stat().st_mode)) == (0, 0o700)
    assert (home / "tpm").stat().st_uid == OWNER and {p.stat().st_uid for p in (home / "tpm").iterdir()} == {OWNER}
    if rust_virtiofsd:
        written = home / "share" / "from-guest"
        poll(written.exists, bool, timeout=30)
        assert written.stat().st_uid == OWNER  # the guest's write through the share is the owner's file

    # another user may look but not touch; the owner may
    assert call(OTHER, users_daemon, "Describe", name="mine")["parameters"]["machine"]["owner"] == OWNER
    for method in ("Stop", "Kill", "Reboot", "Pause", "Resume", "OpenConsole", "Remove"):
        reply = call(OTHER, users_daemon, method, name="mine")
        assert reply.get("error") == "io.vmspawnd.Manager.PermissionDenied", (method, reply)
        assert reply["parameters"]["action"] == "io.vmspawnd.manage-all"
    assert users_daemon.status("mine")["state"] == "running"

    # a restarted daemon adopts it as its user's again (QMP, notify channel and console as the owner)
    users_daemon.stop_daemon()
    users_daemon.start()
    adopted = users_daemon.wait_for("mine", lambda d: d["state"] == "running")
    assert (adopted["pid"], adopted["ready"]) == (info["pid"], True), adopted
    assert {p.stat().st_uid for p in runtime.iterdir()} == {OWNER}
    assert "error" not in call(OWNER, users_daemon, "OpenConsole", name="mine")  # relayed, as the owner
    reply = call(OWNER, users_daemon, "Pause", name="mine")  # through QMP, connected as the owner
    assert "error" not in reply and reply["parameters"]["machine"]["paused"] is True, reply
    reply = call(OWNER, users_daemon, "Stop", name="mine")  # (resumed first, to see the power button)
    assert "error" not in reply and reply["parameters"]["machine"]["state"] == "stopped", reply
    assert users_daemon.status("mine")["exitStatus"] == 0
    assert not runtime.exists() and not records.exists()
    assert (home / "tpm").is_dir()  # the TPM's state stays for the next run
    assert "error" not in call(OWNER, users_daemon, "Remove", name="mine")


def test_a_users_start_is_refused_what_the_user_may_not_use(users_daemon: Daemon, home: Path) -> None:
    config = {"linux": str(home / "vmlinuz"), "initrds": [str(home / "initrd")], "firmware": "bios"}
    assert "error" not in call(OWNER, users_daemon, "Create", name="mine", config=config)
    home.chmod(0o755)
    (home / "vmlinuz").chmod(0o600)
    os.chown(home / "vmlinuz", 0, 0)  # the kernel is root's now: the next start, as its owner, may not read it
    reply = call(OWNER, users_daemon, "Start", name="mine")
    assert reply.get("error") == "io.vmspawnd.Manager.StartFailed", reply
    assert f"linux={home / 'vmlinuz'}: permission denied" in reply["parameters"]["reason"], reply
    info = users_daemon.status("mine")
    assert info["state"] == "failed" and info["pid"] is None
    assert not any(users_daemon.runtime.rglob("mine"))  # nothing started, nothing left


def test_a_users_start_execs_qemu_through_a_launcher_and_one_is_kept_ready_from_then_on(
        users_daemon: Daemon, home: Path) -> None:
    """QEMU run as another user is switched to that user before its first instruction, by an exec-late
    launcher.  Without systemd (here) the daemon spawns a root VM's QEMU itself, so it keeps no
    launcher ahead until a start needed one; from then on one waits, and the next start takes it."""
    assert users_daemon.spare_launchers() == []
    config = {"linux": str(home / "vmlinuz"), "initrds": [str(home / "initrd")], "ram": "256M",
              "firmware": "bios", "tpm": "no", "console": "read-only",
              "kernelCommandLine": [*GUEST_WORDS, "test.action=hang"]}
    for name in ("first", "second"):
        assert "error" not in call(OWNER, users_daemon, "Create", name=name, config=config)
    assert "error" not in call(OWNER, users_daemon, "Start", name="first")
    spare = poll(users_daemon.spare_launchers, lambda found: len(found) == 1, 10)
    assert "error" not in call(OWNER, users_daemon, "Start", name="second")
    pid = users_daemon.status("second")["pid"]
    assert pid == spare[0] and uid_of(pid) == OWNER  # the launcher that was waiting became QEMU, as the owner
    fresh = poll(users_daemon.spare_launchers, lambda found: len(found) == 1, 10)
    assert fresh != spare
    for name in ("first", "second"):
        assert users_daemon.wait_for(name, lambda d: d["ready"] or d["state"] != "running")["ready"]
        assert "error" not in call(OWNER, users_daemon, "Kill", name=name)
    users_daemon.stop_daemon()
    poll(lambda: Path(f"/proc/{fresh[0]}").exists(), lambda alive: not alive, 10)  # the spare ends with the daemon


def test_a_users_transient_tpm_state_made_ahead_is_written_as_that_user(users_daemon: Daemon, home: Path) -> None:
    """The daemon keeps a manufactured TPM state ready (root's) from the first start that needed one on;
    a root VM's start moves it into place, a user's start copies it, as the user."""
    config = {"linux": str(home / "vmlinuz"), "initrds": [str(home / "initrd")], "ram": "256M",
              "firmware": "bios", "tpm": "yes", "tpmState": "off", "console": "read-only",
              "kernelCommandLine": [*GUEST_WORDS, "test.tpm=1", "test.action=hang"]}
    assert "error" not in call(OWNER, users_daemon, "Create", name="mine", config=config)
    spare = users_daemon.runtime / "tpm-spares" / "ready"
    made_ahead = None
    for run in range(2):
        assert "error" not in call(OWNER, users_daemon, "Start", name="mine")
        info = users_daemon.wait_for("mine", lambda d: d["ready"] or d["state"] != "running", timeout=180)
        assert info["ready"], info  # the guest's TPM works (test.tpm=1)
        state = Path(info["runtimeDirectory"]) / "tpm"
        assert {p.stat().st_uid for p in (state, *state.iterdir())} == {OWNER}, list(state.iterdir())
        if run == 1:  # this start took the state made ahead (the next one is made a while after it)
            assert not spare.exists() or spare.stat().st_ino != made_ahead
        assert "error" not in call(OWNER, users_daemon, "Kill", name="mine")
        if run == 0:
            made_ahead = poll(lambda: spare.is_dir() and spare.stat().st_ino, bool, 60)
            assert spare.stat().st_uid == 0
