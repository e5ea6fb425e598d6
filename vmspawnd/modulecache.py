# SPDX-License-Identifier: LGPL-2.1-or-later
"""The bytecode of the modules a command imports, found and read from one file.

Python's import system finds each module by searching its path, directory by directory, then
opens, reads and checks the module's ``.pyc`` file, in Python code, for each of the ≈ 230 modules
``vmspawn`` imports before QEMU's exec (≈ 8 ms of its ≈ 76 ms of imports here, found and read this
way instead).  Once :func:`install`-ed, a module named in this cache is found by a few ``stat``
calls and its code read from the cache by one ``pread``; :func:`settle` (each command calls it once
its modules are imported) adds the modules that were imported the usual way, and uninstalls it.

An entry is used only where the usual way would find the same file, so the cache never changes what
is imported:

- the search path before the module's directory, and that directory, are the same entries in the
  same order as when it was written, and none of those directories changed since (its mtime, as the
  import system's own finder trusts a directory's listing): no new file can come first;
- the module's source file has the same mtime (to the nanosecond) and size (as a ``.pyc`` file's
  check, but stricter);
- it is found before the usual path search but after other finders (frozen and built-in modules,
  and any finder installed before it, such as pytest's), and never for a reload.

A module so found has the usual spec and attributes; its loader is a :class:`CachedLoader`, a
``SourceFileLoader`` in every other way.  The file is written and trusted as ``.pyc`` files are:
in the package's ``__pycache__`` (``imported-modules.<cache tag>.bin``, under
``$PYTHONPYCACHEPREFIX`` where that is set), headed by this interpreter's bytecode magic number and
``-O`` level, not written where the directory is not ours to write or ``$PYTHONDONTWRITEBYTECODE`` is
set; one unreadable, torn or of another Python is not used.

Nothing here imports more than the interpreter has loaded at start-up: it is installed before the
modules it serves."""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False  # (typing is not loaded yet: it is imported through this cache)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import CodeType, ModuleType

_external = sys.modules["_frozen_importlib_external"]  # the import system's own path finder and loaders
#: what a cache of this interpreter's compiled code begins with: importlib.util.MAGIC_NUMBER (the .pyc
#: files' own, from the import system already loaded: importlib.util is not) and the -O level
BYTECODE = _external.MAGIC_NUMBER + bytes([sys.flags.optimize])
MAGIC = BYTECODE + b"modules\0"
_LENGTH_SIZE = 8  # the index's length, after the magic
MAX_SIZE = 64 << 20  # bytes of code: more (code changed many times) and the file keeps what this process imported

#: module name → (source path, its mtime_ns, its size, offset of its code after the index, the code's length,
#: whether it is a package, the search path's entries up to its directory, each one's mtime_ns or None)
Entry = tuple[str, int, int, int, int, bool, tuple[str, ...], tuple[int | None, ...]]

_index: dict[str, Entry] = {}
_fd: int | None = None
_data_start = 0  # where the code begins in the file (entries' offsets are from there)
_path: str | None = None
_before: set[str] = set()  # modules imported before install() (not cached by this process)
_served: set[str] = set()  # modules whose code came from the cache
_directories: dict[str, int | None] = {}  # mtime_ns of directories, stat-ed once between install and settle


def pycache_directory() -> str:
    """The ``__pycache__`` of our package, where our ``.pyc`` files are (under ``$PYTHONPYCACHEPREFIX``
    where that is set)."""
    package = os.path.dirname(os.path.abspath(__file__))
    if sys.pycache_prefix:
        return os.path.join(sys.pycache_prefix, package.lstrip(os.sep), "__pycache__")
    return os.path.join(package, "__pycache__")


def cache_path() -> str:
    """Where the cache of this interpreter is kept."""
    return os.path.join(pycache_directory(), f"imported-modules.{sys.implementation.cache_tag}.bin")


class CachedLoader(_external.SourceFileLoader):  # type: ignore[name-defined]
    """The loader of a module found in the cache (its source as it was): it reads its code from there
    while the cache is installed; otherwise (and for all else) the usual ``SourceFileLoader``."""

    def get_code(self, fullname: str) -> CodeType:
        code = _cached_code(fullname, self.path)
        return code if code is not None else super().get_code(fullname)


