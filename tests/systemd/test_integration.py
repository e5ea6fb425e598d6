# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd as a systemd citizen, against the real systemd 257 + machined of the container:
machined registration over varlink, QEMU alone in its scope, slice/properties, machinectl."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.polling import poll
from tests.systemd.helpers import (
    CONTROL_SOCKETS,
    GUEST_DIR,
    NAME,
    WITH_GUEST,
    Ctl,
    Spawned,
    alive,
    machined_record,
    qemu_cgroup,
    sh,
    systemd_version,
    unit_properties,
    wait_inactive,
)
from vmspawnd.errors import ConfigError
from vmspawnd.services import runner as runner_module
from vmspawnd.services.runner import ServiceSpec, UnitRunner
from vmspawnd.services.virtiofsd import find_virtiofsd
from vmspawnd.systemd import machined
from vmspawnd.systemd.machined import MACHINED_VARLINK_SINCE
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = WITH_GUEST

SCOPE = f"machine-{NAME}.scope"


def machined_entry(name: str, timeout: float = 10) -> dict:
    """machined's record of ``name`` (registration follows the scope by a moment: wait for it; on systemd
    257 machined, and so its socket, is started by the first registration)."""

    return poll(lambda: machined_record(name), lambda r: r is not None, timeout, interval=0.1)


def cgroup_procs(unit_cgroup: str) -> list[int]:
    return [int(p) for p in Path(f"/sys/fs/cgroup{unit_cgroup}/cgroup.procs").read_text().split()]


def test_machined_sees_the_vm_with_our_fields(vm: Ctl) -> None:
    st = vm.status()
    entry = machined_entry(NAME)
    assert entry["name"] == NAME and entry["class"] == "vm" and entry["service"] == "vmspawnd"
    assert entry["leader"]["pid"] == st["pid"]
    assert entry["unit"] == SCOPE
    listing = sh("machinectl", "list", "--no-legend").stdout
    assert any(line.split()[:3] == [NAME, "vm", "vmspawnd"] for line in listing.splitlines()), listing
    assert SCOPE in sh("machinectl", "status", NAME).stdout


def test_only_qemu_is_in_the_scope_and_the_daemon_is_not(vm: Ctl) -> None:
    pid = vm.status()["pid"]
    cgroup = qemu_cgroup(pid)
    assert cgroup == f"/machine.slice/{SCOPE}", cgroup
    assert cgroup_procs(cgroup) == [pid]  # nothing else: no daemon, no helper
    daemon_pid = int(unit_properties("vmspawnd.service", "MainPID")["MainPID"])
    assert qemu_cgroup(daemon_pid).endswith("/vmspawnd.service")
    tpm = f"vmspawnd-{NAME}-tpm.service"
    assert unit_properties(tpm, "ActiveState")["ActiveState"] == "active"
    assert SCOPE in unit_properties(tpm, "BindsTo")["BindsTo"].split()


@pytest.mark.parametrize("verb", ["terminate", "kill"])
def test_machinectl_terminate_and_kill_are_reported_as_what_they_were(vm: Ctl, verb: str) -> None:
    pid = vm.status()["pid"]
    sh("machinectl", verb, NAME)
    st = vm.wait(lambda s: s["state"] != "running", timeout=30)
    # QEMU shuts down cleanly on SIGTERM, but that was no power-off of the guest (README: killed → 1);
    # from systemd 261 on, terminate goes through the VM's control socket instead of a signal
    through_socket = verb == "terminate" and systemd_version() >= CONTROL_SOCKETS
    why = "terminated through its control socket" if through_socket else "signal from outside"
    assert st["state"] == "failed" and st["exitStatus"] == 1 and why in st["failure"], st
    assert not alive(pid)
    poll(lambda: machined_record(NAME), lambda record: record is None, 15)  # and machined forgot it


def vmspawn(*args: str, tpm: str = "--tpm=no") -> Spawned:
    return Spawned([str(Path(sys.executable).parent / "vmspawn"), f"--linux={GUEST_DIR / 'vmlinuz'}",
                    f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M", "--console=read-only", "--firmware=bios",
                    tpm, *args, *GUEST_WORDS])


