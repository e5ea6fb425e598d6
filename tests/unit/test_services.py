# SPDX-License-Identifier: LGPL-2.1-or-later
"""Auxiliary services (--tpm-state, --bind, swtpm, virtiofsd): pure builders, and real
swtpm / virtiofsd processes run by ChildRunner (no VM).  UnitRunner is driven against a fake
systemd manager on a private dbus-daemon."""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from dbus_fast import DBusError, Message
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method
from dbus_fast.service import signal as dbus_signal

from tests.conftest import processes_using
from tests.polling import poll
from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.futures import resolved
from vmspawnd.identity import Identity
from vmspawnd.pathwatch import DirectoryWatch, appears, writes
from vmspawnd.plan import plan_launch
from vmspawnd.services import runner as runner_module
from vmspawnd.services import swtpm, virtiofsd
from vmspawnd.services.runner import (
    ChildRunner,
    RunningService,
    ServiceError,
    ServiceSpec,
    UnitRunner,
    choose_runner,
    transient_unit_properties,
)
from vmspawnd.services.virtiofsd import Bind, Flavour, UidMap, Virtiofsd
from vmspawnd.settings import BY_KEY
from vmspawnd.systemd.units import SharedSystemd
from vmspawnd.values import StateLocation, Tristate

C_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, virtiofsd)")
needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
                                 reason="swtpm/swtpm_setup not installed")
NOBODY = 65534
needs_c_virtiofsd = pytest.mark.skipif(not C_VIRTIOFSD.exists(), reason="QEMU's C virtiofsd not installed")


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
async def runner(tmp):
    """A ChildRunner whose services are all stopped after the test (before ``tmp`` checks for leftovers)."""
    started: list[RunningService] = []
    child_runner = ChildRunner()
    real_start = child_runner.start

    async def start(spec):
        service = await real_start(spec)
        started.append(service)
        return service

    child_runner.start = start  # type: ignore[method-assign]
    yield child_runner
    for service in started:
        await service.stop(timeout=1)


@pytest.fixture
def tmp(tmp_path: Path):
    """tmp_path, with a check that no process mentioning it survives the test."""
    yield tmp_path
    left = processes_using(tmp_path)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


# ============================================================================ --tpm-state
def tpm_state(text: str) -> StateLocation:
    return StateLocation.parse(text, "tpm-state")


