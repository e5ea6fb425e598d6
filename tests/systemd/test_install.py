# SPDX-License-Identifier: LGPL-2.1-or-later
"""``make install`` on a real systemd host: the commands land on PATH and the installed unit runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.polling import poll
from tests.systemd.helpers import GUEST_DIR, WITH_GUEST, sh, unit_properties
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = WITH_GUEST  # a user boots the test guest with the installed commands

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("vmspawn", "vmspawnctl", "vmspawnd")


def a_user_runs_a_vm_with_the_installed_commands(env: dict[str, str]) -> None:
    """carol, who is not root, defines, starts and stops her own VM with the installed vmspawnctl."""
    if sh("id", "carol", check=False).returncode != 0:
        sh("useradd", "--create-home", "carol")
    home = Path("/home/carol")
    shutil.copy(GUEST_DIR / "vmlinuz", home / "vmlinuz")
    shutil.copy(GUEST_DIR / "initrd.img", home / "initrd.img")
    sh("chown", "carol:carol", str(home / "vmlinuz"), str(home / "initrd.img"))

    def as_carol(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("setpriv", "--reuid=carol", "--regid=carol", "--init-groups", "vmspawnctl", *args,
                  env={**env, "HOME": str(home)}, check=check, timeout=120)

    as_carol("create", "carols", f"--linux={home / 'vmlinuz'}", f"--initrd={home / 'initrd.img'}", "--ram=256M",
             "--firmware=bios", *GUEST_WORDS, "test.action=acpi")
    as_carol("start", "carols")
    status = poll(lambda: as_carol("status", "carols").stdout, lambda out: "(ready)" in out or "failed" in out, 90)
    assert "running (ready)" in status and "Owner: carol (" in status, status
    assert "carols" in sh("vmspawnctl", "list", env=env).stdout  # root sees it too
    as_carol("stop", "carols")
    as_carol("remove", "carols")


def test_make_install_puts_the_commands_on_path_and_the_unit_runs_them(tmp_path: Path) -> None:
    src = tmp_path / "src"  # the checkout is read-only here: build from a copy
    src.mkdir()
    subprocess.run(f"tar -C {REPO} --exclude=./.venv --exclude=./.git --exclude=./build -cf - . | tar -C {src} -xf -",
                   shell=True, check=True)
    env = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        sh("make", "--no-print-directory", "-C", str(src), "install", "PYTHON=python3", timeout=900, env=env)
        for command in COMMANDS:
            assert shutil.which(command, path=env["PATH"]) == f"/usr/local/bin/{command}"
        sh("systemctl", "start", "vmspawnd.socket")
        out = sh("vmspawnctl", "list", env=env).stdout  # activates vmspawnd.service through its socket
        assert "0 machine(s) listed." in out
        main_pid = unit_properties("vmspawnd.service", "MainPID")["MainPID"]
        cmdline = Path(f"/proc/{main_pid}/cmdline").read_bytes().split(b"\0")
        assert b"/usr/local/bin/vmspawnd" in cmdline, cmdline  # the installed copy, not the checkout
        a_user_runs_a_vm_with_the_installed_commands(env)
    finally:
        sh("systemctl", "stop", "vmspawnd.socket", "vmspawnd.service", check=False)
        sh("make", "--no-print-directory", "-C", str(src), "uninstall", timeout=300, env=env, check=False)
    for command in COMMANDS:
        assert not Path(f"/usr/local/bin/{command}").exists()
    assert not Path("/usr/local/lib/vmspawnd").exists()
