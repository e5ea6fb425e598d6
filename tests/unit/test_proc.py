# SPDX-License-Identifier: LGPL-2.1-or-later
"""What vmspawnd/proc.py asks of the C library."""

from __future__ import annotations

import subprocess
import sys

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