def test_tpm_state_auto_is_image_sibling_with_full_name(tmp_path):
    image = tmp_path / "foo.raw"
    image.touch()
    path, persistent = swtpm.tpm_state_dir(tpm_state("auto"), image, False, tmp_path / "run")
    assert (path, persistent) == (tmp_path / "foo.raw.tpmstate", True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    tree = tmp_path / "tree"
    tree.mkdir()
    assert swtpm.tpm_state_dir(tpm_state("yes"), Path(f"{tree}/"), False, tmp_path)[0] == tmp_path / "tree.tpmstate"


@pytest.mark.parametrize("setting", ["auto", "off", "", "no", "false", "0"])
def test_tpm_state_transient_for_off_ephemeral_or_no_image(tmp_path, setting):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tpm").mkdir()
    (run / "tpm" / "stale").touch()  # a killed earlier run's state is not reused
    image = tmp_path / "foo.raw"
    image.touch()
    path, persistent = swtpm.tpm_state_dir(tpm_state(setting), image, True, run)
    assert (path, persistent) == (run / "tpm", False)
    assert list(path.iterdir()) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert not (tmp_path / "foo.raw.tpmstate").exists()
    assert swtpm.tpm_state_dir(tpm_state(setting), None, False, run) == (run / "tpm", False)


def test_tpm_state_explicit_paths(tmp_path, monkeypatch):
    path, persistent = swtpm.tpm_state_dir(tpm_state(str(tmp_path / "a" / "b")), None, True, tmp_path)
    assert (path, persistent) == (tmp_path / "a" / "b", True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    monkeypatch.chdir(tmp_path)
    assert swtpm.tpm_state_dir(tpm_state("./rel"), None, False, tmp_path) == (tmp_path / "rel", True)


def test_tpm_state_persistent_dir_is_never_emptied(tmp_path):
    state = tmp_path / "keep"
    state.mkdir(mode=0o750)
    (state / "tpm2-00.permall").write_bytes(b"state")
    assert swtpm.tpm_state_dir(tpm_state(str(state)), None, False, tmp_path) == (state, True)
    assert (state / "tpm2-00.permall").read_bytes() == b"state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o750  # an existing dir is the user's


@pytest.mark.parametrize("setting", ["rel/path", "rel", "../up", "~/x"])
def test_tpm_state_relative_path_without_dot_slash_rejected(tmp_path, setting):
    with pytest.raises(ConfigError) as e:
        swtpm.tpm_state_dir(tpm_state(setting), None, False, tmp_path)
    assert e.value.field == "tpm-state"


def test_tpm_state_path_that_is_a_file_rejected(tmp_path):
    (tmp_path / "f").touch()
    with pytest.raises(ConfigError, match="not a directory"):
        swtpm.tpm_state_dir(tpm_state(str(tmp_path / "f")), None, False, tmp_path)


def test_tpm_enabled(monkeypatch):
    assert swtpm.tpm_enabled(Tristate.NO) is False
    assert swtpm.tpm_enabled(Tristate.AUTO, arch="riscv64") is False
    with pytest.raises(ConfigError, match="architecture"):
        swtpm.tpm_enabled(Tristate.YES, arch="riscv64")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert swtpm.tpm_enabled(Tristate.AUTO, arch="x86_64") is False
    with pytest.raises(ConfigError) as e:
        swtpm.tpm_enabled(Tristate.YES, arch="x86_64")
    assert e.value.field == "tpm" and "swtpm is not installed" in str(e.value)


@needs_swtpm
def test_tpm_enabled_when_installed():
    assert swtpm.tpm_enabled(Tristate.AUTO, arch="x86_64") is True
    assert swtpm.tpm_enabled(Tristate.YES, arch="x86_64") is True


def test_swtpm_and_qemu_tpm_args():
    argv = swtpm.swtpm_argv(Path("/usr/bin/swtpm"), Path("/s/tpm"), Path("/run/vm/tpm.sock"))
    assert argv == ["/usr/bin/swtpm", "socket", "--tpm2", "--tpmstate", "dir=/s/tpm",
                    "--ctrl", "type=unixio,fd=0", "--terminate", "--log", "file=/run/vm/tpm.log"]
    with pytest.raises(ConfigError) as e:  # swtpm's option parser has no escape for ','
        swtpm.swtpm_argv(Path("/usr/bin/swtpm"), Path("/s/a,b.raw.tpmstate"), Path("/run/tpm.sock"))
    assert e.value.field == "tpm-state"
    assert swtpm.qemu_tpm_args(Path("/run/a,b/tpm.sock"), arch="x86_64") == [
        "-chardev", "socket,id=chrtpm,path=/run/a,,b/tpm.sock",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"]
    assert swtpm.qemu_tpm_args(Path("/t.sock"), arch="aarch64")[-1] == "tpm-tis-device,tpmdev=tpm0"


# ============================================================================ --bind
def parse_bind(value: str, read_only: bool) -> Bind:
    setting = BY_KEY["bindRo" if read_only else "bind"]
    return setting.parse(value, setting.field())


def test_parse_bind_defaults_and_escapes(tmp_path):
    (tmp_path / "a:b").mkdir()
    assert parse_bind(str(tmp_path), False) == Bind(tmp_path, tmp_path, False)
    assert parse_bind(f"{tmp_path}:/mnt/x", True) == Bind(tmp_path, Path("/mnt/x"), True)
    assert parse_bind(f"{tmp_path}:", False).destination == tmp_path
    escaped = str(tmp_path).replace(":", "\\:") + "/a\\:b:/in\\:guest"
    assert parse_bind(escaped, False) == Bind(tmp_path / "a:b", Path("/in:guest"), False)


def test_parse_bind_relative_source_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_bind("d:/x", False).source == tmp_path / "d"


@pytest.mark.parametrize("read_only,field", [(False, "bind"), (True, "bind-ro")])
def test_parse_bind_rejects(tmp_path, read_only, field):
    for value, reason in {f"{tmp_path}:relative/dst": "absolute", f"{tmp_path}:/a:/b": "SRC", ":/dst": "SRC"}.items():
        with pytest.raises(ConfigError, match=reason) as e:
            parse_bind(value, read_only)
        assert (e.value.field, e.value.value) == (field, value)


@pytest.mark.parametrize("read_only,field", [(False, "bind"), (True, "bind-ro")])
def test_the_launch_plan_refuses_a_share_that_is_no_directory(tmp_path, read_only, field):
    (tmp_path / "file").touch()
    cases = {
        str(tmp_path / "file"): "not a directory",
        str(tmp_path / "missing"): "no such file or directory",
        "/" + "a" * 4100: "file name too long",
    }
    for value, reason in cases.items():
        config = MachineConfig(name="vm", linux=Path("/k"), binds=(parse_bind(value, read_only),))
        with pytest.raises(ConfigError, match=reason) as e:
            plan_launch(config)
        assert e.value.field == field


def test_fstab_extra_tags_modes_and_octal_escapes():
    binds = [Bind(Path("/a"), Path("/b"), False), Bind(Path("/c"), Path("/with space\\and\ttab"), True)]
    assert virtiofsd.fstab_extra(binds) == (
        "mnt0 /b virtiofs rw,x-initrd.mount\n"
        "mnt1 /with\\040space\\134and\\011tab virtiofs ro,x-initrd.mount\n")
    assert virtiofsd.fstab_extra([]) == ""
    assert [virtiofsd.bind_tag(i) for i in range(2)] == ["mnt0", "mnt1"]


# ============================================================================ virtiofsd argv
C = Virtiofsd(Path("/usr/lib/qemu/virtiofsd"), Flavour.C)
RUST_OLD = Virtiofsd(Path("/usr/libexec/virtiofsd"), Flavour.RUST)
RUST = Virtiofsd(Path("/usr/libexec/virtiofsd"), Flavour.RUST, readonly=True, translate_ids=True)


def test_c_virtiofsd_argv():
    assert virtiofsd.virtiofsd_argv(C, Path("/srv/a,b"), read_only=False, sandbox="namespace") == [
        "/usr/lib/qemu/virtiofsd", "--fd=0", "-o", "source=/srv/a\\,b",
        "-o", "cache=auto", "-o", "sandbox=namespace"]
    ro = virtiofsd.virtiofsd_argv(C, Path("/srv/x"), read_only=True, sandbox="chroot",
                                  uid_map=UidMap(0, 0, 65536))  # an identity map needs no translation
    assert ro[:6] == [sys.executable, "-I", "-S", str(virtiofsd.ROWRAP), "/srv/x", "--"]
    assert ro[6:] == ["/usr/lib/qemu/virtiofsd", "--fd=0", "-o", "source=/srv/x",
                      "-o", "cache=auto", "-o", "sandbox=chroot"]
    with pytest.raises(ConfigError) as e:
        virtiofsd.virtiofsd_argv(C, Path("/srv/x"), read_only=False, sandbox="namespace",
                                 uid_map=UidMap(0, 1000, 65536))
    assert e.value.field == "private-users"
    with pytest.raises(ValueError):
        virtiofsd.virtiofsd_argv(C, Path("/srv/x"), read_only=False, sandbox="none")


def test_rust_virtiofsd_argv():
    base = ["/usr/libexec/virtiofsd", "--fd=0", "--shared-dir=/srv/x"]
    assert virtiofsd.virtiofsd_argv(RUST, Path("/srv/x"), read_only=True, sandbox="namespace",
                                    uid_map=UidMap(0, 1000, 65536)) == [
        *base, "--sandbox=namespace", "--readonly",
        "--translate-uid", "map:0:1000:65536", "--translate-gid", "map:0:1000:65536"]
    assert virtiofsd.virtiofsd_argv(RUST, Path("/srv/x"), read_only=False, sandbox="none") == [
        *base, "--sandbox=none"]
    old = virtiofsd.virtiofsd_argv(RUST_OLD, Path("/srv/x"), read_only=True, sandbox="chroot")
    assert old[4:6] == ["/srv/x", "--"] and old[6:] == [*base, "--sandbox=chroot"]  # no --readonly: rowrap
    with pytest.raises(ConfigError):
        virtiofsd.virtiofsd_argv(RUST_OLD, Path("/srv/x"), read_only=False, sandbox="chroot",
                                 uid_map=UidMap(0, 1000, 65536))


RUST_HELP = """\
Usage: virtiofsd [OPTIONS]
Options:
      --shared-dir <shared-dir>  Shared directory path
      --readonly                 Share the directory read-only
      --sandbox <sandbox>        Sandbox mechanism [default: namespace] [possible values: namespace, chroot, none]
      --translate-uid <translate-uid>  Map a range of UIDs
"""


def fake_binary(path: Path, output: str) -> Path:
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({output!r})\n")
    path.chmod(0o755)
    return path


def test_virtiofsd_flavour_detection(tmp_path):
    rust = virtiofsd.probe_virtiofsd(fake_binary(tmp_path / "virtiofsd", RUST_HELP))
    assert rust == Virtiofsd(tmp_path / "virtiofsd", Flavour.RUST, readonly=True, translate_ids=True)
    old = virtiofsd.probe_virtiofsd(fake_binary(tmp_path / "old", "      --shared-dir <dir>\n"))
    assert old is not None and (old.flavour, old.readonly, old.translate_ids) == (Flavour.RUST, False, False)
    assert virtiofsd.probe_virtiofsd(fake_binary(tmp_path / "other", "usage: something else\n")) is None
    assert virtiofsd.probe_virtiofsd(tmp_path / "missing") is None
    # $PATH first, then the fixed places
    assert virtiofsd.find_virtiofsd(str(tmp_path), candidates=[C_VIRTIOFSD]).flavour is Flavour.RUST
    with pytest.raises(ConfigError, match="no virtiofsd found") as e:
        virtiofsd.find_virtiofsd("/nonexistent", candidates=[tmp_path / "missing"])
    assert e.value.field == "virtiofsd"


@needs_c_virtiofsd
def test_installed_c_virtiofsd_is_recognised():
    assert virtiofsd.probe_virtiofsd(C_VIRTIOFSD) == Virtiofsd(C_VIRTIOFSD, Flavour.C)
    assert virtiofsd.find_virtiofsd("/nonexistent").path.exists()


def test_sandbox_choice_from_mountinfo(tmp_path):
    host = tmp_path / "host"
    host.write_text("22 27 0:21 / /proc rw - proc proc rw\n27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n")
    chroot = tmp_path / "chroot"
    chroot.write_text("22 27 0:21 / /proc rw - proc proc rw\n")
    caps = tmp_path / "status"
    caps.write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert virtiofsd.choose_sandbox(host, caps) == "namespace"
    assert virtiofsd.choose_sandbox(chroot, caps) == "chroot"
    caps.write_text("CapEff:\t0000000000000000\n")
    assert virtiofsd.choose_sandbox(host, caps) == "chroot"


def test_qemu_virtiofs_and_shared_memory_args():
    assert virtiofsd.qemu_virtiofs_args("mnt0", Path("/run/a,b/s"), "mnt0") == [
        "-chardev", "socket,id=mnt0,path=/run/a,,b/s",
        "-device", "vhost-user-fs-pci,queue-size=1024,chardev=mnt0,tag=mnt0"]
    assert virtiofsd.qemu_shared_memory_args(256) == [
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"]


# ============================================================================ transient units
def test_service_spec_validation():
    with pytest.raises(ValueError, match="absolute"):
        ServiceSpec(name="x", argv=("swtpm", "socket"))
    with pytest.raises(ValueError):
        ServiceSpec(name="x.service", argv=("/bin/true",))
    assert ServiceSpec(name="x", argv=["/bin/true"]).argv == ("/bin/true",)
    with pytest.raises(ValueError, match="ready at once"):  # (the runner makes its socket: nothing to wait for)
        ServiceSpec(name="x", argv=("/bin/true",), listen_on=Path("/run/s.sock"), ready_path=Path("/run/s.sock"))


def test_transient_unit_properties_signatures():
    spec = ServiceSpec(name="vmspawnd-vm1-tpm", argv=("/usr/bin/swtpm", "socket", "--tpm2"),
                       description="TPM for VM vm1", bound_to="vmspawnd-vm1.scope")
    props = dict(transient_unit_properties(spec))
    assert {k: v.signature for k, v in props.items()} == {
        "Description": "s", "Type": "s", "ExecStart": "a(sasb)", "CollectMode": "s", "AddRef": "b",
        "TimeoutStopUSec": "t", "BindsTo": "as", "After": "as"}
    assert props["ExecStart"].value == [("/usr/bin/swtpm", ["/usr/bin/swtpm", "socket", "--tpm2"], False)]
    assert props["CollectMode"].value == "inactive-or-failed" and props["AddRef"].value is True
    assert props["BindsTo"].value == props["After"].value == ["vmspawnd-vm1.scope"]
    assert "BindsTo" not in dict(transient_unit_properties(ServiceSpec(name="x", argv=("/bin/true",))))
    # the whole StartTransientUnit call marshals with systemd's signature
    msg = Message(destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
                  interface="org.freedesktop.systemd1.Manager", member="StartTransientUnit",
                  signature="ssa(sv)a(sa(sv))", body=["vmspawnd-vm1-tpm.service", "fail",
                                                      transient_unit_properties(spec), []])
    assert len(msg._marshall(False)) > 100
    # a socket-activated helper: its socket is the call's first descriptor, as the helper's standard input
    activated = ServiceSpec(name="x", argv=("/bin/true",), listen_on=Path("/run/s.sock"))
    props = dict(transient_unit_properties(activated))
    assert (props["StandardInputFileDescriptor"].signature, props["StandardInputFileDescriptor"].value) == ("h", 0)
    assert (props["StandardOutput"].value, props["StandardError"].value) == ("journal", "journal")


async def test_choose_runner_without_systemd_is_child_runner(tmp_path, monkeypatch):
    monkeypatch.delenv("VMSPAWND_SERVICE_RUNNER", raising=False)
    assert isinstance(await choose_runner(systemd_dir=tmp_path / "no-systemd"), ChildRunner)
    monkeypatch.setenv("VMSPAWND_SERVICE_RUNNER", "child")
    assert isinstance(await choose_runner(systemd_dir=tmp_path), ChildRunner)


# ============================================================================ ChildRunner, real processes
@pytest.fixture
def swtpm_paths(tmp: Path) -> tuple[Path, Path]:
    """A new TPM state dir (0700) and where its swtpm's socket goes."""
    state = tmp / "state"
    state.mkdir(mode=0o700)
    return state, tmp / "tpm.sock"


@needs_swtpm
async def test_swtpm_starts_populates_state_and_stops_cleanly(runner, swtpm_paths):
    state, sock = swtpm_paths
    service = await swtpm.start_swtpm(runner, "vm1", state, sock)
    assert service.name == "vmspawnd-vm1-tpm" and service.unit is None and service.alive
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert (state / "tpm2-00.permall").stat().st_size > 0
    await service.stop()
    # 0 from swtpm's SIGTERM handler, or -SIGTERM when the signal beats the handler's installation
    assert not service.alive and await service.wait() in (0, -signal.SIGTERM)
    assert gone(service.pid)
    # second use: no manufacturing again, the state is reused
    assert await swtpm.manufacture(state) is False
    again = await swtpm.start_swtpm(runner, "vm1", state, sock)  # the stale socket is replaced
    assert again.alive
    await again.stop()


def swtpm_init(sock: Path) -> subprocess.CompletedProcess[str]:
    """What QEMU does first with a TPM: CMD_INIT over the control socket."""
    return subprocess.run(["swtpm_ioctl", "--unix", str(sock), "-i"], capture_output=True, text=True, timeout=10)


@needs_swtpm
async def test_swtpm_logs_a_state_it_cannot_use_and_nothing_else(runner, swtpm_paths):
    state, sock = swtpm_paths
    good = await swtpm.start_swtpm(runner, "vm1", state, sock)
    assert swtpm_init(sock).returncode == 0
    assert good.logged() == [] and swtpm.state_unusable(good, state) is None
    await good.stop()

    (state / "tpm2-00.permall").write_bytes(os.urandom(3000))  # damaged
    bad = await swtpm.start_swtpm(runner, "vm1", state, sock)
    assert swtpm_init(sock).returncode != 0
    said = swtpm.state_unusable(bad, state)
    assert said is not None and said.startswith(f"tpm-state={state}: swtpm cannot use the TPM state"), said
    assert "Could not initialize the TPM" in said, said
    await bad.stop()
    again = await swtpm.start_swtpm(runner, "vm1", state, sock)  # the earlier run's log is not this one's
    assert again.logged() == []
    await again.stop()


class Watched(RunningService):
    """A service with nothing running: only what RunningService does for every runner."""

    async def stop(self, timeout: float = 0) -> None: ...


@needs_root
def test_a_helpers_log_is_read_as_its_user_never_through_a_symlink():
    top = Path(tempfile.mkdtemp(prefix="vmspawnd-test-"))
    try:
        top.chmod(0o755)
        secret = top / "secret"
        secret.write_text("root's only\n")
        secret.chmod(0o600)
        theirs = top / "user"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, NOBODY, NOBODY)
        log = theirs / "tpm.log"
        service = Watched(ServiceSpec(name="vmspawnd-vm1-tpm", argv=("/bin/true",), log_path=log,
                                      identity=Identity(NOBODY, NOBODY, (NOBODY,))))
        assert service.logged() == []  # none yet
        log.symlink_to(secret)  # what the VM's user may put there
        assert service.logged() == []
        log.unlink()
        shutil.copy(secret, log)  # root's file, not readable by them
        assert service.logged() == []
        log.chmod(0o644)
        assert service.logged() == ["root's only"]
    finally:
        shutil.rmtree(top)


@needs_swtpm
async def test_killed_helper_resolves_wait_with_its_status(runner, tmp):
    state = tmp / "state"
    state.mkdir()
    service = await swtpm.start_swtpm(runner, "vm1", state, tmp / "tpm.sock")
    os.kill(service.pid, signal.SIGKILL)
    assert await asyncio.wait_for(service.wait(), 5) == -signal.SIGKILL
    assert not service.alive and gone(service.pid)


@needs_root
@needs_c_virtiofsd
async def test_virtiofsd_starts_and_stops(runner, tmp):
    share = tmp / "share"
    share.mkdir()
    service = await virtiofsd.start_virtiofsd(runner, "vm1", 0, share, tmp / "vfs.sock", False,
                                              virtiofsd=Virtiofsd(C_VIRTIOFSD, Flavour.C))
    assert service.name == "vmspawnd-vm1-virtiofsd-0"
    assert stat.S_ISSOCK((tmp / "vfs.sock").lstat().st_mode)
    await service.stop()
    assert gone(service.pid)


@needs_root
@needs_c_virtiofsd
@pytest.mark.parametrize("legacy", [False, True], ids=["mount_setattr", "remount"])
async def test_read_only_share_is_enforced_in_virtiofsd_mount_namespace(runner, tmp, legacy, monkeypatch):
    share = tmp / "share"
    share.mkdir()
    (share / "file").write_text("data")
    monkeypatch.setenv("VMSPAWND_ROWRAP_LEGACY", "1" if legacy else "0")
    service = await virtiofsd.start_virtiofsd(runner, "vm1", "root", share, tmp / "vfs.sock", True,
                                              virtiofsd=Virtiofsd(C_VIRTIOFSD, Flavour.C), sandbox="namespace")
    # socket-activated, it may still be the wrapper making the namespace: wait until it is virtiofsd
    await asyncio.to_thread(poll, lambda: os.readlink(f"/proc/{service.pid}/exe"),
                            lambda exe: exe == str(C_VIRTIOFSD.resolve()), 10, 0.01)

    def inside(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--target={service.pid}", "--mount", *argv], capture_output=True,
                              text=True, timeout=5)

    assert inside("cat", str(share / "file")).stdout == "data"
    denied = inside("touch", str(share / "new"))
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    (share / "host-can-write").write_text("yes")  # the host's view is untouched
    assert not (share / "new").exists()
    await service.stop()


async def test_helper_exiting_before_ready_fails_fast_with_status_and_output(runner, tmp):
    script = "import sys; print('starting'); print('cannot open the thing', file=sys.stderr); sys.exit(3)"
    spec = ServiceSpec(name="vmspawnd-vm1-broken", argv=(sys.executable, "-u", "-c", script),
                       ready_path=tmp / "s.sock")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ServiceError) as e:
        await runner.start(spec)
    assert loop.time() - t0 < 10  # not the readiness timeout (60 s)
    assert e.value.status == 3 and "exit status 3" in str(e.value)
    assert e.value.output == ("starting", "cannot open the thing")


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "no-O_TMPFILE"])
async def test_a_helpers_output_goes_to_a_private_unnamed_file_in_tmpdir(runner, tmp, monkeypatch, request, unnamed):
    """Made unnamed (O_TMPFILE), or where the file system cannot, made named and removed at once:
    private either way."""
    (tmp / "t").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp / "t"))
    if not unnamed:
        request.getfixturevalue("no_tmpfile")
    script = ("import os, sys; print(os.readlink('/proc/self/fd/2')); print(oct(os.fstat(2).st_mode & 0o777)); "
              "sys.exit(3)")
    spec = ServiceSpec(name="vmspawnd-vm1-said", argv=(sys.executable, "-u", "-c", script), ready_path=tmp / "s.sock")
    with pytest.raises(ServiceError) as e:
        await runner.start(spec)
    where, mode = e.value.output
    assert where.startswith(f"{tmp}/t/") and where.endswith(" (deleted)") and mode == "0o600", e.value.output
    assert where.startswith(f"{tmp}/t/.vmspawnd-vm1-said-") != unnamed, where  # (the name it had for a moment)
    assert list((tmp / "t").iterdir()) == []  # (nothing left there, nor while it ran)


