# SPDX-License-Identifier: LGPL-2.1-or-later
"""Dataclasses' generated methods and the regular expressions modules compile as they are imported,
compiled once and kept beside our bytecode.

:mod:`dataclasses` writes each class's ``__init__``, ``__repr__``, ``__eq__``… as source text and
compiles it when the class is defined, in every process: in ``vmspawn`` that was 17–24 ms of the
≈ 50 its modules take to import (183 functions for 33 classes), on the way to QEMU's exec.  Once
:func:`install`-ed, the text of each one is looked up in a cache of code objects compiled earlier for
the very same text, and compiled only when it is new; :func:`settle` (each command calls it once its
modules are imported) writes what was new to the cache and uninstalls the lookup.

Regular expressions go the same way: the ≈ 45 patterns that the modules a command imports (ours and
the standard library's: logging, textwrap, json…) compile at import took ≈ 6.7 ms of ``vmspawn``'s
≈ 86 ms of imports.  :mod:`re`'s compiler parses a pattern into the arguments of ``_sre.compile`` (the
matching engine's code, its groups); those arguments are kept, keyed by the pattern and its flags, and
a pattern found there is made by ``_sre.compile`` from them (equal to the one compiled anew: a
pattern's equality compares its code).  Patterns with ``re.DEBUG`` (which prints) or ``re.LOCALE``
are compiled as usual.

The cache is a :mod:`marshal`-ed ``{key: marshal-ed code}`` in the package's ``__pycache__``
(``compiled-at-import.<cache tag>.marshal``, under ``$PYTHONPYCACHEPREFIX`` where that is set), headed
by this interpreter's bytecode magic number and ``-O`` level: it is written, trusted and skipped as
Python's own ``.pyc`` files are (not written where the directory is not ours to write or
``$PYTHONDONTWRITEBYTECODE`` is set; one that is unreadable, torn or of another Python is ignored).
A method's key is its whole text, a pattern's ``(pattern, flags)``: an entry is never used for
another; code is compiled with no ``__future__`` flags, as :mod:`dataclasses`'s own ``exec`` compiles
it.  It is in place before the first of ours is defined, and before the standard modules that compile
patterns are imported: this module imports :mod:`dataclasses` (inspect, tokenize…) once the lookup of
patterns is installed, and storage.py (json, logging…) only to write the cache."""

from __future__ import annotations

import builtins
import contextlib
import marshal
import os
import re
import sys
import types
from typing import Any

from vmspawnd import modulecache

MAX_ENTRIES = 4000  # more (code changed many times) and the file keeps only what this process used
#: re's compiler (3.11+), and the matching engine it builds patterns with; None where it is not so
_RE_COMPILER: Any = getattr(re, "_compiler", None)
_SRE: Any = getattr(_RE_COMPILER, "_sre", None)
# this interpreter's bytecode and -O level, and the matching engine's version (of its code)
_MAGIC = modulecache.BYTECODE + str(getattr(_SRE, "MAGIC", 0)).encode() + b"\0"
_EXEC = "exec"  # the name dataclasses calls (looked up in its globals before the builtins)

_UNCACHED_FLAGS = re.DEBUG | re.LOCALE
_compile_anew: Any = None  # re's compiler's own compile, while ours stands in for it

Key = str | tuple[str | bytes, int]  # a method's text; a pattern and its flags
_cached: dict[Key, bytes] = {}  # loaded from the file
_new: dict[Key, bytes] = {}  # compiled in this process
_used: set[Key] = set()
_path: str | None = None


def cache_path() -> str:
    """Where the cache of this interpreter is kept, as the ``.pyc`` files of our package are."""
    return os.path.join(modulecache.pycache_directory(), f"compiled-at-import.{sys.implementation.cache_tag}.marshal")


def install(path: str | None = None) -> None:
    """Compile dataclasses' methods and regular expressions through the cache at ``path``
    (:func:`cache_path` by default)."""
    global _path, _compile_anew
    if _path is not None:
        return
    _path = path or cache_path()
    _cached.update(_load(_path))
    if _SRE is not None and callable(getattr(_RE_COMPILER, "compile", None)):
        _compile_anew = _RE_COMPILER.compile
        _RE_COMPILER.compile = _compile_pattern
    import dataclasses  # (once patterns are looked up: it imports modules that compile some)

    setattr(dataclasses, _EXEC, _exec)


def settle(*, write: bool | None = None) -> None:
    """Write what was compiled anew to the cache (where it may be written, and unless ``write`` is False
    or, by default, ``$PYTHONDONTWRITEBYTECODE`` is set) and stop using it: classes defined and patterns
    compiled from now on are compiled as usual (and the cache's memory is freed)."""
    global _path
    if _path is None:
        return
    if _new and modulecache.written(write):
        entries = _cached | _new
        if len(entries) > MAX_ENTRIES:
            entries = {text: code for text, code in entries.items() if text in _used}
        _store(_path, entries)
    if getattr(dataclasses := sys.modules["dataclasses"], _EXEC, None) is _exec:
        delattr(dataclasses, _EXEC)
    if getattr(_RE_COMPILER, "compile", None) is _compile_pattern:
        _RE_COMPILER.compile = _compile_anew
    _cached.clear()
    _new.clear()
    _used.clear()
    _path = None


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


class _NotedEngine:
    """The matching engine as re's compiler sees it while one pattern is compiled: what the compiler
    makes the pattern from (the arguments of its ``compile``) is noted."""

    def __init__(self) -> None:
        self.arguments: tuple[Any, ...] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(_SRE, name)

    def compile(self, *arguments: Any) -> Any:  # noqa: A003
        self.arguments = arguments
        return _SRE.compile(*arguments)


def _compile_pattern(pattern: Any, flags: int = 0) -> Any:
    """re's compiler's ``compile``, with a pattern made from what was noted for it before."""
    if not isinstance(pattern, (str, bytes)) or flags & _UNCACHED_FLAGS:
        return _compile_anew(pattern, flags)
    key = (pattern, int(flags))  # (a str and a bytes pattern are different keys)
    _used.add(key)
    data = _cached.get(key) or _new.get(key)
    if data is not None:
        with contextlib.suppress(ValueError, EOFError, TypeError, RuntimeError):
            return _SRE.compile(*marshal.loads(data))
    engine = _NotedEngine()
    _RE_COMPILER._sre = engine
    try:
        compiled = _compile_anew(pattern, flags)
    finally:
        _RE_COMPILER._sre = _SRE
    if engine.arguments is not None:
        with contextlib.suppress(ValueError, TypeError):  # (the code's opcodes are named ints: kept as ints)
            _new[key] = marshal.dumps(tuple([int(c) for c in a] if isinstance(a, list) else a
                                            for a in engine.arguments))
    return compiled


def _load(path: str) -> dict[Key, bytes]:
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
    return {key: code for key, code in entries.items() if isinstance(code, bytes) and (
        isinstance(key, str) or (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], (str, bytes))
                                 and type(key[1]) is int))}


def _store(path: str, entries: dict[Key, bytes]) -> None:
    from vmspawnd.storage import write_cache  # (here: see the module's docstring)

    with contextlib.suppress(ValueError):  # (an entry marshal cannot write)
        write_cache(path, _MAGIC + marshal.dumps(entries))