def test_cli_puts_qemu_in_a_scope_with_slice_and_properties() -> None:
    proc = vmspawn("-M", "cliscope", "--slice=vmtest", "--property=MemoryMax=300M", "--property=TasksMax=77",
                   "--property=CPUWeight=50", "--property=RuntimeMaxSec=1h", "--property=ManagedOOMSwap=kill",
                   "--property=KillSignal=SIGINT", "--pass-ssh-key=yes", "test.action=hang")
    scope = "machine-cliscope.scope"
    try:
        props = poll(lambda: unit_properties(scope, "ActiveState", "Slice", "MemoryMax", "TasksMax", "CPUWeight",
                                             "RuntimeMaxUSec", "ManagedOOMSwap", "KillSignal"),
                     lambda p: p.get("ActiveState") == "active")
        assert props == {"ActiveState": "active", "Slice": "vmtest.slice", "MemoryMax": str(300 << 20),
                         "TasksMax": "77", "CPUWeight": "50", "RuntimeMaxUSec": "1h", "ManagedOOMSwap": "kill",
                         "KillSignal": "2"}, props
        # the scope exists before QEMU does (its launcher is moved in first, then execs QEMU);
        # registration with machined follows QEMU's start, so once it is there QEMU runs
        entry = machined_entry("cliscope", timeout=60)
        assert entry["unit"] == scope
        if systemd_version() >= MACHINED_VARLINK_SINCE:  # (D-Bus's RegisterMachine takes no key)
            key = Path(entry["sshPrivateKeyPath"])  # --pass-ssh-key: machined knows the key to the guest
            assert key.name == "ssh-ed25519" and key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        procs = cgroup_procs(f"/vmtest.slice/{scope}")
        assert procs == [entry["leader"]["pid"]] and proc.proc.pid not in procs  # QEMU alone; vmspawn outside
        assert Path(f"/proc/{procs[0]}/comm").read_text().startswith("qemu")
    finally:
        proc.stop()
    wait_inactive(scope)


def test_register_yes_without_machined_fails_clearly() -> None:
    sh("systemctl", "mask", "--runtime", "systemd-machined.service")  # vmspawn would start it otherwise
    sh("systemctl", "stop", "systemd-machined")
    try:
        proc = vmspawn("-M", "noreg", "--register=yes")
        out = proc.wait()
        assert proc.returncode == 1, out
        assert "cannot register with systemd-machined" in out
        wait_inactive("machine-noreg.scope")
        auto = vmspawn("-M", "autoreg", "--register=auto")
        out = auto.wait()
        assert auto.returncode == 0, out  # auto tolerates a missing machined
    finally:
        sh("systemctl", "unmask", "--runtime", "systemd-machined.service")
        sh("systemctl", "start", "systemd-machined")


def test_bad_property_is_refused_before_anything_starts() -> None:
    proc = vmspawn("-M", "badprop", "--property=NoSuchThing=1")
    out = proc.wait(30)
    assert proc.returncode == 1 and "NoSuchThing" in out
    assert unit_properties("machine-badprop.scope", "LoadState").get("LoadState") in ("not-found", "")


def test_directory_vm_shares_through_virtiofsd_units_and_registers_its_root(tmp_path: Path) -> None:
    tree, ro = tmp_path / "tree", tmp_path / "ro"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("from-the-tree\n")
    ro.mkdir()
    (ro / "keep.txt").write_text("keep\n")
    proc = vmspawn("-M", "dirvm", f"--directory={tree}", f"--bind-ro={ro}:/srv/ro", "test.virtiofs=root",
                   "test.virtiofs=mnt0", "test.cat=root/etc/hostname", "test.write=root/etc/written",
                   "test.forcewrite=mnt0/evil", "test.action=hang")
    try:
        entry = machined_entry("dirvm", timeout=60)
        assert entry["rootDirectory"] == str(tree)
        units = sh("systemctl", "list-units", "--plain", "--no-legend", "vmspawnd-dirvm-*").stdout
        assert "vmspawnd-dirvm-virtiofsd-root.service" in units and "vmspawnd-dirvm-virtiofsd-0.service" in units
        proc.wait_for("forcewrite mnt0/evil")  # the guest's last share step: the write came before it
        # The guest creates the file before it writes the line: wait for the whole line, not the name.
        written = tree / "etc" / "written"
        poll(lambda: written.read_text() if written.exists() else "", lambda text: text == "written-by-guest\n")
    finally:
        out = proc.stop()
    assert "cat root/etc/hostname: from-the-tree" in out, out
    assert "forcewrite mnt0/evil FAILED" in out, out  # read-only enforced by (the Rust) virtiofsd
    assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]
    poll(lambda: sh("systemctl", "list-units", "--plain", "--no-legend", "vmspawnd-dirvm-*").stdout,
         lambda units: "vmspawnd-dirvm" not in units, 30)