@needs_c_virtiofsd
async def test_virtiofsd_with_missing_source_reports_its_error(runner, tmp):
    """Socket-activated: its start does not wait for it, and its end says why QEMU found no share."""
    service = await virtiofsd.start_virtiofsd(runner, "vm1", 0, tmp / "missing", tmp / "vfs.sock", False,
                                              virtiofsd=Virtiofsd(C_VIRTIOFSD, Flavour.C))
    assert await asyncio.wait_for(service.wait(), 10) == 1
    failed = service.failed_early()
    assert failed is not None and failed.startswith("vmspawnd-vm1-virtiofsd-0 ended (exit status 1) before QEMU")
    assert "failed to stat source" in failed, failed


async def test_ready_timeout_kills_the_helper(runner, tmp):
    spec = ServiceSpec(name="slow", argv=(sys.executable, "-c", f"import time; time.sleep(30) # {tmp}"),
                       ready_path=tmp / "never.sock", ready_timeout=0.3)
    with pytest.raises(ServiceError, match="did not create"):
        await runner.start(spec)


async def test_missing_binary_and_non_socket_ready_path(runner, tmp):
    with pytest.raises(ServiceError, match="cannot execute"):
        await runner.start(ServiceSpec(name="x", argv=(str(tmp / "nope"),)))
    (tmp / "file").touch()
    with pytest.raises(ServiceError, match="not a socket"):
        await runner.start(ServiceSpec(name="x", argv=("/bin/true",), ready_path=tmp / "file"))


