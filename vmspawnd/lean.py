# SPDX-License-Identifier: LGPL-2.1-or-later
"""Standard modules imported without optional parts that nothing here uses: each costs resident memory
for as long as a process lives (and start-up time), in every daemon and ``vmspawn``.  Nothing of ours
is imported here: every module may use this one."""

from __future__ import annotations

import sys
from types import ModuleType


def import_without(module: str, *optional: str) -> ModuleType:
    """``module``, imported while ``optional`` cannot be imported (it goes without them), unless it or
    one of them is loaded already (then as it is)."""
    if module not in sys.modules and not any(name in sys.modules for name in optional):
        for name in optional:
            sys.modules[name] = None  # type: ignore[assignment]  # (an import of it now fails)
        try:
            __import__(module)
        finally:
            for name in optional:
                del sys.modules[name]
    __import__(module)
    return sys.modules[module]


#: the standard modules every command imports without optional parts, and those parts (vmspawnd/cli/__init__.py
#: says why each goes unused)
UNUSED_PARTS = {"asyncio": ("ssl",), "shutil": ("bz2", "lzma", "compression.zstd"), "uuid": ("_uuid",)}


def import_lean(*modules: str) -> None:
    """Import each of ``modules`` (keys of :data:`UNUSED_PARTS`) without its unused parts."""
    for module in modules:
        import_without(module, *UNUSED_PARTS[module])


def hashlib() -> ModuleType:
    """:mod:`hashlib` without OpenSSL: with it, hashlib loads libcrypto (≈ 3.4 MB resident, for the
    process's life) though Python's own SHA-256 (and SHA-1, which dbus-fast may use) serves what we
    and dbus-fast hash, a few short strings.  A Python built without its own SHA-256 gets the usual
    hashlib.  Call it before the first import of dbus-fast, which imports hashlib."""
    module = import_without("hashlib", "_hashlib")
    if not hasattr(module, "sha256"):  # (this Python hashes only through OpenSSL)
        del sys.modules["hashlib"]
        import hashlib as module
    return module