def test_keep_unit_keeps_qemu_in_the_callers_unit() -> None:
    own = qemu_cgroup(os.getpid())
    proc = vmspawn("-M", "kept", "--keep-unit", "test.action=hang")
    try:
        pid = machined_entry("kept", timeout=60)["leader"]["pid"]
        assert qemu_cgroup(pid) == own
        assert unit_properties("machine-kept.scope", "LoadState").get("LoadState") in ("not-found", "")
    finally:
        proc.stop()


def test_a_dying_helper_unit_stops_the_vm() -> None:
    proc = vmspawn("-M", "tpmdies", "--tpm-state=off", "test.action=hang", tpm="--tpm=yes")
    try:
        pid = machined_entry("tpmdies", timeout=60)["leader"]["pid"]
        unit = "vmspawnd-tpmdies-tpm.service"
        assert unit_properties(unit, "ActiveState")["ActiveState"] == "active"
        sh("systemctl", "kill", "--signal=SIGKILL", unit)
        out = proc.wait(60)
    finally:
        proc.stop()
    assert proc.returncode == 1, out
    assert "exited unexpectedly" in out
    assert not alive(pid)
    wait_inactive("machine-tpmdies.scope")


def test_a_tpm_state_the_swtpm_unit_cannot_load_is_named_with_its_words(tmp_path) -> None:
    """swtpm runs as a unit (PID 1's child): what it logs reaches vmspawn through its log file."""
    state = tmp_path / "tpm"
    state.mkdir(mode=0o700)
    damaged = os.urandom(3000)
    (state / "tpm2-00.permall").write_bytes(damaged)
    proc = vmspawn("-M", "tpmbad", f"--tpm-state={state}", tpm="--tpm=yes")
    try:
        out = proc.wait(60)
    finally:
        proc.stop()
    assert proc.returncode == 1, out
    assert f"tpm-state={state}: swtpm cannot use the TPM state in it" in out and "Could not initialize the TPM" in out
    assert (state / "tpm2-00.permall").read_bytes() == damaged
    wait_inactive("machine-tpmbad.scope")


async def test_a_machine_unregistered_can_be_registered_again_at_once() -> None:
    """machined replies to Unregister before it drops the machine, so a Register of the same name at once
    may be refused as existing (up to 1 in 100 on forky's machined): a daemon that registers an adopted VM anew
    waits with ``forgotten`` until machined dropped the old record."""
    sh("systemctl", "start", "systemd-machined")
    leader = await asyncio.create_subprocess_exec("sleep", "300")
    reg = machined.Registration("reregistered", leader.pid)
    try:
        await machined.register(reg)
        for _ in range(3000):  # (without forgotten, 3 of 5 runs of 1,000 were refused once or more)
            await machined.unregister(reg.name)
            await machined.forgotten(reg.name)
            await machined.register(reg)  # never MachineExists
        assert machined_record(reg.name)["leader"]["pid"] == leader.pid
    finally:
        await machined.unregister_quietly(reg.name)
        leader.kill()
        await leader.wait()


async def test_a_helper_units_end_is_told_by_systemd_not_found_by_a_later_look(tmp_path, monkeypatch) -> None:
    """swtpm and virtiofsd run as transient units: their end comes from systemd's PropertiesChanged
    signal, so stopping one (after QEMU exits, or for a Stop) does not wait for a poll."""
    monkeypatch.setattr(runner_module, "UNIT_RECHECK_INTERVAL", 3600)  # a missed signal would hang below
    units = await UnitRunner.connect()
    helpers = []
    try:
        sock = tmp_path / "helper.sock"
        serve = f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({str(sock)!r}); time.sleep(60)"
        helpers.append(helper := await units.start(ServiceSpec(
            name="vmspawnd-test-stopped", argv=(sys.executable, "-c", serve), ready_path=sock)))
        await asyncio.wait_for(helper.stop(timeout=5), 20)
        assert await helper.wait() == -signal.SIGTERM
        sock.unlink()
        ends = f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({str(sock)!r}); time.sleep(0.3); exit(3)"
        helpers.append(helper := await units.start(ServiceSpec(
            name="vmspawnd-test-ends", argv=(sys.executable, "-c", ends), ready_path=sock)))
        assert await asyncio.wait_for(helper.wait(), 20) == 3
    finally:
        for started in helpers:  # after a failure above: no helper unit left running (bounded: no hang here)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(started.stop(timeout=2), 10)
        await units.aclose()


