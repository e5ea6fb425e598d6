# SPDX-License-Identifier: LGPL-2.1-or-later
"""vsock for real, through vhost-device-vsock (this host has no /dev/vhost-vsock): the guest's
notifications, SSH with the key --pass-ssh-key made, and its journal on the host.

Everything here is real: QEMU, the vhost-user backend, the guest kernel's virtio-vsock driver, a
static AF_VSOCK client in the guest (``vsock-io``, as systemd's sd_notify would connect), the
host's sshd binary inside the guest, ssh, systemd-socket-activate and systemd-journal-remote.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    CTL,
    Daemon,
    VmRun,
    assert_clean,
    call_as,
    process_gone,
    processes_mentioning,
    processes_using,
    public_daemon,
)
from tests.polling import poll
from tests.sshd import guest_sshd_initrd
from tests.vm.clients import TYPED, hammer, settle
from vmspawnd.proc import process_cmdline
from vmspawnd.qemu.vsock import BACKEND_ENV
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = pytest.mark.vm


@pytest.fixture
def vsock_daemon(vsock_backend: Path, tmp_path: Path):
    """A daemon that gives its guests vsock through vhost-device-vsock."""
    d = Daemon(tmp_path / "daemon")
    d.base.mkdir()
    d.start()
    yield d
    d.clean_up()


@pytest.fixture(scope="session")
def sshd_initrd(tmp_path_factory) -> Path:
    """The extra initrd that puts sshd into the test guest (``test.sshd=1``)."""
    return guest_sshd_initrd(tmp_path_factory.mktemp("guest-sshd"))


def qemu_argv(pid: int) -> str:
    return process_cmdline(pid)


def create(daemon: Daemon, guest, name: str, *args: str) -> None:
    p = daemon.ctl("create", name, f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                   "--console=read-only", "--firmware=bios", "--tpm=no", *GUEST_WORDS, *args)
    assert p.returncode == 0, p.stderr


def backend_pids(where: Path) -> list[int]:
    return [pid for pid in processes_mentioning(str(where)) if "vhost-device-vsock" in process_cmdline(pid)]


def test_vmspawn_guest_reports_ready_status_and_exit_status_over_vsock(vmspawn, vsock_backend):
    run: VmRun = vmspawn("test.notify=1", "test.status=over_vsock", "test.exit=5", "--tpm=no", name="vsready",
                         env={"SYSTEMD_LOG_LEVEL": "debug"})
    poll(lambda: backend_pids(run.runtime_dir), bool, 60)
    assert run.wait() == 5, run.text  # EXIT_STATUS=5 came over vsock
    lines = run.notify.lines()
    assert "READY=1" in lines and "STATUS=VM running: over vsock" in lines
    assert "notify over vsock to host port" in run.text  # the guest used the credential, not a port
    assert "notify port io.systemd.notify" not in run.text
    errors = run.errors.decode(errors="replace")
    assert "vsock (machine=vsready backend=vhost-device-vsock" in errors
    (qemu,) = [line for line in errors.splitlines() if "spawning qemu" in line]
    assert "vhost-user-vsock-pci" in qemu and "memory-backend-memfd" in qemu and "io.systemd.notify" not in qemu
    assert_clean(run)  # the backend ended with the VM, its sockets are gone


def test_a_credential_vmspawn_sets_itself_is_refused_by_name(vmspawn, vsock_backend):
    """As systemd-vmspawn refuses a duplicate credential: the guest's notify socket stays ours."""
    run = vmspawn("test.notify=1", "--set-credential=vmm.notify_socket:vsock-stream:2:1", name="dupcred")
    assert run.wait() == 1
    assert "invalid credential=vmm.notify_socket: vmspawn passes the guest a credential of this name itself" \
        in run.text and "Traceback" not in run.text
    assert "TESTGUEST" not in run.text  # QEMU never started
    assert_clean(run)


def test_vsock_yes_without_any_backend_fails_before_anything_starts(vmspawn, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "")  # not installed, as far as vmspawn can tell
    run = vmspawn("test.notify=1", "--vsock=yes", name="novsock")
    assert run.wait() == 1, run.text
    errors = run.errors.decode(errors="replace")
    assert "invalid vsock=yes: /dev/vhost-vsock: No such file or directory" in errors, errors
    assert "vhost-device-vsock is not installed" in errors and "Traceback" not in errors
    assert "TESTGUEST" not in run.text  # QEMU never started
    assert_clean(run)


