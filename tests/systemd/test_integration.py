"""vmspawnd as a systemd citizen, against the real systemd 257 + machined of the container:
machined registration over varlink, QEMU alone in its scope, slice/properties, machinectl."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.polling import poll
from tests.systemd.helpers import (
    GUEST_DIR,
    MACHINED_VARLINK,
    NAME,
    Ctl,
    alive,
    qemu_cgroup,
    sh,
    unit_properties,
    varlink_call,
)

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(not (GUEST_DIR / "vmlinuz").is_file(), reason="no test guest bound in"),
]

SCOPE = f"machine-{NAME}.scope"


def machined_entry(name: str, timeout: float = 10) -> dict:
    """machined's record of ``name`` (registration follows the scope by a moment: wait for it)."""
    replies = poll(lambda: varlink_call(MACHINED_VARLINK, "io.systemd.Machine.List", {"name": name}),
                   lambda r: "error" not in r[0], timeout, interval=0.1)
    return replies[0]["parameters"]


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


def test_machinectl_terminate_is_reported_as_stopped(vm: Ctl) -> None:
    pid = vm.status()["pid"]
    sh("machinectl", "terminate", NAME)
    st = vm.wait(lambda s: s["state"] != "running", timeout=30)
    assert st["state"] == "stopped", st
    assert not alive(pid)
    assert "error" in varlink_call(MACHINED_VARLINK, "io.systemd.Machine.List", {"name": NAME})[0]


def test_machinectl_kill_is_reported_as_stopped(vm: Ctl) -> None:
    pid = vm.status()["pid"]
    sh("machinectl", "kill", NAME)
    st = vm.wait(lambda s: s["state"] != "running", timeout=30)
    assert st["state"] == "stopped", st
    assert not alive(pid)


def vmspawn(*args: str, timeout: float = 90) -> subprocess.Popen[str]:
    argv = [str(Path(sys.executable).parent / "vmspawn"), f"--linux={GUEST_DIR / 'vmlinuz'}",
            f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M", "--console=read-only", "--firmware=bios",
            "--tpm=no", *args, "panic=-1", "test.notify=1"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_puts_qemu_in_a_scope_with_slice_and_properties() -> None:
    proc = vmspawn("-M", "cliscope", "--slice=vmtest", "--property=MemoryMax=300M", "--property=TasksMax=77",
                   "--property=CPUWeight=50", "test.action=hang")
    scope = "machine-cliscope.scope"
    try:
        props = poll(lambda: unit_properties(scope, "ActiveState", "Slice", "MemoryMax", "TasksMax", "CPUWeight"),
                     lambda p: p.get("ActiveState") == "active")
        assert props == {"ActiveState": "active", "Slice": "vmtest.slice", "MemoryMax": str(300 << 20),
                         "TasksMax": "77", "CPUWeight": "50"}, props
        # the scope exists before QEMU does (its launcher is moved in first, then execs QEMU);
        # registration with machined follows QEMU's start, so once it is there QEMU runs
        entry = machined_entry("cliscope")
        assert entry["unit"] == scope
        procs = cgroup_procs(f"/vmtest.slice/{scope}")
        assert procs == [entry["leader"]["pid"]] and proc.pid not in procs  # QEMU alone; vmspawn outside
        assert Path(f"/proc/{procs[0]}/comm").read_text().startswith("qemu")
    finally:
        proc.terminate()
        time.sleep(0.3)
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert unit_properties(scope, "ActiveState").get("ActiveState") in ("inactive", ""), out


def test_register_yes_without_machined_fails_clearly() -> None:
    sh("systemctl", "stop", "systemd-machined")
    try:
        proc = vmspawn("-M", "noreg", "--register=yes")
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 1, out
        assert "cannot register with systemd-machined" in out
        assert unit_properties("machine-noreg.scope", "ActiveState").get("ActiveState") in ("inactive", "")
        auto = vmspawn("-M", "autoreg", "--register=auto")
        out, _ = auto.communicate(timeout=90)
        assert auto.returncode == 0, out  # auto tolerates a missing machined
    finally:
        sh("systemctl", "start", "systemd-machined")


def test_bad_property_is_refused_before_anything_starts() -> None:
    proc = vmspawn("-M", "badprop", "--property=NoSuchThing=1")
    out, _ = proc.communicate(timeout=30)
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
        written = tree / "etc" / "written"
        # The guest creates the file before it writes the line: wait for the whole line, not the name.
        poll(lambda: written.read_text() if written.exists() else "", lambda text: text == "written-by-guest\n")
    finally:
        proc.terminate()
        time.sleep(0.3)
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "cat root/etc/hostname: from-the-tree" in out, out
    assert "forcewrite mnt0/evil FAILED" in out, out  # read-only enforced by (the Rust) virtiofsd
    assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]
    assert "vmspawnd-dirvm" not in sh("systemctl", "list-units", "--plain", "--no-legend", "vmspawnd-dirvm-*").stdout


def test_keep_unit_keeps_qemu_in_the_callers_unit() -> None:
    own = qemu_cgroup(os.getpid())
    proc = vmspawn("-M", "kept", "--keep-unit", "test.action=hang")
    try:
        pid = machined_entry("kept", timeout=60)["leader"]["pid"]
        assert qemu_cgroup(pid) == own
        assert unit_properties("machine-kept.scope", "LoadState").get("LoadState") in ("not-found", "")
    finally:
        proc.terminate()
        time.sleep(0.3)
        proc.terminate()
        proc.communicate(timeout=60)


def test_a_dying_helper_unit_stops_the_vm() -> None:
    argv = [str(Path(sys.executable).parent / "vmspawn"), f"--linux={GUEST_DIR / 'vmlinuz'}",
            f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M", "--console=read-only", "--firmware=bios",
            "-M", "tpmdies", "--tpm=yes", "--tpm-state=off", "panic=-1", "test.notify=1", "test.action=hang"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = machined_entry("tpmdies", timeout=60)["leader"]["pid"]
        unit = "vmspawnd-tpmdies-tpm.service"
        assert unit_properties(unit, "ActiveState")["ActiveState"] == "active"
        sh("systemctl", "kill", "--signal=SIGKILL", unit)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out
    assert "exited unexpectedly" in out
    assert not alive(pid)
    assert unit_properties("machine-tpmdies.scope", "ActiveState").get("ActiveState") in ("inactive", "")
