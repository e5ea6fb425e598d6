# SPDX-License-Identifier: LGPL-2.1-or-later
"""What vmspawnd/proc.py asks of the C library, and finds of other processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.polling import poll
from vmspawnd.proc import processes_using

# 40 MB of C heap in 8 KiB blocks (below glibc's mmap threshold), all freed but the last, which keeps
# the heap's top in place: glibc keeps that memory until it is asked to give it back
PEAK = """
import sys
from vmspawnd.proc import release_free_heap
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
blocks = [bytearray(8192) for _ in range(5000)]
last = blocks.pop()
del blocks
before = rss()
release_free_heap() if sys.argv[1] == "release" else None
print(before - rss())
"""


def freed_kb(what: str) -> int:
    return int(subprocess.run([sys.executable, "-c", PEAK, what], capture_output=True, text=True, check=True).stdout)


def test_the_heap_a_peak_took_and_freed_is_given_back_to_the_system():
    assert freed_kb("keep") < 4_000  # (glibc alone keeps it)
    assert freed_kb("release") > 30_000


def test_a_helper_that_holds_a_socket_in_a_directory_is_found_though_its_command_line_names_none(tmp_path: Path):
    """As a socket-activated helper (its listening socket, bound in a run's directory, its standard
    input): what finds a killed run's leftovers must find it."""
    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    waits = [sys.executable, "-c", "import time; time.sleep(60)"]
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(run / "helper.sock"))
        bound.listen()
        helper = subprocess.Popen(waits, stdin=bound.fileno())
    named = subprocess.Popen([*waits, str(run / "x")], stdin=subprocess.PIPE)  # (its command line names it)
    try:
        both = sorted([helper.pid, named.pid])  # (once each has exec'd: before, its command line is ours)
        poll(lambda: sorted(processes_using(run)), lambda found: found == both, 10, 0.01)
        assert processes_using(other) == [] and processes_using(tmp_path / "ru") == []  # (a prefix of "run")
    finally:
        for process in (helper, named):
            process.kill()
            process.wait()
    assert processes_using(run) == []