def test_the_daemons_vm_notifies_over_vsock_and_is_readopted_with_it(vsock_daemon, guest):
    create(vsock_daemon, guest, "vsd", "test.action=acpi", "test.exit=9", "test.status=daemon_vsock")
    assert vsock_daemon.ctl("start", "vsd").returncode == 0
    info = vsock_daemon.wait_for("vsd", lambda s: s["ready"])
    assert info["status"] == "daemon vsock"
    runtime = Path(info["runtimeDirectory"])
    assert info["vsockBackend"] == "vhost-device-vsock"
    assert info["sshAddress"] == f"vsock-mux/{runtime / 'vsock'}"
    assert "vhost-user-vsock-pci" in qemu_argv(info["pid"]) and "io.systemd.notify" not in qemu_argv(info["pid"])
    shown = vsock_daemon.ctl("status", "vsd").stdout
    assert f"Vsock: vhost-device-vsock, ssh: vsock-mux/{runtime}/vsock" in shown
    (backend,) = backend_pids(runtime)
    assert any("vhost-device-vsock" in unit for unit in info["units"])

    vsock_daemon.stop_daemon(signal.SIGKILL)
    assert not process_gone(info["pid"]) and not process_gone(backend)  # both outlive the daemon
    vsock_daemon.start()
    again = vsock_daemon.status("vsd")
    assert (again["state"], again["pid"], again["ready"]) == ("running", info["pid"], True)
    assert again["vsockBackend"] == "vhost-device-vsock" and again["sshAddress"] == info["sshAddress"]
    # the restarted daemon listens again where the guest's last words arrive: its EXIT_STATUS
    assert vsock_daemon.ctl("stop", "vsd", "--timeout=60").returncode == 0
    assert vsock_daemon.status("vsd")["exitStatus"] == 9
    poll(lambda: process_gone(backend), bool, 10)


