# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the commands load while they start (vmspawnd/cli/__init__.py, cli/vmspawn.py), each in a
fresh interpreter as a command starts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vmspawnd.cli import COMMANDS


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_the_commands_load_no_tls_or_libcrypto_until_something_asks_for_it() -> None:
    assert python("import sys, vmspawnd.cli.vmspawnd, vmspawnd.cli.vmspawnctl, vmspawnd.cli.foreground; "
                  "print('ssl' in sys.modules, '_hashlib' in sys.modules)") == "False False"
    # a name that needs hashing gets the same digest as ever, by Python's own SHA-256 (vmspawnd/lean.py)
    assert python("import sys, vmspawnd.qemu.argv as argv; print(argv.tap_mac('web', {}), '_hashlib' in sys.modules)"
                  ) == "02:c8:aa:43:03:12 False"
    # nor does dbus-fast (it imports hashlib) where we import it, and hashlib still hashes for anyone after
    assert python("import sys, vmspawnd.cli.vmspawnd, vmspawnd.systemd.units as units, asyncio; "
                  "asyncio.run(units.connect_systemd(1, address='unix:path=/nonexistent/bus')); "
                  "import hashlib; "
                  "print('dbus_fast' in sys.modules, '_hashlib' in sys.modules, hashlib.sha1(b'x').hexdigest()[:8], "
                  "hashlib.new('sha256', b'x').hexdigest()[:8])") == "True False 11f6ad8e 2d711642"
    # QMP's client (each run) does not load it either (vmspawnd/qemu/qmp.py), and ssl itself still works after it
    assert python("import sys, vmspawnd.cli.vmspawnd, vmspawnd.qemu.qmp as qmp; qmp.Qmp('web'); "
                  "print('ssl' in sys.modules, '_ssl' in sys.modules, '_hashlib' in sys.modules)"
                  ) == "False False False"
    assert python("import vmspawnd.cli.vmspawnd, vmspawnd.qemu.qmp as qmp; qmp.Qmp('web'); import ssl; "
                  "print(ssl.OPENSSL_VERSION[:7], ssl.SSLContext.__module__)") == "OpenSSL ssl"
    # nor does a machine's --property= being checked (a Create, vmspawn) where no scope is started: it is
    # made into D-Bus variants only when the scope is (vmspawnd/systemd/properties.py)
    assert python("import sys, vmspawnd.cli.vmspawnd, vmspawnd.settings as s; "
                  "c = s.config_from_json('web', {'linux': '/boot/vmlinuz', 'properties': ['TasksMax=10', "
                  "'MemoryMax=1G', 'AllowedCPUs=0-1']}); "
                  "print(c.properties, 'dbus_fast' in sys.modules, '_hashlib' in sys.modules)"
                  ) == "('TasksMax=10', 'MemoryMax=1G', 'AllowedCPUs=0-1') False False"


def test_the_commands_load_no_bz2_lzma_or_zstd_and_both_still_work_when_asked_for(tmp_path) -> None:
    # (vmspawnd/cli/__init__.py: shutil imports them only for archive formats no command uses)
    assert python("import sys, vmspawnd.cli.vmspawnd, vmspawnd.cli.vmspawnctl, vmspawnd.cli.foreground; "
                  "print([m for m in ('bz2', '_bz2', 'lzma', '_lzma', 'compression.zstd', '_zstd') "
                  "if m in sys.modules])") == "[]"
    source, copy = tmp_path / "nvram", tmp_path / "copy"
    source.write_bytes(b"vars")
    assert python(f"import vmspawnd.cli, shutil, bz2, lzma; shutil.copyfile({str(source)!r}, {str(copy)!r}); "
                  "print(lzma.decompress(lzma.compress(bz2.decompress(bz2.compress(b'ok')))).decode())") == "ok"
    assert copy.read_bytes() == b"vars"


def test_the_commands_load_no_libuuid_and_still_make_random_uuids() -> None:
    # (vmspawnd/cli/__init__.py: uuid imports it only for time-based UUIDs, which no command makes)
    assert python("import sys, vmspawnd.cli.vmspawnd, vmspawnd.cli.vmspawnctl, vmspawnd.cli.foreground, uuid; "
                  "a, b = uuid.uuid4(), uuid.uuid4(); "
                  "print('_uuid' in sys.modules, a != b, a.version, a.variant == uuid.RFC_4122)") == "False True 4 True"


def test_vmspawn_loads_no_structlog_before_it_has_something_to_log() -> None:
    # (vmspawnd/log.py: a logger imports it for the first event that reaches the level)
    assert python("import sys, vmspawnd.cli.vmspawnctl, vmspawnd.cli.foreground; "
                  "print('structlog' in sys.modules)") == "False"