SERVER = textwrap.dedent("""
    import os, signal, socket, subprocess, sys, time
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "60"])  # a process it leaves behind
    open(sys.argv[3], "w").write(str(child.pid))
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen()
    time.sleep(60)
""")


@pytest.mark.parametrize("mode", ["normal", "ignore-term"])
async def test_stop_escalates_and_kills_what_the_helper_left(runner, tmp, mode):
    spec = ServiceSpec(name="srv", argv=(sys.executable, "-c", SERVER, str(tmp / "s.sock"), mode, str(tmp / "pid")),
                       ready_path=tmp / "s.sock")
    service = await runner.start(spec)
    grandchild = int((tmp / "pid").read_text())
    assert not gone(grandchild)
    await service.stop(timeout=0.3)
    assert await service.wait() == (-signal.SIGTERM if mode == "normal" else -signal.SIGKILL)
    for _ in range(1000):  # the grandchild is our reaped child's orphan: init reaps it
        if gone(grandchild) or Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the helper's child survived")


async def test_detach_leaves_the_helper_running(runner, tmp):
    spec = ServiceSpec(name="srv", argv=(sys.executable, "-c", SERVER, str(tmp / "s.sock"), "normal", str(tmp / "pid")),
                       ready_path=tmp / "s.sock")
    service = await runner.start(spec)
    service.detach()
    await asyncio.sleep(0.05)
    assert not gone(service.pid) and not service.alive
    assert await service.wait() is None
    await service.stop()  # not ours any more: a no-op
    assert not gone(service.pid)
    os.killpg(service.pid, signal.SIGKILL)
    os.waitpid(service.pid, 0)


