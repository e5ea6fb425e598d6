# SPDX-License-Identifier: LGPL-2.1-or-later
"""Thin front ends: parse, call, print.

Importing this package imports two standard modules without optional parts that no command uses
(vmspawnd/lean.py), so every command starts sooner and the daemon stays smaller:

- :mod:`asyncio` without :mod:`ssl`: asyncio imports it (≈ 3–4 ms here, and ≈ 1.1 MB resident
  beyond libcrypto) only to offer TLS connections, which no command makes.  qemu.qmp names
  ``ssl`` too, and is given a stand-in (vmspawnd/qemu/qmp.py).  asyncio keeps treating TLS as
  absent, which no command notices.
- :mod:`shutil` without :mod:`bz2`, :mod:`lzma` and (Python ≥ 3.14) :mod:`compression.zstd`: shutil
  imports them (≈ 0.3 MB resident: their libraries and modules; zstd ≈ 1.7 ms more of each command's
  start in the forky tree) only to offer ``bztar``, ``xztar`` and ``zstdtar`` archives, which no
  command makes or unpacks.
- :mod:`uuid` without :mod:`_uuid`: uuid imports it (libuuid, ≈ 56 KB resident) only for
  :func:`uuid.uuid1`'s time-based UUIDs; ours are random (:func:`uuid.uuid4`, from ``os.urandom``).

Each can still be imported normally afterwards.

When the process is one of the commands (its script run, not a library's import, as pytest's), the cyclic
garbage collector is off from here until :func:`settle_caches`: loading modules makes objects that live
as long as the process, so the collections it would run meanwhile find next to nothing and only cost
time (≈ 4 ms of the ≈ 40 that importing this package takes here).  What the imports made is then frozen
(never looked at again by a collection).

It also puts in place, first, the cache of the modules' bytecode (vmspawnd/modulecache.py), then the
cache of dataclasses' generated methods (vmspawnd/methodcache.py), before any of our dataclasses is
defined; each command calls :func:`settle_caches` once its modules are imported.
"""

import gc
import os
import sys

#: the commands, by the name of the script run (sys.argv[0])
COMMANDS = frozenset({"vmspawn", "vmspawnd", "vmspawnctl"})
_starting_command = gc.isenabled() and os.path.basename(getattr(sys, "argv", [""])[0]) in COMMANDS
if _starting_command:
    gc.disable()

from vmspawnd import modulecache  # noqa: E402

modulecache.install()

from vmspawnd import methodcache  # noqa: E402  (through the module cache, as all that follows)
from vmspawnd.lean import UNUSED_PARTS, import_lean  # noqa: E402

methodcache.install()

import_lean(*UNUSED_PARTS)


def settle_caches() -> None:
    """Stop using the caches of a command's start (and write what was new to them), and collect garbage
    again, all that the start made frozen: its modules are imported."""
    global _starting_command
    methodcache.settle()
    modulecache.settle()
    if _starting_command:
        gc.freeze()
        gc.enable()
        _starting_command = False
