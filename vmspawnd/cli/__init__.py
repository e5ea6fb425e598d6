# SPDX-License-Identifier: LGPL-2.1-or-later
"""Thin front ends: parse, call, print.

Importing this package imports two standard modules without optional parts that no command uses,
so every command starts sooner and the daemon stays smaller:

- :mod:`asyncio` without :mod:`ssl`: asyncio imports it (≈ 3–4 ms here, and ≈ 1.1 MB resident
  beyond libcrypto) only to offer TLS connections, which no command makes.  qemu.qmp names
  ``ssl`` too, and is given a stand-in (vmspawnd/qemu/qmp.py).  asyncio keeps treating TLS as
  absent, which no command notices.
- :mod:`shutil` without :mod:`bz2` and :mod:`lzma`: shutil imports them (≈ 0.3 MB resident: their
  libraries and modules) only to offer ``bztar`` and ``xztar`` archives, which no command makes or
  unpacks.

Each can still be imported normally afterwards.
"""

import sys


def _import_without(module: str, *optional: str) -> None:
    """Import ``module`` while ``optional`` cannot be imported (it goes without them), unless one of
    them is loaded already."""
    if module in sys.modules or any(name in sys.modules for name in optional):
        return
    for name in optional:
        sys.modules[name] = None  # type: ignore[assignment]  # (an import of it now fails)
    try:
        __import__(module)
    finally:
        for name in optional:
            del sys.modules[name]


_import_without("asyncio", "ssl")
_import_without("shutil", "bz2", "lzma")
