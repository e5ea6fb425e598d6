# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnctl's conventions (machinectl/systemctl-like) against a live daemon, without VMs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CTL
from vmspawnd.log import command_level, parse_level


@pytest.fixture
def defined(daemon, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    p = daemon.ctl("create", "web", f"--linux={kernel}", "--firmware=bios")
    assert p.returncode == 0, p.stderr
    return daemon


def test_create_prints_what_it_did_and_no_log_lines(daemon, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    p = daemon.ctl("create", "quiet", f"--linux={kernel}")  # default firmware: descriptors are looked at
    assert p.returncode == 0 and p.stdout == "Created quiet.\n" and p.stderr == "", (p.stdout, p.stderr)


def test_no_command_lists(defined):
    p = defined.ctl()
    assert p.returncode == 0 and p.stdout.splitlines()[0].split() == ["NAME", "STATE", "READY", "PID", "SINCE"]
    assert "web" in p.stdout and "1 machine(s) listed." in p.stdout


def test_no_legend_drops_header_and_footer(defined):
    p = defined.ctl("list", "--no-legend")
    assert p.returncode == 0 and p.stdout.split()[:2] == ["web", "stopped"] and "listed" not in p.stdout


@pytest.mark.parametrize("words", [["--json", "list"], ["list", "--json"], ["--json=short", "list"],
                                   ["list", "--json=short"]])
def test_json_before_or_after_the_command(defined, words):
    p = defined.ctl(*words)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1
    assert [m["name"] for m in json.loads(p.stdout)] == ["web"]


def test_json_pretty_and_off(defined):
    pretty = defined.ctl("status", "web", "--json=pretty")
    assert pretty.returncode == 0 and pretty.stdout.startswith("{\n  ")
    assert json.loads(pretty.stdout)["name"] == "web"
    assert "varlink_json" not in json.loads(pretty.stdout)  # the interface's fields only
    off = defined.ctl("--json=off", "status", "web")
    assert off.returncode == 0 and off.stdout.startswith("● web")


@pytest.mark.parametrize("where", ["before", "after"])
def test_create_prints_json_with_json_before_or_after_the_command(daemon, tmp_path, where):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    words = ["create", "made", f"--linux={kernel}", "--firmware=bios"]
    p = daemon.ctl(*(["--json", *words] if where == "before" else [*words, "--json"]))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["name"] == "made" and json.loads(p.stdout)["config"]["linux"] == str(kernel)
    bad = daemon.ctl("create", "other", f"--linux={kernel}", "--json=bogus")
    assert bad.returncode == 2 and "--json: expected one of" in bad.stderr, bad.stderr


@pytest.mark.parametrize("words", [["--json=bogus", "list"], ["--log-level=loud", "list"]])
def test_bad_output_options_are_usage_errors(daemon, words):
    p = daemon.ctl(*words)
    assert p.returncode == 2 and "vmspawnctl" in p.stderr and "Traceback" not in p.stderr


def test_no_pager_quiet_and_verbose_are_accepted_before_or_after_the_command(defined):
    for words in (["--no-pager", "list"], ["list", "--no-pager"], ["-q", "list"], ["list", "-v"],
                  ["--log-level=debug", "list"], ["list", "--log-level=err"]):
        p = defined.ctl(*words)
        assert p.returncode == 0 and "web" in p.stdout, (words, p.stderr)


def test_events_of_an_unknown_machine_fail_at_once(daemon):
    p = daemon.ctl("events", "nope", timeout=10)
    assert p.returncode == 1 and "no machine named nope" in p.stderr


def test_a_signal_that_is_none_is_a_usage_error_before_the_daemon_is_asked(tmp_path):
    p = subprocess.run([*CTL, f"--address={tmp_path / 'nobody.sock'}", "kill", "web", "--signal=SIGFOO"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "invalid signal=SIGFOO" in p.stderr and "cannot reach" not in p.stderr, p.stderr


def _following(daemon) -> subprocess.Popen[str]:
    """``vmspawnctl events``, once it says it watches."""
    p = subprocess.Popen([*daemon.ctl_argv(), "events"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None and "Watching all machines" in p.stderr.readline()
    return p


def test_ctrl_c_ends_following_events_with_success(daemon):
    p = _following(daemon)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 0 and "Traceback" not in p.stderr.read()


def test_events_ended_by_the_daemon_fail_and_say_why(daemon):
    p = _following(daemon)
    daemon.stop_daemon()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "unsubscribed" in out, (out, err)
    assert "no longer watching: vmspawnd is stopping" in err, err


@pytest.mark.parametrize("text,level", [("debug", logging.DEBUG), ("7", logging.DEBUG), ("info", logging.INFO),
                                        ("notice", logging.INFO), ("WARNING", logging.WARNING),
                                        ("err", logging.ERROR), ("3", logging.ERROR), ("emerg", logging.CRITICAL)])
def test_systemd_log_levels(text, level):
    assert parse_level(text) == level


def test_the_level_of_a_command(monkeypatch):
    monkeypatch.delenv("SYSTEMD_LOG_LEVEL", raising=False)
    assert command_level() == logging.WARNING  # quiet by default
    assert command_level(verbose=True) == logging.INFO
    assert command_level(quiet=True) == logging.ERROR
    monkeypatch.setenv("SYSTEMD_LOG_LEVEL", "debug")
    assert command_level() == logging.DEBUG
    assert command_level(option="err") == logging.ERROR  # the option wins
    with pytest.raises(ValueError, match="unknown log level"):
        parse_level("loud")


@pytest.fixture
def sshd(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("sshd needs root (privilege separation, port forwarding to root's socket)")
    from tests.sshd import Sshd

    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


def test_host_drives_the_daemon_of_another_host_over_ssh(defined, sshd):
    env = {**os.environ, "SYSTEMD_SSH": str(sshd.ssh_command)}
    remote = [*defined.ctl_argv(), f"--host=root@127.0.0.1:{sshd.port}"]
    listed = subprocess.run([*remote, "--json", "list"], capture_output=True, text=True, env=env, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert listed.returncode == 0, listed.stderr + sshd.log.read_text()
    assert [m["name"] for m in json.loads(listed.stdout)] == ["web"]
    status = subprocess.run([*remote[:-1], "-H", f"root@127.0.0.1:{sshd.port}", "status", "web"],
                            capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert status.returncode == 0 and status.stdout.startswith("● web"), status.stderr
    gone = subprocess.run([*remote, "status", "nope"], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert gone.returncode == 1 and "no machine named nope" in gone.stderr
    nowhere = subprocess.run([*remote, f"--address={defined.socket}.gone", "list"], capture_output=True, text=True,
                             env=env, timeout=60, stdin=subprocess.DEVNULL)  # no daemon there
    assert nowhere.returncode == 1 and "Traceback" not in nowhere.stderr, nowhere.stderr
    assert f"cannot reach vmspawnd at {defined.socket}.gone on root@127.0.0.1: No such file" in nowhere.stderr


def test_an_ssh_command_that_cannot_run_is_named(daemon, tmp_path):
    p = subprocess.run([*daemon.ctl_argv(), "-H", "somewhere", "list"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, env={**os.environ, "SYSTEMD_SSH": str(tmp_path / "no-ssh")})
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert f"SYSTEMD_SSH={tmp_path / 'no-ssh'}: cannot run {tmp_path / 'no-ssh'}: No such file" in p.stderr, p.stderr


def test_host_that_cannot_be_reached_is_a_clear_error(daemon):
    p = subprocess.run([*daemon.ctl_argv(), "-H", "root@127.0.0.1:1", "list"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "SYSTEMD_SSH": "ssh"})
    assert p.returncode == 1 and "vmspawnctl:" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_no_daemon_at_the_address_says_how_to_start_one(tmp_path):
    gone = tmp_path / "vmspawnd.sock"
    p = subprocess.run([*CTL, f"--address={gone}", "list"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"cannot reach vmspawnd at {gone}: No such file or directory" in p.stderr, p.stderr
    assert "vmspawnd --socket=SOCKET" in p.stderr, p.stderr
    with socket.socket(socket.AF_UNIX) as stale:  # a socket nobody listens on any more
        stale.bind(str(gone))
    p = subprocess.run([*CTL, f"--address={gone}", "list"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "Connection refused (is a vmspawnd serving it?" in p.stderr, p.stderr


@pytest.mark.parametrize("address, port", [("garbage", "22"), ("vsock/abc", "22"), ("vsock/3", "-1"),
                                           ("vsock-mux/", "22")])
def test_vsock_proxy_names_a_bad_address_without_a_traceback(address: str, port: str) -> None:
    p = subprocess.run([*CTL, "vsock-proxy", address, port], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "expected vsock/CID or vsock-mux/SOCKET" in p.stderr and address in p.stderr
    assert "Traceback" not in p.stderr


def test_text_that_others_chose_cannot_drive_the_readers_terminal(daemon, tmp_path):
    # (a guest's status, a user's paths: shown escaped, as JSON shows them)
    kernel = tmp_path / "vmlinuz\x1b]0;owned\x07\x1b[31m"
    kernel.write_bytes(b"")
    assert daemon.ctl("create", "web", f"--linux={kernel}", "--firmware=bios").returncode == 0
    shown = daemon.ctl("status", "web").stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "vmlinuz\\x1b]0;owned\\x07\\x1b[31m" in shown, shown
    listed = json.loads(daemon.ctl("--json", "status", "web").stdout)
    assert listed["config"]["linux"] == str(kernel)  # JSON keeps the text as it is


def test_a_state_path_that_cannot_hold_the_state_is_refused_at_create(daemon, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_bytes(b"")
    for option, field, reason in (
            (f"--efi-nvram-state={tmp_path / 'dangling'}", "efi-nvram-state", "a symlink to nothing"),
            (f"--efi-nvram-state={tmp_path / 'adir'}", "efi-nvram-state", "exists but is not a regular file"),
            (f"--tpm-state={tmp_path / 'afile'}", "tpm-state", "exists but is not a directory")):
        p = daemon.ctl("create", "web", f"--linux={kernel}", "--firmware=bios", option)
        assert p.returncode == 1 and f"invalid {field}=" in p.stderr and reason in p.stderr, (option, p.stderr)
    assert not (tmp_path / "nowhere").exists()


# A stand-in for ssh that handles ProxyCommand as OpenSSH does: it lowercases the host it was given,
# expands %h, %p and %%, and runs the command with the shell, in its own working directory.
FAKE_SSH = r'''#!/usr/bin/env python3
import os, sys
args = sys.argv[1:]
options, rest = {}, []
while args:
    a = args.pop(0)
    if a == "-o":
        key, _, value = args.pop(0).partition("=")
        options[key] = value
    elif a in ("-i", "-l", "-p"):
        args.pop(0)
    else:
        rest.append(a)
host = rest[0].lower()
command = options["ProxyCommand"].replace("%%", "\0").replace("%h", host).replace("%p", "22").replace("\0", "%")
os.execv("/bin/sh", ["sh", "-c", command])
'''


def test_ssh_reaches_the_machine_named_exactly_and_runs_no_code_from_the_working_directory(tmp_path):
    """(``vmspawnctl ssh`` passed the address as ssh's %h, which ssh lowercases: MyVM's address named
    myvm's socket; and ran ``python -m``, which imported a ``vmspawnd`` package from the directory the
    caller stood in, as root.)"""
    ssh = tmp_path / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    hostile = tmp_path / "hostile"
    (hostile / "vmspawnd").mkdir(parents=True)
    marker = tmp_path / "hijacked"
    (hostile / "vmspawnd" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    address = f"vsock-mux/{tmp_path}/machines/MyVM/vsock"
    program = ("import sys, types; from vmspawnd.cli.vmspawnctl import ssh_into; "
               f"sys.exit(ssh_into(types.SimpleNamespace(name='MyVM', sshAddress={address!r}, sshKey=None), []))")
    p = subprocess.run([sys.executable, "-I", "-c", program], cwd=hostile, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "SYSTEMD_SSH": str(ssh)})
    assert not marker.exists(), "code from the working directory ran"
    assert f"cannot reach port 22 of {address}" in p.stderr, p.stderr


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's client (make setup installs it)")
def test_ssh_runs_its_proxy_from_a_python_whose_path_has_a_backslash_before_a_quote(tmp_path):
    """(The ProxyCommand named the interpreter quoted for the shell, which OpenSSH's own parser of
    ``-o`` refused when a backslash came before a quote: ``command-line line 0: invalid quotes``.)
    Here a real ssh runs the proxy from such a copy of our environment, and the proxy asks the
    vsock socket for port 22."""
    import socket
    import threading

    odd = tmp_path / "it\\'s %h"  # (a backslash, a quote, a space and one of ssh's escapes)
    (odd / "bin").mkdir(parents=True)
    venv = Path(sys.executable).parent.parent
    (odd / "pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text())
    (odd / "lib").symlink_to(venv / "lib")
    (odd / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    path = tmp_path / "vsock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(60)
    asked: list[bytes] = []

    def answer() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            asked.append(conn.recv(64))
            conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    program = ("import sys, types; from vmspawnd.cli.vmspawnctl import ssh_into; "
               f"sys.exit(ssh_into(types.SimpleNamespace(name='web', sshAddress='vsock-mux/{path}', sshKey=None), "
               "['-o', 'BatchMode=yes', 'true']))")
    try:
        p = subprocess.run([str(odd / "bin" / "python"), "-I", "-c", program], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "SHELL": "/bin/sh"})
        thread.join(10)
    finally:
        server.close()
    assert "invalid quotes" not in p.stderr, p.stderr
    assert asked == [b"CONNECT 22\n"], (asked, p.stderr)


def test_what_a_vsock_peer_answers_cannot_drive_the_terminal(tmp_path):
    """The hybrid vsock socket lies in the VM user's directory: whatever answers there, its refusal is
    shown escaped on the (maybe root) caller's terminal."""
    import socket
    import threading

    path = tmp_path / "vsock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(64)
        conn.sendall(b"NO \x1b]0;owned\x07\x1b[31mred\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        p = subprocess.run([*CTL, "vsock-proxy", f"vsock-mux/{path}", "22"], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    finally:
        server.close()
    assert p.returncode == 1 and "\x1b" not in p.stderr and "\x07" not in p.stderr, p.stderr
    assert "NO \\x1b]0;owned\\x07\\x1b[31mred" in p.stderr, p.stderr


@pytest.mark.parametrize("words,said,status", [
    (["stop", "web", "--timeout=-1"], "invalid timeout=-1.0: must be between 0 and 3600 seconds", 1),
    (["stop", "web", "--timeout=nan"], "invalid timeout=nan: must be between 0 and 3600 seconds", 1),
    (["kill", "web", "--signal=FOO"], "invalid signal=FOO", 2),  # (known without the daemon)
])
def test_a_bad_stop_or_kill_value_is_named_with_its_field(defined, words, said, status):
    p = defined.ctl(*words)
    assert p.returncode == status and said in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_create_errors_name_the_options_it_was_given(daemon, tmp_path):
    """The daemon checks files and names a setting by its JSON key; create names the option given."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    p = daemon.ctl("create", "web", f"--linux={kernel}", f"--extra-drive={tmp_path}/nothing")
    assert p.returncode == 1 and f"invalid extra-drive={tmp_path}/nothing" in p.stderr, p.stderr
    for option in ("--bind", "--bind-ro"):  # (one JSON field, binds: named as the first of its options)
        p = daemon.ctl("create", "web", f"--linux={kernel}", f"{option}={tmp_path}/none:/srv")
        assert p.returncode == 1 and f"invalid bind={tmp_path}/none: no such file" in p.stderr, p.stderr
    p = daemon.ctl("create", "web", f"--linux={kernel}", f"--initrd={tmp_path}")
    assert p.returncode == 1 and f"invalid initrd={tmp_path}: is a directory, not a file" in p.stderr, p.stderr
    p = daemon.ctl("create", "web")  # (no -M NAME from a machine pool to suggest: create looks at no pool)
    assert p.returncode != 0 and "nothing to boot" in p.stderr and "machine pool" not in p.stderr, p.stderr


def test_the_address_may_be_spelled_as_a_varlink_address(defined, monkeypatch):
    p = subprocess.run([*CTL, f"--address=unix:{defined.socket}", "list"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "web" in p.stdout, p.stderr
    monkeypatch.setenv("VMSPAWND_ADDRESS", f"unix:{defined.socket}")
    p = subprocess.run([*CTL, "list"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "web" in p.stdout, p.stderr
    for bad in ("tcp:10.0.0.1:4242", "unix:", ""):
        p = subprocess.run([*CTL, f"--address={bad}", "list"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 2 and "argument --address: expected a socket's path or unix:PATH, got " \
                                     f"'{bad}' (another host's vmspawnd: -H HOST)" in p.stderr, p.stderr