def test_ssh_into_the_guest_over_vsock_with_the_key_pass_ssh_key_made(vsock_daemon, guest, sshd_initrd):
    create(vsock_daemon, guest, "sshvm", f"--initrd={sshd_initrd}", "test.sshd=1", "test.action=acpi")
    assert vsock_daemon.ctl("start", "sshvm").returncode == 0
    info = vsock_daemon.wait_for("sshvm", lambda s: s["ready"])
    key = Path(info["sshKey"])
    assert key.is_file() and key.parent == Path(info["runtimeDirectory"])
    ssh = vsock_daemon.ctl("ssh", "sshvm", "-o", "BatchMode=yes", "--", "echo", "in-guest:", "$(uname", "-r)")
    assert ssh.returncode == 0, ssh.stderr
    assert ssh.stdout.strip() == f"in-guest: {guest.kernel_version}"
    # the same through a plain ssh with the documented ProxyCommand
    proxy = " ".join([*CTL, "vsock-proxy", info["sshAddress"], "%p"])
    plain = subprocess.run(["ssh", "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-i", str(key),
                            f"root@{info['sshAddress']}", "cat /proc/cmdline"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert plain.returncode == 0 and "test.sshd=1" in plain.stdout, plain.stderr
    # a key that is not the VM's is refused
    other = Path(info["runtimeDirectory"]).parent.parent / "other-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    refused = subprocess.run(["ssh", "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
                              "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                              "IdentitiesOnly=yes", "-i", str(other), f"root@{info['sshAddress']}", "true"],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    # a port nothing in the guest listens on: a clear error, no hang
    closed = subprocess.run([*CTL, "vsock-proxy", info["sshAddress"], "2222"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert closed.returncode == 1 and f"cannot reach port 2222 of {info['sshAddress']}" in closed.stderr
    assert vsock_daemon.ctl("stop", "sshvm", "--timeout=60").returncode == 0
    assert not key.exists()  # the key went with the run


def test_ssh_to_a_machine_without_vsock_says_why(daemon, guest):
    create(daemon, guest, "novs", "test.action=hang")  # (the suite's daemons have no backend)
    assert daemon.ctl("start", "novs").returncode == 0
    daemon.wait_for("novs", lambda s: s["ready"])
    p = daemon.ctl("ssh", "novs", "true")
    assert p.returncode == 1 and "novs has no vsock" in p.stderr
    assert daemon.status("novs")["vsockBackend"] is None


def test_the_guests_journal_arrives_on_the_host_with_forward_journal(vmspawn, vsock_backend, tmp_path):
    output = tmp_path / "journal" / "guest.journal"
    run = vmspawn("test.notify=1", f"--forward-journal={output}", "test.journal=first_entry",
                  "test.journal=second_entry", "--tpm=no", name="jrnl")
    assert run.wait() == 0, run.text
    assert "journal entry sent: first entry" in run.text
    shown = subprocess.run(["journalctl", f"--file={output}", "-o", "json", "--no-pager"], capture_output=True,
                           text=True, check=True).stdout
    entries = [json.loads(line) for line in shown.splitlines()]
    messages = [(e["MESSAGE"], e.get("SYSLOG_IDENTIFIER"), e.get("_HOSTNAME")) for e in entries]
    assert messages == [("first entry", "testguest", "testguest"), ("second entry", "testguest", "testguest")]
    assert_clean(run)


def test_a_users_vm_runs_its_vsock_backend_as_that_user(public_dir, guest, vsock_backend):
    nobody = 65534
    for source, name in ((guest.kernel, "vmlinuz"), (guest.initrd, "initrd")):
        shutil.copy(source, public_dir / name)
        os.chown(public_dir / name, nobody, nobody)
    config = {"linux": str(public_dir / "vmlinuz"), "initrds": [str(public_dir / "initrd")], "ram": "256M",
              "firmware": "bios", "tpm": "no", "console": "read-only",
              "kernelCommandLine": [*GUEST_WORDS, "test.status=users_vsock", "test.action=hang"]}
    with public_daemon() as d:
        reply = call_as(nobody, d.socket, "io.vmspawnd.Manager.Create", {"name": "usersvs", "config": config})
        assert "error" not in reply, reply
        assert "error" not in call_as(nobody, d.socket, "io.vmspawnd.Manager.Start", {"name": "usersvs"})
        info = d.wait_for("usersvs", lambda s: s["ready"])
        assert info["status"] == "users vsock" and info["vsockBackend"] == "vhost-device-vsock"
        runtime = Path(info["runtimeDirectory"])
        (backend,) = backend_pids(runtime)
        assert os.stat(f"/proc/{backend}").st_uid == nobody
        assert (runtime / "vsock").stat().st_uid == nobody
        assert d.ctl("kill", "usersvs").returncode == 0


def test_a_vm_whose_vsock_backend_dies_fails_with_the_reason(vsock_daemon, guest):
    create(vsock_daemon, guest, "lostvs", "test.action=hang")
    assert vsock_daemon.ctl("start", "lostvs").returncode == 0
    runtime = Path(vsock_daemon.wait_for("lostvs", lambda s: s["ready"])["runtimeDirectory"])
    (backend,) = backend_pids(runtime)
    os.kill(backend, signal.SIGKILL)
    st = vsock_daemon.wait_for("lostvs", lambda s: s["state"] != "running", 30)
    assert st["state"] == "failed" and "vhost-device-vsock" in st["failure"], st
    poll(lambda: processes_using(runtime), lambda pids: pids == [], 10)


def test_the_daemon_refuses_vsock_yes_without_a_backend_before_anything_starts(daemon, guest):
    create(daemon, guest, "mustvs", "--vsock=yes")  # (the suite's daemons have no backend)
    p = daemon.ctl("start", "mustvs")
    assert p.returncode == 1 and "vsock" in p.stderr and "vhost-device-vsock is not installed" in p.stderr, p.stderr
    st = daemon.status("mustvs")
    assert st["state"] in ("stopped", "failed") and st["pid"] is None
    machine_dir = daemon.runtime / "machines" / "mustvs"
    assert processes_using(machine_dir) == [] and not machine_dir.exists()


def test_concurrent_clients_starting_and_killing_vsock_vms_leave_no_backend_behind(vsock_daemon, guest):
    """8 clients × Start/Stop/Kill/Describe on 2 vsock VMs for 15 s: every call answered with success or
    a typed error; afterwards no vhost-device-vsock and no socket of theirs is left, and a VM starts
    cleanly and reports READY over vsock again."""
    names = ["vc0", "vc1"]
    for name, action in zip(names, ("test.action=acpi", "test.action=poweroff"), strict=True):
        create(vsock_daemon, guest, name, action)

    def next_call(rnd: random.Random, seed: int) -> tuple[str, dict]:
        op = rnd.choices(["Start", "Stop", "Kill", "Describe"], [4, 2, 2, 1])[0]
        return op, {"name": rnd.choice(names), **({"timeout": rnd.choice([0.0, 1.0])} if op == "Stop" else {})}

    outcomes = hammer(vsock_daemon, clients=8, seconds=15, next_call=next_call)
    assert {result for _, result in outcomes} <= TYPED | {"ok"}, outcomes
    assert outcomes[("Start", "ok")] >= 2, outcomes  # VMs really started
    settle(vsock_daemon, names)
    machines = vsock_daemon.runtime / "machines"
    poll(lambda: backend_pids(machines), lambda pids: pids == [], 15)
    assert not list(machines.glob("*/vsock*")), list(machines.glob("*/vsock*"))
    assert vsock_daemon.ctl("start", "vc0").returncode == 0
    info = vsock_daemon.wait_for("vc0", lambda s: s["ready"])
    assert info["vsockBackend"] == "vhost-device-vsock" and len(backend_pids(machines)) == 1
