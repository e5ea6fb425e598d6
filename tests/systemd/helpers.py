# SPDX-License-Identifier: LGPL-2.1-or-later
"""Helpers for tests of the systemd tier (inside the container) and for deciding whether it is one."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path

import pytest

from tests.polling import poll

MACHINED_VARLINK = "/run/systemd/machine/io.systemd.Machine"


def pid1_name() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "?"


@cache
def why_no_systemd() -> str | None:
    """None when this is a real systemd system (machined installed, running or not), else the reason."""
    if pid1_name() != "systemd" or not Path("/run/systemd/system").is_dir():
        return (f"needs a real systemd as PID 1 (PID 1 here is {pid1_name()!r}); "
                "run `make test-systemd` to run these in a systemd 257/262 container")
    if not Path("/usr/lib/systemd/systemd-machined").exists():
        return "systemd-machined is not installed (package systemd-container)"
    return None


@cache
def systemd_version() -> int:
    """The running systemd's version (252 on bookworm, 257 on trixie, 262 on forky); 0 where there is none."""
    from vmspawnd.systemd.unitfile import host_systemd_version

    return host_systemd_version() or 0


#: machinectl poweroff/reboot/terminate go through the VM's control socket (io.systemd.MachineInstance)
CONTROL_SOCKETS = 261