#: a process that starts a helper (sleep) as vmspawn starts its helpers, says its pid and waits to be killed
HELPER_PARENT = """
import asyncio, sys
from vmspawnd.services.runner import ChildRunner, ServiceSpec
async def main():
    runner = ChildRunner(die_with_parent=sys.argv[1] == "yes")
    service = await runner.start(ServiceSpec(name="sleeper", argv=("/bin/sleep", "60")))
    print("helper", service.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_a_helper_dies_with_its_parent_only_when_asked(die_with_parent):
    # (vmspawn's helpers end when it is killed; a daemon's outlive it, as its VMs do)
    parent = subprocess.Popen([sys.executable, "-c", HELPER_PARENT, "yes" if die_with_parent else "no"],
                              stdout=subprocess.PIPE, text=True)
    pid = next(int(line.split()[1]) for line in parent.stdout if line.startswith("helper "))  # (after its log)
    try:
        assert poll(lambda: Path(f"/proc/{pid}/cmdline").read_bytes(), lambda c: c.startswith(b"/bin/sleep"), 10)
        parent.kill()
        parent.wait()
        if die_with_parent:
            assert poll(lambda: gone(pid), bool, 10)  # SIGTERM when its parent died
        else:
            time.sleep(0.5)
            assert not gone(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


#: a socket-activated helper: comes up slowly (sleeps argv[1] s), says so (creates the file argv[2]),
#: then answers one connection to its standard input (the listening socket) with what it read, upper-cased
ACTIVATED = ("import socket, sys, time; time.sleep(float(sys.argv[1])); open(sys.argv[2], 'w').close(); "
             "c, _ = socket.socket(fileno=0).accept(); c.sendall(c.recv(64).upper())")


def ask(sock: Path, what: bytes) -> bytes:
    """Connect to ``sock``, send ``what`` at once, and return the answer (as QEMU talks to its swtpm)."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(sock))
        client.sendall(what)
        return client.recv(64)


