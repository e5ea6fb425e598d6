# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd's own options: a bad value is a usage error naming the option and the value; a path the
daemon cannot use stops it with an error naming the option, the path and why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vmspawnd.cli.vmspawnd import parse_args


@pytest.mark.parametrize("option,said", [
    ("--max-connections=0", "argument --max-connections: expected a number of at least 1, got '0'"),
    ("--max-connections=-5", "argument --max-connections: expected a number of at least 1, got '-5'"),
    ("--max-connections=²", "argument --max-connections: expected a number of at least 1, got '²'"),
    ("--socket-group=no-such-group", "argument --socket-group: no group named 'no-such-group' on this host"),
])
def test_a_bad_option_value_is_a_usage_error_naming_it(option, said, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args([option])
    assert exited.value.code == 2 and said in capsys.readouterr().err


def test_good_values_are_taken():
    args = parse_args(["--max-connections=7", "--socket-group=root"])
    assert (args.max_connections, args.socket_group) == (7, "root")


@pytest.mark.parametrize("which, bad, said", [
    ("state", "{file}/state", "cannot use --state-dir={file}/state ({file}/state/machines): Not a directory"),
    ("runtime", "{file}/run", "cannot use --runtime-dir={file}/run: Not a directory"),
    ("socket", "{file}/sub/d.sock", "cannot use --socket={file}/sub/d.sock ({file}/sub): Not a directory"),
    ("socket", "{tmp}/{long}/d.sock",
     "invalid socket={tmp}/{long}/d.sock: path too long for a unix socket (over 107 bytes)"),
])
def test_a_path_the_daemon_cannot_use_is_named_with_its_option(tmp_path, which, bad, said):
    file = tmp_path / "file"  # (a file where a directory should be)
    file.write_text("")
    names = {"file": file, "tmp": tmp_path, "long": "x" * 120}
    paths = {"state": tmp_path / "state", "runtime": tmp_path / "run", "socket": tmp_path / "vmspawnd.sock",
             which: bad.format(**names)}
    p = subprocess.run([sys.executable, "-m", "vmspawnd.cli.vmspawnd", f"--socket={paths['socket']}",
                        f"--state-dir={paths['state']}", f"--runtime-dir={paths['runtime']}"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and p.stderr == f"vmspawnd: {said.format(**names)}\n", p
    assert not (tmp_path / names["long"]).exists()  # (nothing made for a socket path that cannot be)


def test_a_socket_path_that_is_no_utf8_is_still_checked_and_named(tmp_path):
    """(A path's bytes need not be UTF-8: measuring its length raised UnicodeEncodeError, a traceback.)"""
    bad = os.fsencode(tmp_path) + b"/\xff" + b"x" * 120 + b"/d.sock"
    p = subprocess.run([sys.executable, "-m", "vmspawnd.cli.vmspawnd", b"--socket=" + bad,
                        f"--state-dir={tmp_path / 'state'}", f"--runtime-dir={tmp_path / 'run'}"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and p.stderr.startswith(b"vmspawnd: invalid socket="), p
    assert p.stderr.endswith(b": path too long for a unix socket (over 107 bytes)\n"), p