def sh(*argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure the assertion shows both streams."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check:
        assert p.returncode == 0, f"{argv} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def unit_properties(unit: str, *props: str) -> dict[str, str]:
    out = sh("systemctl", "show", f"--property={','.join(props)}", unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_inactive(unit: str, timeout: float = 30) -> None:
    """PID 1 deactivates a unit (an emptied scope, a helper bound to it) a moment after the fact."""
    poll(lambda: unit_properties(unit, "ActiveState").get("ActiveState", ""), lambda s: s in ("inactive", ""),
         timeout)


def journal(*args: str) -> str:
    return sh("journalctl", "--no-pager", *args).stdout


def wait_journal(text: str, *args: str, timeout: float = 15) -> str:
    """journald stores messages asynchronously: wait until one containing ``text`` is there."""
    return poll(lambda: journal(*args), lambda j: text in j, timeout)


class Spawned:
    """A foreground ``vmspawn`` whose output is collected as it comes (a full pipe never blocks it)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._chunks.append(line)

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """The output so far, once it contains ``text`` (fails at once if vmspawn exits without it)."""
        out = poll(lambda: self.output, lambda out: text in out or self.proc.poll() is not None, timeout)
        if text not in out:
            out = self.wait(10)
        assert text in out, f"vmspawn exited ({self.proc.returncode}) without printing {text!r}:\n{out}"
        return out

    def wait(self, timeout: float = 90) -> str:
        """Wait for the exit; the whole output."""
        self.proc.wait(timeout)
        self._reader.join(10)
        return self.output

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM (ACPI power-off), a second one if the guest ignores it for 2 s (forced); the output."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(10)


def varlink_call(path: str, method: str, parameters: dict | None = None, more: bool = False,
                 timeout: float = 10) -> list[dict]:
    """A raw varlink call (NUL-terminated JSON over a unix socket): every reply, in order."""
    request: dict = {"method": method, "parameters": parameters or {}}
    if more:
        request["more"] = True
    replies: list[dict] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\0")
        buf = b""
        while True:
            chunk = s.recv(65536)
            assert chunk, f"{path} closed the connection after {replies}"
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                reply = json.loads(msg)
                replies.append(reply)
                if "error" in reply or not reply.get("continues"):
                    return replies


def machined_record(name: str) -> dict | None:
    """What machined knows of ``name``, in its varlink interface's terms (``io.systemd.Machine.List``);
    where machined has no varlink (systemd < 256), the same fields from ``machinectl show`` (D-Bus).
    None while it knows no such machine, or is not running."""
    from vmspawnd.systemd.machined import MACHINED_VARLINK_SINCE

    if systemd_version() >= MACHINED_VARLINK_SINCE:
        try:
            (reply,) = varlink_call(MACHINED_VARLINK, "io.systemd.Machine.List", {"name": name})
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        return None if "error" in reply else reply["parameters"]
    p = sh("machinectl", "show", name, check=False)
    if p.returncode != 0:
        return None
    shown = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    record = {"name": shown["Name"], "class": shown["Class"], "service": shown["Service"], "unit": shown["Unit"],
              "leader": {"pid": int(shown["Leader"])}}
    if shown.get("RootDirectory"):
        record["rootDirectory"] = shown["RootDirectory"]
    return record


def service_type() -> str:
    """vmspawnd.service's Type= as installed for this systemd (vmspawnd.systemd.unitfile)."""
    from vmspawnd.systemd.unitfile import NOTIFY_RELOAD_SINCE

    return "notify-reload" if systemd_version() >= NOTIFY_RELOAD_SINCE else "notify"


def varlinkctl() -> list[str]:
    """``varlinkctl``, or where systemd has none (< 255) tests/systemd/varlink_cli.py, which calls alike."""
    if shutil.which("varlinkctl"):
        return ["varlinkctl"]
    return [sys.executable, str(Path(__file__).with_name("varlink_cli.py"))]


def json_stream(text: str) -> list[dict]:
    """Parse concatenated JSON values (varlinkctl --more prints one object after another)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
    return out


# ----------------------------------------------------------------------------- VMs through the daemon
GUEST_DIR = Path(os.environ.get("VMSPAWND_TEST_GUEST_DIR", "/nonexistent"))
#: the marks of a systemd-tier test that boots the test guest
WITH_GUEST = [
    pytest.mark.systemd,
    pytest.mark.skipif(not (GUEST_DIR / "vmlinuz").is_file(),
                       reason="no test guest bound in ($VMSPAWND_TEST_GUEST_DIR; `make test-systemd` binds the "
                              "host's vmspawnd.testing.guest build)"),
]


NAME = "sysd1"
TPM_UNIT = f"vmspawnd-{NAME}-tpm.service"


class Ctl:
    def __init__(self, bindir: Path) -> None:
        self.argv = [str(bindir / "vmspawnctl")]

    def __call__(self, *args: str, check: bool = True):
        return sh(*self.argv, *args, check=check, timeout=90)

    def status(self, name: str = NAME) -> dict:
        return json.loads(self("--json", "status", name).stdout)

    def wait(self, predicate, name: str = NAME, timeout: float = 60) -> dict:
        return poll(lambda: self.status(name), predicate, timeout)


def unwanted_libraries(pid: int) -> list[str]:
    """The shared objects mapped into process ``pid`` that vmspawnd keeps out of the daemon: OpenSSL's
    (dbus-fast's and docs_url's imports would load them, vmspawnd/lean.py; ≈ 6 MB resident for the
    daemon's life with Python 3.14) and shutil's zstd (vmspawnd/cli/__init__.py)."""
    libraries = {Path(line.split()[-1]).name for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                 if ".so" in line}
    return sorted(name for name in libraries if name.startswith(("libcrypto.", "libssl.", "_zstd.")))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def qemu_cgroup(pid: int) -> str:
    """The process's cgroup2 path (the container's hierarchy is unified)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(Path(f"/proc/{pid}/cgroup").read_text())


def pids_of(comm: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == comm and alive(int(p.name)):
                    out.append(int(p.name))
            except OSError:
                pass
    return out




def console_while_away(runtime_dir: Path, marker: bytes, linger: float, timeout: float = 90) -> bytes:
    """What the guest prints on its console while no daemon relays it (read from QEMU's console socket
    in the VM's runtime dir): until ``marker``, and ``linger`` seconds more."""
    deadline, until = time.monotonic() + timeout, None
    seen = b""
    with socket.socket(socket.AF_UNIX) as console:
        console.connect(str(runtime_dir / "console.sock"))
        while time.monotonic() < (until or deadline):
            console.settimeout(max(0.01, (until or deadline) - time.monotonic()))
            try:
                data = console.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            seen += data
            if until is None and marker in seen:
                until = time.monotonic() + linger
    assert marker in seen, f"the guest never printed {marker!r}: {seen.decode(errors='replace')[-2000:]}"
    return seen
