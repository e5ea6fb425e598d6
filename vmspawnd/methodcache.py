# SPDX-License-Identifier: LGPL-2.1-or-later
"""Dataclasses' generated methods, compiled once and kept beside our bytecode.

:mod:`dataclasses` writes each class's ``__init__``, ``__repr__``, ``__eq__``… as source text and
compiles it when the class is defined, in every process: in ``vmspawn`` that was 17–24 ms of the
≈ 50 its modules take to import (183 functions for 33 classes), on the way to QEMU's exec.  Once
:func:`install`-ed, the text of each one is looked up in a cache of code objects compiled earlier for
the very same text, and compiled only when it is new; :func:`settle` (each command calls it once its
modules are imported) writes what was new to the cache and uninstalls the lookup.

The cache is a :mod:`marshal`-ed ``{source text: marshal-ed code}`` in the package's ``__pycache__``
(``dataclass-methods.<cache tag>.marshal``, under ``$PYTHONPYCACHEPREFIX`` where that is set), headed
by this interpreter's bytecode magic number and ``-O`` level: it is written, trusted and skipped as
Python's own ``.pyc`` files are (not written where the directory is not ours to write or
``$PYTHONDONTWRITEBYTECODE`` is set; one that is unreadable, torn or of another Python is ignored).
Keyed by the whole text, an entry is never used for another method; code is compiled with no
``__future__`` flags, as :mod:`dataclasses`'s own ``exec`` compiles it.  Of ours it imports only
storage.py, which defines no dataclass: the cache must be in place before the first of ours is defined."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import marshal
import os
import sys
import types
from pathlib import Path
from typing import Any

from vmspawnd.storage import remove_leftover_temps, write_bytes_atomic

MAX_ENTRIES = 4000  # more (code changed many times) and the file keeps only what this process used
# importlib.util.MAGIC_NUMBER (the .pyc files' own), from the import system already loaded (importlib.util is not)
_MAGIC = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER + bytes([sys.flags.optimize])
_EXEC = "exec"  # the name dataclasses calls (looked up in its globals before the builtins)

_cached: dict[str, bytes] = {}  # loaded from the file
_new: dict[str, bytes] = {}  # compiled in this process
_used: set[str] = set()
_path: str | None = None


def cache_path() -> str:
    """Where the cache of this interpreter is kept, as the ``.pyc`` files of our package are."""
    package = os.path.dirname(os.path.abspath(__file__))
    directory = os.path.join(package, "__pycache__")
    if sys.pycache_prefix:
        directory = os.path.join(sys.pycache_prefix, package.lstrip(os.sep), "__pycache__")
    return os.path.join(directory, f"dataclass-methods.{sys.implementation.cache_tag}.marshal")


def install(path: str | None = None) -> None:
    """Compile dataclasses' methods through the cache at ``path`` (:func:`cache_path` by default)."""
    global _path
    if _path is not None:
        return
    _path = path or cache_path()
    _cached.update(_load(_path))
    setattr(dataclasses, _EXEC, _exec)


def settle(*, write: bool | None = None) -> None:
    """Write what was compiled anew to the cache (where it may be written, and unless ``write`` is False
    or, by default, ``$PYTHONDONTWRITEBYTECODE`` is set) and stop using it: classes defined from now on
    are compiled as usual (and the cache's memory is freed)."""
    global _path
    if _path is None:
        return
    if _new and (not sys.dont_write_bytecode if write is None else write):
        entries = _cached | _new
        if len(entries) > MAX_ENTRIES:
            entries = {text: code for text, code in entries.items() if text in _used}
        _store(_path, entries)
    if getattr(dataclasses, _EXEC, None) is _exec:
        delattr(dataclasses, _EXEC)
    _cached.clear()
    _new.clear()
    _used.clear()
    _path = None


def compile_package() -> None:
    """Import every module of our package through the cache and write it, whatever
    ``$PYTHONDONTWRITEBYTECODE`` says: for an install (as :mod:`compileall` writes the ``.pyc`` files)."""
    import importlib  # (here: not on the way of a command, which imports this module first)
    import pkgutil

    install()
    package = os.path.dirname(os.path.abspath(__file__))
    for module in pkgutil.walk_packages([package], prefix=f"{__package__}."):
        importlib.import_module(module.name)
    settle(write=True)


def _exec(source: Any, globals: dict[str, Any] | None = None, locals: Any = None, /) -> None:  # noqa: A002
    """:func:`exec`, with a method's source text taken as the code compiled for it before."""
    if isinstance(source, str):
        source = _code(source)
    builtins.exec(source, globals, locals)


def _code(text: str) -> Any:
    _used.add(text)
    data = _cached.get(text) or _new.get(text)
    if data is not None:
        with contextlib.suppress(ValueError, EOFError, TypeError):
            code = marshal.loads(data)
            if type(code) is types.CodeType:
                return code
    code = compile(text, "<string>", "exec", dont_inherit=True)
    _new[text] = marshal.dumps(code)
    return code


def _load(path: str) -> dict[str, bytes]:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return {}
    if not data.startswith(_MAGIC):
        return {}
    try:
        entries = marshal.loads(memoryview(data)[len(_MAGIC):])
    except (ValueError, EOFError, TypeError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {text: code for text, code in entries.items() if isinstance(text, str) and isinstance(code, bytes)}


def _store(path: str, entries: dict[str, bytes]) -> None:
    """Write ``entries`` to ``path`` whole or not at all, quietly failing as a ``.pyc`` write does; the
    temporary file of a command killed while it wrote the cache is removed first."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_leftover_temps(Path(path).parent, of=os.path.basename(path))
        write_bytes_atomic(Path(path), _MAGIC + marshal.dumps(entries), mode=0o644, durable=False)