async def test_a_socket_activated_helper_is_ready_at_once_and_answers_what_waited_for_it(runner, tmp):
    sock, up = tmp / "a.sock", tmp / "up"
    sock.write_bytes(b"")  # (not a socket: refused, and left)
    spec = ServiceSpec(name="vmspawnd-vm1-activated", argv=(sys.executable, "-c", ACTIVATED, "1", str(up)),
                       listen_on=sock)
    with pytest.raises(ServiceError, match="exists and is not a socket"):
        await runner.start(spec)
    sock.unlink()
    for _ in range(2):  # (the second time over the socket the first left)
        service = await runner.start(spec)
        assert not up.exists()  # the start did not wait for the helper to come up
        assert stat.S_ISSOCK(sock.lstat().st_mode) and stat.S_IMODE(sock.lstat().st_mode) == 0o600
        assert await asyncio.to_thread(ask, sock, b"hello") == b"HELLO"  # (sent before it listened)
        assert up.exists() and await asyncio.wait_for(service.wait(), 10) == 0
        with pytest.raises(ConnectionRefusedError):  # only the helper held the socket: it went with it
            ask(sock, b"again")
        up.unlink()


async def test_a_socket_activated_helper_that_ended_with_an_error_is_named_with_what_it_logged(runner, tmp):
    log_file = tmp / "tpm.log"
    ends = f"open({str(log_file)!r}, 'w').write('cannot open the state\\n'); raise SystemExit(3)"
    service = await runner.start(ServiceSpec(name="vmspawnd-vm1-tpm", argv=(sys.executable, "-c", ends),
                                             listen_on=tmp / "tpm.sock", log_path=log_file))
    assert await asyncio.wait_for(service.wait(), 10) == 3
    assert service.failed_early() == ("vmspawnd-vm1-tpm ended (exit status 3) before QEMU could use it: "
                                      "cannot open the state")
    clean = await runner.start(ServiceSpec(name="vmspawnd-vm1-tpm", argv=("/bin/true",), listen_on=tmp / "tpm.sock"))
    assert await asyncio.wait_for(clean.wait(), 10) == 0 and clean.failed_early() is None


# ============================================================================ UnitRunner vs a fake systemd
class FakeUnit:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)

    def state(self) -> str:
        rc = self.proc.poll()
        return "active" if rc is None else ("inactive" if rc == 0 else "failed")


class FakeUnitInterface(ServiceInterface):
    def __init__(self, unit: FakeUnit) -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self.unit = unit

    @dbus_property(access=PropertyAccess.READ)
    def ActiveState(self) -> "s":  # noqa: F821, N802
        return self.unit.state()


class FakeServiceInterface(ServiceInterface):
    def __init__(self, unit: FakeUnit) -> None:
        super().__init__("org.freedesktop.systemd1.Service")
        self.unit = unit

    @dbus_property(access=PropertyAccess.READ)
    def MainPID(self) -> "u":  # noqa: F821, N802
        return self.unit.proc.pid if self.unit.proc.poll() is None else 0

    @dbus_property(access=PropertyAccess.READ)
    def ExecMainCode(self) -> "i":  # noqa: F821, N802
        rc = self.unit.proc.poll()
        return 0 if rc is None else (1 if rc >= 0 else 2)

    @dbus_property(access=PropertyAccess.READ)
    def ExecMainStatus(self) -> "i":  # noqa: F821, N802
        rc = self.unit.proc.poll()
        return 0 if rc is None else abs(rc)


#: What systemd's bus_service_set_property/bus_unit_set_property accept, by signature.
SYSTEMD_PROPERTY_SIGNATURES = {"Description": "s", "Type": "s", "ExecStart": "a(sasb)", "CollectMode": "s",
                               "AddRef": "b", "TimeoutStopUSec": "t", "BindsTo": "as", "After": "as"}