class _Finder:
    """The finder in ``sys.meta_path`` that finds modules in the cache."""

    @staticmethod
    def find_spec(name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec | None:
        entry = _index.get(name)
        if entry is None or target is not None or _fd is None:
            return None
        origin, mtime, size, _, _, package, entries, mtimes = entry
        search = tuple(sys.path if path is None else path)
        if (search[:len(entries)] != entries or tuple(map(_directory_mtime, entries)) != mtimes
                or _source_stat(origin) != (mtime, size)):
            return None
        return _external.spec_from_file_location(
            name, origin, loader=CachedLoader(name, origin),
            submodule_search_locations=[os.path.dirname(origin)] if package else None)


def install(path: str | None = None, *, with_loaded: bool = False) -> None:
    """Find and read modules through the cache at ``path`` (:func:`cache_path` by default), from now
    until :func:`settle`; ``with_loaded``: the modules imported already are added to it then too (else
    only those imported from now on)."""
    global _fd, _path
    if _path is not None:
        return
    _path = path or cache_path()
    if not with_loaded:
        _before.update(sys.modules)
    try:
        _fd = os.open(_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        _index.update(_load_index(_fd))
    finders = sys.meta_path
    at = next((i for i, f in enumerate(finders) if f is _external.PathFinder), len(finders))
    finders.insert(at, _Finder)


def written(write: bool | None) -> bool:
    """Whether a cache is to be written: ``write``, or by default as ``.pyc`` files are (unless
    ``$PYTHONDONTWRITEBYTECODE`` is set)."""
    return not sys.dont_write_bytecode if write is None else write


def settle(*, write: bool | None = None) -> None:
    """Add the modules imported the usual way since :func:`install` to the cache (where it may be
    written, and unless ``write`` is False or, by default, ``$PYTHONDONTWRITEBYTECODE`` is set) and stop
    using it: modules imported from now on are found and read the usual way."""
    global _fd, _path
    if _path is None:
        return
    ours = {name for name in sys.modules.keys() - _before if _cacheable(name)}
    if ours - _served and written(write):
        _store(_path, ours)
    if _Finder in sys.meta_path:
        sys.meta_path.remove(_Finder)
    if _fd is not None:
        os.close(_fd)
    _fd = _path = None
    for held in (_index, _before, _served, _directories):
        held.clear()


def _directory_mtime(directory: str) -> int | None:
    if directory not in _directories:
        try:
            _directories[directory] = os.stat(directory).st_mtime_ns
        except OSError:
            _directories[directory] = None
    return _directories[directory]


def _source_stat(origin: str) -> tuple[int, int] | None:
    try:
        found = os.stat(origin)
    except OSError:
        return None
    return found.st_mtime_ns, found.st_size


def _read(entry: Entry) -> bytes | None:
    """The entry's marshal-ed code, as written (None if the file is shorter)."""
    offset, length = entry[3], entry[4]
    try:
        data = os.pread(_fd, length, _data_start + offset) if _fd is not None else b""
    except OSError:
        return None
    return data if len(data) == length else None


def _cached_code(name: str, origin: str) -> CodeType | None:
    entry = _index.get(name)
    if entry is None or entry[0] != origin:
        return None
    data = _read(entry)
    try:
        code = marshal.loads(data) if data is not None else None
    except (ValueError, EOFError, TypeError):
        return None
    if type(code) is not type(_cached_code.__code__):
        return None
    _served.add(name)
    return code


def _cacheable(name: str) -> bool:
    """Whether the module ``name`` was loaded from a source file found on a search path (not a
    built-in, frozen, extension or namespace module, nor one loaded by another finder)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return (spec is not None and spec.name == name and type(spec.loader) in (CachedLoader, _external.SourceFileLoader)
            and isinstance(spec.origin, str) and spec.origin.endswith(".py"))


def _made(name: str) -> tuple[Entry, bytes] | None:
    """The entry and code of the module ``name`` as this process imported it (its code at offset 0);
    None where the usual way would not find the same file from the same search path (relative
    entries, archives) or its code is not to be had."""
    spec: ModuleSpec = sys.modules[name].__spec__  # type: ignore[assignment]  # (_cacheable: one from a file)
    origin: str = spec.origin  # type: ignore[assignment]
    package = spec.submodule_search_locations is not None
    parent = name.rpartition(".")[0]
    search_path = sys.path if not parent else getattr(sys.modules.get(parent), "__path__", None)
    directory = os.path.dirname(os.path.dirname(origin) if package else origin)
    try:
        entries: tuple[str, ...] = tuple(search_path)  # type: ignore[arg-type]  # (None: TypeError)
        entries = entries[:entries.index(directory) + 1]
    except (TypeError, ValueError):
        return None
    if not all(isinstance(e, str) and os.path.isabs(e) and (not os.path.exists(e) or os.path.isdir(e))
               for e in entries):
        return None
    mtimes = tuple(map(_directory_mtime, entries))  # (before the search: a later change shows)
    found = _external.PathFinder.find_spec(name, list(entries))
    source = _source_stat(origin)
    if (found is None or found.origin != origin or (found.submodule_search_locations is not None) != package
            or source is None):
        return None
    old = _index.get(name)
    data = _read(old) if old is not None and old[0] == origin and old[1:3] == source else None
    if data is None:
        try:
            data = marshal.dumps(_external.SourceFileLoader(name, origin).get_code(name))
        except (ImportError, OSError, SyntaxError, ValueError):
            return None
    return (origin, *source, 0, len(data), package, entries, mtimes), data


def _kept(name: str) -> tuple[Entry, bytes] | None:
    """The cache's entry and code for ``name`` if its source and directories are still as they were."""
    entry = _index[name]
    if entry[1:3] != _source_stat(entry[0]) or tuple(map(_directory_mtime, entry[6])) != entry[7]:
        return None
    data = _read(entry)
    return (entry, data) if data is not None else None


def _store(path: str, ours: set[str]) -> None:
    """Write the modules this process imported since :func:`install` (``ours``), and those of the cache
    still as they were, to ``path`` (unless none of those it imported the usual way could be added)."""
    from vmspawnd.storage import write_cache  # (here: not on the way of a command that finds its modules)

    _directories.clear()  # (stat-ed anew: what is written is checked now)
    index: dict[str, Entry] = {}
    chunks: list[bytes] = []
    size = 0
    added = False
    for name in sorted(ours | _index.keys()):
        made = _made(name) if name in ours else None
        added = added or (made is not None and name not in _served)
        if made is None and name in _index:
            made = _kept(name)
            if made is not None and name not in ours and size + made[0][4] > MAX_SIZE:
                continue
        if made is None:
            continue
        entry, data = made
        index[name] = entry[:3] + (size,) + entry[4:]
        chunks.append(data)
        size += len(data)
    if added:
        encoded_index = marshal.dumps(index)
        write_cache(path, b"".join([MAGIC, len(encoded_index).to_bytes(_LENGTH_SIZE, "little"), encoded_index,
                                    *chunks]))


def _load_index(fd: int) -> dict[str, Entry]:
    """The index of the cache open at ``fd`` (read from it, so that offsets are of that very file)."""
    global _data_start
    try:
        head = os.pread(fd, len(MAGIC) + _LENGTH_SIZE, 0)
        length = int.from_bytes(head[len(MAGIC):], "little")
        if (not head.startswith(MAGIC) or len(head) != len(MAGIC) + _LENGTH_SIZE
                or len(head) + length > os.fstat(fd).st_size):
            return {}
        index = marshal.loads(os.pread(fd, length, len(head)))
    except (OSError, ValueError, EOFError, TypeError):
        return {}
    if not isinstance(index, dict):
        return {}
    _data_start = len(MAGIC) + _LENGTH_SIZE + length
    return {name: entry for name, entry in index.items() if isinstance(name, str) and _well_formed(entry)}


def _well_formed(entry: object) -> bool:
    if not (isinstance(entry, tuple) and len(entry) == 8):
        return False
    origin, mtime, size, offset, length, package, entries, mtimes = entry
    return (isinstance(origin, str) and all(type(n) is int for n in (mtime, size, offset, length))
            and type(package) is bool and isinstance(entries, tuple) and isinstance(mtimes, tuple)
            and len(entries) == len(mtimes) and all(isinstance(e, str) for e in entries)
            and all(m is None or type(m) is int for m in mtimes))
