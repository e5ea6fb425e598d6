# SPDX-License-Identifier: LGPL-2.1-or-later
"""The interactive console as a person uses it: in a real terminal (tmux)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.polling import poll
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = [pytest.mark.vm, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")]


class Tmux:
    def __init__(self, session: str) -> None:
        self.session = session

    def start(self, command: str) -> None:
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", command],
                       check=True)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, *keys], check=True)

    def screen(self) -> str:
        p = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.session, "-S", "-200"], capture_output=True,
                           text=True)
        return p.stdout

    def wait_for(self, text: str, timeout: float = 60) -> str:
        return poll(self.screen, lambda screen: text in screen, timeout)

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)


@pytest.fixture
def tmux():
    t = Tmux(f"vmspawnd-test-{time.monotonic_ns()}")
    yield t
    t.kill()


def vmspawn_command(guest, tmp_path, *extra: str) -> str:
    argv = [sys.executable, "-m", "vmspawnd.cli.vmspawn", f"--linux={guest.kernel}", f"--initrd={guest.initrd}",
            "--ram=256M", "-M", "interactive", "--background=44", "--firmware=bios", *extra, "panic=-1",
            "test.action=shell"]
    # after vmspawn: report its exit status and whether the terminal is back in cooked mode
    return (f"cd {shlex.quote(str(tmp_path))}; RUNTIME_DIRECTORY={shlex.quote(str(tmp_path))} {shlex.join(argv)};"
            " echo EXIT=$?; stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon | sed 's/^/MODE=/'; sleep 600")


def test_type_into_the_guest_shell_then_ctrl_bracket_three_times(tmux, guest, tmp_path):
    tmux.start(vmspawn_command(guest, tmp_path))
    tmux.wait_for("Press Ctrl-] three times")
    tmux.wait_for("starting a shell on the console", timeout=60)
    time.sleep(0.5)
    title = subprocess.run(["tmux", "display", "-p", "-t", tmux.session, "#{pane_title}"], capture_output=True,
                           text=True).stdout
    assert title.startswith("Virtual Machine interactive on ")  # our window title
    tmux.keys("echo answer-$((6*7))", "Enter")
    tmux.wait_for("answer-42")
    tmux.keys("C-]", "C-]")  # two presses and a pause do nothing
    time.sleep(1.5)
    tmux.keys("echo still-$((1+1))", "Enter")
    tmux.wait_for("still-2")
    tmux.keys("C-]", "C-]", "C-]")
    screen = tmux.wait_for("MODE=", timeout=20)
    assert "EXIT=0" in screen
    assert "MODE=icanon" in screen  # the terminal was restored
    lines = screen.splitlines()
    assert "EXIT=0" in lines  # what follows vmspawn starts at column 0
    assert not [line for line in lines if line.startswith("vmspawn:") or "[info" in line], screen  # no log noise


def test_guest_shell_exit_ends_vmspawn_with_its_status(tmux, guest, tmp_path):
    tmux.start(vmspawn_command(guest, tmp_path, "test.notify=1", "test.exit=3"))
    tmux.wait_for("starting a shell on the console", timeout=60)
    time.sleep(0.5)
    tmux.keys("exit", "Enter")
    screen = tmux.wait_for("MODE=", timeout=30)
    assert "EXIT=3" in screen  # the guest powered off and reported EXIT_STATUS=3
    assert "MODE=icanon" in screen


def test_native_console_is_qemus_own_with_ctrl_a_x(tmux, guest, tmp_path):
    argv = [sys.executable, "-m", "vmspawnd.cli.vmspawn", f"--linux={guest.kernel}", f"--initrd={guest.initrd}",
            "--ram=256M", "-M", "native", "--firmware=bios", "--console=native", "panic=-1", "test.action=shell"]
    tmux.start(f"cd {shlex.quote(str(tmp_path))}; RUNTIME_DIRECTORY={shlex.quote(str(tmp_path))} "
               f"{shlex.join(argv)}; echo EXIT=$?; sleep 600")
    tmux.wait_for("Press Ctrl-a x to kill VM")
    tmux.wait_for("starting a shell on the console", timeout=60)
    time.sleep(0.5)
    tmux.keys("echo native-$((3*3))", "Enter")
    tmux.wait_for("native-9")
    tmux.keys("C-a", "x")
    screen = tmux.wait_for("EXIT=", timeout=30)
    assert "QEMU: Terminated" in screen  # QEMU's own mux handled Ctrl-a x
    assert "EXIT=0" in screen


def test_vmspawnctl_console_attaches_types_and_detaches(tmux, guest, daemon):
    p = daemon.ctl("create", "shellvm", f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                   "--firmware=bios", *GUEST_WORDS, "test.action=shell")
    assert p.returncode == 0, p.stderr
    assert daemon.ctl("start", "shellvm").returncode == 0
    daemon.wait_for("shellvm", lambda s: s["ready"])
    tmux.start(f"{shlex.join([*daemon.ctl_argv(), 'console', 'shellvm'])}; echo EXIT=$?; sleep 600")
    tmux.wait_for("Attached to shellvm")
    tmux.wait_for("starting a shell on the console")  # scrollback: what the guest printed before we came
    time.sleep(0.3)
    tmux.keys("echo via-daemon-$((20+22))", "Enter")
    tmux.wait_for("via-daemon-42")
    tmux.keys("C-]", "C-]", "C-]")
    screen = tmux.wait_for("EXIT=", timeout=20)
    assert "EXIT=0" in screen
    assert daemon.status("shellvm")["state"] == "running"  # detaching does not stop the VM
    daemon.ctl("kill", "shellvm")