class FakeManager(ServiceInterface):
    """Just enough of org.freedesktop.systemd1.Manager for UnitRunner."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.bus = bus
        self.units: dict[str, FakeUnit] = {}
        self.jobs = 0
        self.received: list = []

    def _path(self, unit: str) -> str:
        return "/org/freedesktop/systemd1/unit/" + "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in unit)

    def _job(self, unit: str, result: str, delay: float = 0.0) -> str:
        self.jobs += 1
        job_id, path = self.jobs, f"/org/freedesktop/systemd1/job/{self.jobs}"
        asyncio.get_running_loop().call_later(delay, self.JobRemoved, job_id, path, unit, result)
        return path

    @dbus_signal()
    def JobRemoved(self, job_id, path, unit, result) -> "uoss":  # noqa: F821, N802
        return [job_id, path, unit, result]

    @method()
    def Subscribe(self):  # noqa: N802
        pass

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":  # noqa: F821, N802
        return "257-fake"

    @method()
    def StartTransientUnit(self, name: "s", mode: "s", properties: "a(sv)", aux: "a(sa(sv))") -> "o":  # noqa: F821, F722, N802, E501
        self.received.append((name, mode, properties, aux))
        props = {}
        for key, value in properties:
            assert SYSTEMD_PROPERTY_SIGNATURES[key] == value.signature, key
            props[key] = value.value
        assert mode == "fail" and name.endswith(".service")
        (path, argv, _ignore), = props["ExecStart"]
        unit = FakeUnit(name, argv)
        self.units[name] = unit
        unit_interface = FakeUnitInterface(unit)
        self.bus.export(self._path(name), unit_interface)
        self.bus.export(self._path(name), FakeServiceInterface(unit))
        # as systemd tells its subscribers: the unit's PropertiesChanged once its process ended
        loop, pidfd = asyncio.get_running_loop(), os.pidfd_open(unit.proc.pid)

        def ended() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            unit_interface.emit_properties_changed({"ActiveState": unit.state()})

        loop.add_reader(pidfd, ended)
        return self._job(name, "done")

    @method()
    def GetUnit(self, name: "s") -> "o":  # noqa: F821, N802
        if name not in self.units:
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return self._path(name)

    @method()
    def StopUnit(self, name: "s", mode: "s") -> "o":  # noqa: F821, N802
        self.units[name].proc.terminate()
        return self._job(name, "done", 0.05)

    @method()
    def KillUnit(self, name: "s", whom: "s", sig: "i"):  # noqa: F821, N802
        self.units[name].proc.send_signal(sig)


async def start_fake_systemd(address: str) -> tuple[subprocess.Popen[bytes], MessageBus, FakeManager]:
    """A private dbus-daemon at ``address`` with a fake org.freedesktop.systemd1 on it."""
    daemon = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={address}",
                               "--print-address=1"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert daemon.stdout is not None
        await asyncio.get_running_loop().run_in_executor(None, daemon.stdout.readline)
        bus = await MessageBus(bus_address=address).connect()
        manager = FakeManager(bus)
        bus.export("/org/freedesktop/systemd1", manager)
        await bus.request_name("org.freedesktop.systemd1")
    except BaseException:
        daemon.terminate()
        daemon.wait()
        raise
    return daemon, bus, manager


def stop_fake_systemd(daemon: subprocess.Popen[bytes], bus: MessageBus, manager: FakeManager) -> None:
    for unit in manager.units.values():
        with contextlib.suppress(ProcessLookupError):
            unit.proc.kill()
        unit.proc.wait()
    bus.disconnect()
    daemon.terminate()
    daemon.wait()


@pytest.fixture
async def fake_systemd(tmp_path):
    """A private dbus-daemon with a fake org.freedesktop.systemd1 on it."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed")
    address = f"unix:path={tmp_path}/bus"
    daemon, bus, manager = await start_fake_systemd(address)
    try:
        yield address, manager
    finally:
        stop_fake_systemd(daemon, bus, manager)


async def test_unit_runner_against_fake_systemd(fake_systemd, tmp_path, monkeypatch):
    address, manager = fake_systemd
    # a unit's end is seen from systemd's signal: reading its state again would come only after this
    monkeypatch.setattr(runner_module, "UNIT_RECHECK_INTERVAL", 3600)
    unit_runner = await UnitRunner.connect(address=address)
    try:
        assert await unit_runner.version() == "257-fake"
        sock = tmp_path / "u.sock"
        script = f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({str(sock)!r}); time.sleep(60)"
        spec = ServiceSpec(name="vmspawnd-vm1-tpm", argv=(sys.executable, "-c", script), description="d",
                           bound_to="vmspawnd-vm1.scope", ready_path=sock)
        service = await unit_runner.start(spec)
        assert service.unit == "vmspawnd-vm1-tpm.service" and sock.exists()
        assert service.pid == manager.units[service.unit].proc.pid and service.alive
        name, mode, _props, aux = manager.received[0]
        assert (name, mode, aux) == ("vmspawnd-vm1-tpm.service", "fail", [])
        await asyncio.wait_for(service.stop(timeout=2), 10)
        assert not service.alive and await service.wait() == -signal.SIGTERM

        # a helper that ends by itself once ready: its exit status, told as it happens
        script = f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({str(sock)!r}); time.sleep(0.2); exit(3)"
        sock.unlink()
        ending = await unit_runner.start(ServiceSpec(name="vmspawnd-vm1-ends", argv=(sys.executable, "-c", script),
                                                     ready_path=sock))
        assert await asyncio.wait_for(ending.wait(), 10) == 3

        # a helper that dies before it is ready: seen at once, the error names the unit
        failing = ServiceSpec(name="vmspawnd-vm1-bad", argv=(sys.executable, "-c", "raise SystemExit(4)"),
                              ready_path=tmp_path / "never.sock")
        with pytest.raises(ServiceError, match="exit status 4") as e:
            await asyncio.wait_for(unit_runner.start(failing), 10)
        assert "journalctl -u vmspawnd-vm1-bad.service" in str(e.value)

        with pytest.raises(ServiceError, match="file descriptors"):
            await unit_runner.start(ServiceSpec(name="x", argv=("/bin/true",), pass_fds=(0,)))
    finally:
        await unit_runner.aclose()


