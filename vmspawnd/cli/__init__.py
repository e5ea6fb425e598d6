# SPDX-License-Identifier: LGPL-2.1-or-later
"""Thin front ends: parse, call, print.

Importing this package imports :mod:`asyncio` without TLS: asyncio imports :mod:`ssl` (≈ 3–4 ms
here, and ≈ 1.1 MB resident beyond libcrypto, which :mod:`hashlib` loads anyway) only to offer
TLS connections, which no command makes.  So ``vmspawn`` gets to QEMU's exec sooner, and so does
every ``vmspawnctl``.  ``ssl`` can still be imported afterwards, and is when first needed
(qemu.qmp imports it, at a run's first QMP connection); asyncio keeps treating it as absent,
which no command notices.
"""

import sys

if "asyncio" not in sys.modules and "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]  # (an import of ssl now fails: asyncio goes without)
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