def test_asyncio_without_tls_still_serves_and_connects_over_unix_sockets(tmp_path) -> None:
    sock = tmp_path / "echo.sock"
    assert python(f"""
import vmspawnd.cli, asyncio
async def main():
    async def echo(reader, writer):
        writer.write(await reader.readline()); await writer.drain(); writer.close()
    server = await asyncio.start_unix_server(echo, {str(sock)!r})
    reader, writer = await asyncio.open_unix_connection({str(sock)!r})
    writer.write(b"over a unix socket\\n")
    print((await reader.readline()).decode().strip())
    writer.close(); server.close()
asyncio.run(main())
""") == "over a unix socket"


@pytest.mark.parametrize(("script", "expected"), [("/usr/bin/vmspawn", "False True True"),
                                                   ("/usr/bin/pytest", "True True False")])
def test_vmspawn_collects_garbage_again_once_its_modules_are_loaded(script: str, expected: str) -> None:
    # (run as the command, the collector is off while vmspawn's modules load, and what they made is frozen;
    # imported by another program, as pytest imports it, its collector is left alone)
    assert python(f"""
import gc, sys
sys.argv[0] = {script!r}
import vmspawnd.cli.foreground as foreground, vmspawnd.cli.vmspawn as vmspawn
print(gc.isenabled(), end=" ")
def report(launcher=None):
    print(gc.isenabled(), gc.get_freeze_count() > 0)
    if launcher: import os; os.close(launcher[1]); os.waitpid(launcher[0], 0)
    return 0
foreground.main = report
vmspawn.main()
""") == expected


def test_every_installed_command_is_started_as_one() -> None:
    # (cli/__init__.py knows a command's start by its script's name: a command added to pyproject.toml's
    # scripts and not there would load its modules with the collector on)
    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)


def test_a_daemon_started_by_hand_loads_no_libsystemd(daemon) -> None:
    # (cli/vmspawnd.py activated_fds: without $LISTEN_FDS, systemd-python's listen_fds has nothing to
    # find; libsystemd is ≈ 0.85 MB of the daemon's memory.  Socket-activated, it is loaded: the systemd tier)
    assert daemon.ctl("list").returncode == 0  # (serving)
    assert daemon.proc is not None
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    assert "libsystemd" not in maps and "python3" in maps


def test_the_commands_load_no_tempfile_random_or_ctypes() -> None:
    # (a helper's output file is made by services/runner.py's unnamed_file, random CIDs come from os.urandom;
    # ctypes comes with the first call that needs the C library, proc.libc)
    assert python("import sys, vmspawnd.cli.vmspawnd, vmspawnd.cli.vmspawnctl, vmspawnd.cli.foreground, "
                  "vmspawnd.manager, vmspawnd.api; "
                  "print([m for m in ('tempfile', 'random', 'ctypes') if m in sys.modules])") == "[]"


CONTROL_LISTENER = """
import asyncio, json, socket, sys, tempfile
from pathlib import Path
import vmspawnd.cli.foreground, vmspawnd.run
from vmspawnd.systemd.control import ControlListener

class Run:  # (what a run offers its control socket: Describe asks only this)
    async def describe(self):
        return True, "running"

def call(path, method):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps({"method": method}).encode() + b"\\0")
        reply = b""
        while not reply.endswith(b"\\0"):
            reply += s.recv(65536)
    return json.loads(reply[:-1])

async def main():
    path = Path(tempfile.mkdtemp()) / "control"
    async with ControlListener(path, Run()):
        print(path.is_socket(), "asyncvarlink" in sys.modules)
        reply = await asyncio.to_thread(call, str(path), "io.systemd.MachineInstance.Describe")
        print(reply["parameters"], "asyncvarlink" in sys.modules)
        reply = await asyncio.to_thread(call, str(path), "io.systemd.MachineInstance.Describe")
        print(reply["parameters"]["status"])
    try:
        call(str(path), "io.systemd.MachineInstance.Describe")
    except OSError as e:
        print(type(e).__name__)

asyncio.run(main())
"""


def test_a_vms_control_socket_listens_from_the_start_and_loads_its_server_only_when_called() -> None:
    # (vmspawnd/systemd/control.py: asyncvarlink and the interface are ≈ 10 ms of imports, a tenth of what
    # vmspawn uses; most VMs are never called; a call answers as before, the first one too)
    assert python(CONTROL_LISTENER).splitlines() == [
        "True False", "{'running': True, 'status': 'running'} True", "running", "ConnectionRefusedError"]