async def test_a_helper_unit_whose_start_is_undone_does_not_run_on(tmp_path, monkeypatch) -> None:
    """A Kill undoes a start by cancelling it; a cancel that comes once systemd has started a helper's
    unit (here: while its pid is looked up) stops that unit, where it ran on untracked."""
    looking_up = asyncio.Event()

    async def slow_load(service) -> None:
        looking_up.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(runner_module.UnitService, "_load", slow_load)
    units = await UnitRunner.connect()
    unit = "vmspawnd-test-undone.service"
    try:
        start = asyncio.ensure_future(units.start(ServiceSpec(
            name="vmspawnd-test-undone", argv=(sys.executable, "-c", "import time; time.sleep(60)"),
            ready_path=tmp_path / "never.sock")))
        await asyncio.wait_for(looking_up.wait(), 20)
        assert sh("systemctl", "is-active", unit, check=False).stdout.strip() == "active"
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(start, 20)
        assert sh("systemctl", "is-active", unit, check=False).stdout.strip() != "active"
    finally:
        sh("systemctl", "stop", unit, check=False)
        await units.aclose()


def virtiofsd_translates() -> bool:
    try:
        return find_virtiofsd().translate_ids
    except ConfigError:
        return False


@pytest.mark.skipif(not virtiofsd_translates(),
                    reason="this virtiofsd cannot translate UIDs (QEMU 7.2's C one, Debian 12): vmspawn refuses "
                           "--bind-user there, as tests/unit/test_binduser.py shows")
def test_bind_user_brings_a_host_user_and_their_home_into_the_vm() -> None:
    sh("useradd", "--create-home", "--user-group", "--shell=/bin/bash", "vmuser")
    try:
        pw = pwd.getpwnam("vmuser")
        home = Path(pw.pw_dir)
        (home / "hello.txt").write_text("hello-from-vmuser\n")
        os.chown(home / "hello.txt", pw.pw_uid, pw.pw_gid)
        proc = vmspawn("-M", "bindusr", "--bind-user=vmuser", "--bind-user-shell=yes", "--bind-user-group=wheel",
                       "test.virtiofs=mnt0", "test.cat=mnt0/hello.txt", "test.stat=mnt0/hello.txt",
                       "test.write=mnt0/from-vm.txt", "test.write=mnt0/by-root.txt",
                       "test.chown=60514:60514:mnt0/from-vm.txt", "test.chown=0:0:mnt0/by-root.txt",
                       "test.cred=userdb.transient.user.vmuser", "test.cred=userdb.transient.group.vmuser",
                       "test.cred=fstab.extra")
        out = proc.wait()
        assert proc.returncode == 0, out
        assert "cat mnt0/hello.txt: hello-from-vmuser" in out, out
        assert "stat mnt0/hello.txt: 60514:60514" in out, out  # the host owner, as the VM knows them
        written = home / "from-vm.txt"
        assert written.read_text() == "written-by-guest\n"
        assert (written.stat().st_uid, written.stat().st_gid) == (pw.pw_uid, pw.pw_gid)  # and back
        # guest root (or anyone else in the guest) cannot make files of any other host owner
        by_root = (home / "by-root.txt").stat()
        assert (by_root.st_uid, by_root.st_gid) == (pw.pw_uid, pw.pw_gid)
        records = {key: json.loads(value) for key, value in
                   re.findall(r"cred userdb\.transient\.(user|group)\.vmuser=(\{.*\})", out)}
        user = records["user"]
        shadow = next(line.split(":")[1] for line in Path("/etc/shadow").read_text().splitlines()
                      if line.startswith("vmuser:"))
        assert user.pop("privileged", None) == ({"hashedPassword": [shadow]} if shadow not in ("", "x") else None)
        assert user == {"userName": "vmuser", "uid": 60514, "gid": 60514, "shell": "/bin/bash",
                        "homeDirectory": "/run/vmhost/home/vmuser", "memberOf": ["wheel"],
                        "service": "io.systemd.NSpawn"}
        assert records["group"] == {"groupName": "vmuser", "gid": 60514, "service": "io.systemd.NSpawn"}
        assert "cred fstab.extra=mnt0 /run/vmhost/home/vmuser virtiofs rw,x-initrd.mount" in out, out
    finally:
        sh("userdel", "--remove", "vmuser", check=False)