async def test_choose_runner_picks_units_when_the_manager_answers(fake_systemd, tmp_path, monkeypatch):
    address, _manager = fake_systemd
    systemd_dir = tmp_path / "systemd"
    systemd_dir.mkdir()
    monkeypatch.delenv("VMSPAWND_SERVICE_RUNNER", raising=False)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    chosen = await choose_runner(systemd_dir=systemd_dir)
    assert isinstance(chosen, UnitRunner)
    await chosen.aclose()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/nobus")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path}/nobus")
    assert isinstance(await choose_runner(systemd_dir=systemd_dir), ChildRunner)


async def test_a_helpers_socket_is_noticed_by_inotify_not_by_a_timer(tmp_path):
    loop = asyncio.get_running_loop()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with DirectoryWatch(tmp_path / "a") as first, DirectoryWatch(tmp_path / "b") as other:
        second = DirectoryWatch(tmp_path / "a")  # two helpers of one VM share the directory
        second.close()  # one of them ready: the other still waits on the same watch
        sock = socket.socket(socket.AF_UNIX)
        loop.call_later(0.05, sock.bind, str(tmp_path / "a" / "s.sock"))
        # no timeout of their own: only the socket's creation ends the first (the other stays)
        waits = [loop.create_task(first.changed()), loop.create_task(other.changed())]
        done, _ = await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert done == {waits[0]} and (tmp_path / "a" / "s.sock").exists()
        waits[1].cancel()
        sock.close()
        await asyncio.wait_for(first.changed(also=resolved(loop)), 10)  # (the helper exiting ends it too)
    with pytest.raises(OSError, match="No such file"):
        DirectoryWatch(tmp_path / "missing")


async def test_a_log_files_writes_are_noticed_also_those_made_while_its_reader_was_busy(tmp_path):
    log = tmp_path / "helper.log"
    log.write_text("")
    seen: list[str] = []
    written = asyncio.Event()

    async def reader() -> None:
        async for _ in writes(log):
            seen.append(log.read_text())
            written.set()
            with DirectoryWatch(tmp_path) as other:  # busy a while, waiting on another watch: events are read
                await other.changed(timeout=0.2)

    task = asyncio.get_running_loop().create_task(reader())
    try:
        await asyncio.wait_for(written.wait(), 10)  # (it yields once at the start)
        with log.open("a") as f:  # written while the reader waits on its other watch
            f.write("first error\n")
        await asyncio.wait_for(_until(lambda: seen[-1:] == ["first error\n"]), 10)
        with log.open("a") as f:
            f.write("second error\n")
        await asyncio.wait_for(_until(lambda: seen[-1:] == ["first error\nsecond error\n"]), 10)
    finally:
        task.cancel()
    with pytest.raises(OSError, match="No such file"):
        await anext(writes(tmp_path / "missing.log"))


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_waiting_for_a_socket_ends_when_it_appears_its_process_ends_or_time_runs_out(tmp_path):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX)
    loop.call_later(0.05, sock.bind, str(tmp_path / "s.sock"))
    assert await asyncio.wait_for(appears(tmp_path / "s.sock", 10), 5)  # woken by inotify
    sock.close()
    # a directory that does not exist yet cannot be watched: it is polled, and still seen
    late = tmp_path / "late" / "s.sock"
    loop.call_later(0.05, lambda: (late.parent.mkdir(), late.write_text("")))
    assert await asyncio.wait_for(appears(late, 10), 5)
    assert not await asyncio.wait_for(appears(tmp_path / "never", 10, also=resolved(loop)), 5)  # (it exited)
    started = loop.time()
    assert not await appears(tmp_path / "never", 0.1)
    assert loop.time() - started >= 0.1


async def test_the_daemons_one_connection_to_systemd_is_made_again_once_it_dropped(tmp_path, monkeypatch):
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed")
    systemd_dir = tmp_path / "systemd"
    systemd_dir.mkdir()

    def bus_at(address: str) -> None:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)

    bus_at(address := f"unix:path={tmp_path}/bus")
    daemon, bus, fake = await start_fake_systemd(address)
    shared = SharedSystemd(systemd_dir)
    try:
        at_once = await asyncio.gather(*(shared.get() for _ in range(3)))  # starts at once: one connection
        first = at_once[0][0]
        assert first is not None and all(manager is first for manager, _ in at_once)
        assert (await shared.get())[0] is first  # and the next start uses it too
        daemon.kill()  # the bus goes away (dbus-daemon restarted)…
        stop_fake_systemd(daemon, bus, fake)
        for _ in range(100):
            if not first.bus.connected:
                break
            await asyncio.sleep(0.02)
        bus_at(address := f"unix:path={tmp_path}/bus2")
        daemon, bus, fake = await start_fake_systemd(address)
        second, why = await shared.get()  # …and the next start has a new connection
        assert second is not None and second is not first and second.bus.connected, why
        assert await second.version() == "257-fake"
    finally:
        shared.close()
        stop_fake_systemd(daemon, bus, fake)


async def test_starts_waiting_for_a_manager_that_does_not_answer_share_one_attempt(tmp_path, monkeypatch):
    """A service manager that accepts the connection and never answers (a hung host): starts that
    ask at once wait out one attempt together (not one timeout each, one after the other), and a
    start after that failure tries again."""
    systemd_dir = tmp_path / "systemd"
    systemd_dir.mkdir()
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_unix_server(lambda _, writer: held.append(writer), str(tmp_path / "bus"))
    for variable in ("DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS"):
        monkeypatch.setenv(variable, f"unix:path={tmp_path}/bus")
    shared = SharedSystemd(systemd_dir, timeout=0.5)
    try:
        at_once = await asyncio.gather(*(shared.get() for _ in range(3)))
        assert [manager for manager, _ in at_once] == [None, None, None]
        assert "did not answer" in at_once[0][1]
        assert len(held) == 1  # one connection attempt served all three
        assert (await shared.get())[0] is None and len(held) == 2  # the next start tries again
    finally:
        shared.close()
        for writer in held:
            writer.close()
        server.close()
