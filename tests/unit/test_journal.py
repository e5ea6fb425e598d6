# SPDX-License-Identifier: LGPL-2.1-or-later
"""--forward-journal: settings, the journal-remote helper's argv and environment, and its wiring.

These wiring tests run stand-ins named like the two programs, which record what they were
started with; the real pair receiving a real guest's entries over vhost-device-vsock is in
tests/vm/test_vsock.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import VMSPAWN
from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.options import parse_vmspawn_args
from vmspawnd.plan import LaunchPlan
from vmspawnd.qemu.firmware import FirmwareChoice, FirmwareKind
from vmspawnd.qemu.vsock import GuestVsock, VsockBackend
from vmspawnd.services.journal import JournalLimits, journal_remote_spec
from vmspawnd.services.runner import ChildRunner, ServiceSpec, transient_unit_properties
from vmspawnd.services.setup import AuxServiceError, start_aux_services
from vmspawnd.settings import config_from_json, config_to_json
from vmspawnd.values import Tristate

RECORDER = """#!{python}
import json, os, sys, time
with open({record!r}, "w") as f:
    json.dump({{"argv": sys.argv, "config": os.environ.get("SYSTEMD_JOURNAL_REMOTE_CONFIG_FILE")}}, f)
time.sleep(60)
"""


@pytest.fixture
def stand_ins(tmp_path, monkeypatch) -> Path:
    """systemd-socket-activate and systemd-journal-remote stand-ins on $PATH; returns the record file."""
    bindir, record = tmp_path / "bin", tmp_path / "record.json"
    bindir.mkdir()
    for name in ("systemd-socket-activate", "systemd-journal-remote"):
        (bindir / name).write_text(RECORDER.format(python=sys.executable, record=str(record)))
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return record


KERNEL_4711 = GuestVsock(VsockBackend.KERNEL, 4711)


def test_argv_listens_on_the_guest_cid_and_picks_the_split_mode(tmp_path, stand_ins):
    spec = journal_remote_spec("vm", KERNEL_4711, tmp_path / "logs" / "vm.journal", JournalLimits(max_use=1 << 30,
                                                                                             max_files=3))
    bindir = stand_ins.parent / "bin"
    assert spec.argv == (str(bindir / "systemd-socket-activate"), "--listen=vsock:2:4711",
                         "--setenv=SYSTEMD_JOURNAL_REMOTE_CONFIG_FILE=/dev/null",
                         str(bindir / "systemd-journal-remote"), f"--output={tmp_path / 'logs' / 'vm.journal'}",
                         "--split-mode=none", "--max-use=1073741824", "--max-files=3")
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o755  # a file's parent is made
    assert spec.env == {"SYSTEMD_JOURNAL_REMOTE_CONFIG_FILE": "/dev/null"}
    directory = journal_remote_spec("vm", GuestVsock(VsockBackend.KERNEL, 9), tmp_path / "dir", JournalLimits())
    assert directory.argv[-1] == "--split-mode=host" and (tmp_path / "dir").is_dir()
    hybrid = GuestVsock(VsockBackend.VHOST_USER, 9, socket=tmp_path / "vsock")
    assert journal_remote_spec("vm", hybrid, tmp_path / "dir", JournalLimits()).argv[1] == \
        f"--listen={tmp_path / 'vsock_1000002'}"  # where vhost-device-vsock delivers a connection to port 9


def test_transient_units_carry_the_environment():
    props = dict(transient_unit_properties(ServiceSpec("x", ("/bin/true",), env={"A": "1", "B": "two"})))
    assert props["Environment"].value == ["A=1", "B=two"]
    assert "Environment" not in dict(transient_unit_properties(ServiceSpec("x", ("/bin/true",))))


#: what the host offers a direct kernel boot without shares (no host is looked at)
NO_SHARES = LaunchPlan(FirmwareChoice(FirmwareKind.NONE, reason="test"), uki=False, virtiofsd=None)


async def test_aux_services_start_journal_remote_and_hand_the_guest_its_address(tmp_path, stand_ins):
    config = MachineConfig(name="jr", linux=Path("/vmlinuz"), tpm=Tristate.NO,
                           forward_journal=tmp_path / "out", forward_journal_keep_free=1 << 20)
    runner = ChildRunner(die_with_parent=True)
    aux = await start_aux_services(config, NO_SHARES, runner, tmp_path, vsock=GuestVsock(VsockBackend.KERNEL, 1234))
    try:
        assert dict(aux.credentials)["journal.forward_to_socket"] == b"vsock:2:1234"
        assert [what for what, _ in aux.services] == ["journal-remote"]
        for _ in range(200):
            if stand_ins.exists() and stand_ins.read_text():
                break
            await asyncio.sleep(0.02)
        seen = json.loads(stand_ins.read_text())
        assert seen["argv"][1:] == ["--listen=vsock:2:1234", "--setenv=SYSTEMD_JOURNAL_REMOTE_CONFIG_FILE=/dev/null",
                                    str(stand_ins.parent / "bin" / "systemd-journal-remote"),
                                    f"--output={tmp_path / 'out'}", "--split-mode=host", "--keep-free=1048576"]
        assert seen["config"] == "/dev/null"
    finally:
        for _, svc in aux.services:
            await svc.stop()


async def test_without_vsock_nothing_starts(tmp_path):
    config = MachineConfig(name="jr", linux=Path("/vmlinuz"), forward_journal=tmp_path / "out")
    with pytest.raises(AuxServiceError, match="needs vsock"):
        await start_aux_services(config, NO_SHARES, ChildRunner(), tmp_path, vsock=None)


def test_limits_need_forward_journal_and_round_trip(tmp_path, stand_ins):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    with pytest.raises(ConfigError) as e:
        parse_vmspawn_args([f"--linux={kernel}", "--forward-journal-max-use=1G"])
    assert e.value.field == "forward-journal-max-use"
    with pytest.raises(ConfigError, match="forward-journal-max-files"):
        parse_vmspawn_args([f"--linux={kernel}", "--forward-journal=/x", "--forward-journal-max-files=0"])
    config = parse_vmspawn_args([f"--linux={kernel}", "-M", "jr", "--forward-journal=logs/vm.journal",
                                 "--forward-journal-max-file-size=64M", "--forward-journal-max-files=4"])
    assert config.forward_journal == Path.cwd() / "logs" / "vm.journal"
    data = config_to_json(config)
    assert (data["forwardJournalMaxFileSize"], data["forwardJournalMaxFiles"]) == (64 << 20, 4)
    again = config_from_json("jr", data)
    assert (again.forward_journal, again.forward_journal_max_files) == (config.forward_journal, 4)
    with pytest.raises(ConfigError, match="forwardJournalMaxUse"):
        config_from_json("jr", {**data, "forwardJournalMaxUse": -1})


def test_vmspawn_refuses_forward_journal_clearly_here(tmp_path, stand_ins):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    argv = [*VMSPAWN, f"--linux={kernel}", "-M", "jr", "--vsock=no", f"--forward-journal={tmp_path / 'out'}"]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p.stderr
    assert "forward-journal" in p.stderr and "needs vsock" in p.stderr and "Traceback" not in p.stderr
    assert not stand_ins.exists()  # nothing was started
