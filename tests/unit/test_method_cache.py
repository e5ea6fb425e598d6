# SPDX-License-Identifier: LGPL-2.1-or-later
"""The cache of dataclasses' generated methods (vmspawnd/methodcache.py), each case in fresh
interpreters, as the commands start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A module without ``from __future__ import annotations`` (so __init__'s annotations are the types
# themselves, as a class defined by ordinary compilation has them); prints what a user of these
# classes sees, then how many methods this process compiled.
CLASSES = '''
import dataclasses, sys
from vmspawnd import methodcache
if sys.argv[1] != "plain":
    methodcache.install(sys.argv[1])

@dataclasses.dataclass(frozen=True)
class Disk:
    path: str
    size: int = 1 << 20
    tags: list[str] = dataclasses.field(default_factory=list, compare=False)
    secret: str = dataclasses.field(default="", repr=False)

@dataclasses.dataclass(order=True)
class Slot:
    rank: int
    name: str = "x"

d = Disk("/a", tags=["t"], secret="s")
try:
    d.size = 2
    frozen = "assignable"
except dataclasses.FrozenInstanceError:
    frozen = "frozen"
print(repr(d), d == Disk("/a", secret="s"), hash(d) == hash(Disk("/a", secret="s")), frozen,
      Disk.__init__.__annotations__, dataclasses.replace(d, size=3).size, Disk.__init__.__qualname__,
      sorted([Slot(2), Slot(1, "b")]), Slot(1) < Slot(2), Slot.__eq__(Slot(1), 5))
print(len(methodcache._new))
if sys.argv[1] != "plain":
    methodcache.settle(write=None if len(sys.argv) < 3 else sys.argv[2] == "write")
'''


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """(what the classes showed, methods compiled) in a fresh interpreter, with the cache at ``args[0]``."""
    script = tmp_path / "classes.py"
    script.write_text(CLASSES)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""} | (env or {})).stdout.splitlines()
    return out[0], int(out[1])


def test_classes_made_from_the_cache_are_those_compiled_anew_and_nothing_is_compiled_twice(tmp_path) -> None:
    plain, _ = run(tmp_path, "plain")
    assert "{'path': <class 'str'>, 'size': <class 'int'>, 'tags': list[str], 'secret': <class 'str'>" in plain
    cache = tmp_path / "cache"
    first, compiled = run(tmp_path, str(cache))
    assert (first, cache.is_file()) == (plain, True)
    assert compiled >= 8  # (__init__, __repr__, __eq__, __setattr__, __delattr__, __hash__, Slot's order…)
    again, compiled_again = run(tmp_path, str(cache))
    assert (again, compiled_again) == (plain, 0)


@pytest.mark.parametrize("damage", ["garbage", "torn", "another Python"])
def test_a_damaged_or_foreign_cache_is_ignored_and_written_again(tmp_path, damage) -> None:
    plain, _ = run(tmp_path, "plain")
    cache = tmp_path / "cache"
    run(tmp_path, str(cache))
    data = cache.read_bytes()
    cache.write_bytes({"garbage": os.urandom(len(data)), "torn": data[:len(data) // 2],
                       "another Python": b"\x00\x00\r\n" + data[4:]}[damage])
    shown, compiled = run(tmp_path, str(cache))
    assert shown == plain and compiled >= 8
    assert run(tmp_path, str(cache)) == (plain, 0)  # (written whole again)


def test_what_a_command_killed_while_writing_the_cache_left_is_removed_by_the_next_write(tmp_path) -> None:
    cache = tmp_path / "cache"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    left = tmp_path / f".cache.{gone}-0.tmp"  # (as storage.temp_path names it, of a process now gone)
    left.write_bytes(b"half a cache")
    working = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writing = tmp_path / f".cache.{working.pid}-0.tmp"  # (another command's, writing now: kept)
        writing.write_bytes(b"")
        run(tmp_path, str(cache))
        assert cache.is_file() and not left.exists() and writing.exists()
    finally:
        working.kill()
        working.wait()


def test_a_cache_that_cannot_be_written_changes_nothing(tmp_path) -> None:
    plain, _ = run(tmp_path, "plain")
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"  # (under a file: no directory can be made there)
    assert run(tmp_path, str(cache))[0] == plain
    assert run(tmp_path, str(cache))[0] == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.py", "file"]


def test_the_cache_is_written_as_bytecode_is(tmp_path) -> None:
    cache = tmp_path / "cache"
    run(tmp_path, str(cache), env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert not cache.exists()  # (as no .pyc is written then)
    run(tmp_path, str(cache), "write", env={"PYTHONDONTWRITEBYTECODE": "1"})  # (an install's precompile)
    assert cache.is_file()


@pytest.mark.parametrize("command", ["vmspawn", "vmspawnctl", "vmspawnd"])
def test_each_command_writes_the_cache_beside_its_bytecode_and_then_uses_it(tmp_path, command) -> None:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path), "PYTHONDONTWRITEBYTECODE": ""}
    binary = Path(sys.executable).with_name(command)
    for _ in range(2):
        subprocess.run([str(binary), "--version"], env=env, check=True, capture_output=True, timeout=60)
        caches = list(tmp_path.rglob("compiled-at-import.*.marshal"))
        assert len(caches) == 1, caches
        assert caches[0].parent.parent.name == "vmspawnd"  # (the package's bytecode directory)
        if _ == 0:
            written = caches[0].stat()
    after = caches[0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # nothing new to write


PATTERNS = r'''
import re, sys
from vmspawnd import methodcache
methodcache.install(sys.argv[1])
texts = [r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$", r"\s+(\d+)(?:\.(\d+))?", "(?i)Qemu emulator version"]
patterns = [re.compile(t) for t in texts] + [
    re.compile(rb"\x00(?P<tag>[a-z]+)\x00", re.DOTALL), re.compile(r"a b # spaced", re.VERBOSE | re.MULTILINE),
    re.compile(r"[é-ü]+", re.IGNORECASE)]
samples = ["A_1=x y", "  12.5", "QEMU EMULATOR VERSION 9", b"\x00vda\x00", "ab", "ÉTÉ"]
for p, sample in zip(patterns, samples):
    m = p.search(sample)
    print(p.pattern, p.flags, p.groups, dict(p.groupindex), m and m.groups(), m and m.span())
    print(p == re._compiler.compile(p.pattern, p.flags & ~re.UNICODE if isinstance(p.pattern, bytes) else p.flags))
print(len(methodcache._new))
methodcache.settle(write=True)
print(re._compiler.compile is methodcache._compile_anew)
'''


def test_patterns_made_from_the_cache_are_those_compiled_anew_and_match_alike(tmp_path) -> None:
    script, cache = tmp_path / "patterns.py", tmp_path / "cache"
    script.write_text(PATTERNS)

    def run() -> list[str]:
        return subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True, check=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[2]).stdout.splitlines()

    first = run()
    assert first[1:12:2] == ["True"] * 6  # each equal (its engine's code too) to one compiled without the cache
    assert first[0].startswith("^(?P<key>") and "{'key': 1, 'value': 2} ('A_1', 'x y') (0, 7)" in first[0]
    assert int(first[-2]) >= 6 and first[-1] == "True"  # (noted anew; re's own compiler back after settle)
    again = run()
    assert again[:-2] == first[:-2] and again[-2:] == ["0", "True"]  # the same patterns, none compiled anew


def test_a_command_finds_the_patterns_of_its_modules_the_standard_librarys_too_in_the_cache(tmp_path) -> None:
    # (json's and logging's are compiled as they are imported: after the cache is in place, not before)
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path), "PYTHONDONTWRITEBYTECODE": ""}
    code = ("import vmspawnd.cli, vmspawnd.methodcache as m, vmspawnd.cli.foreground, json, logging; "
            "found = {k[0] for k in m._used if isinstance(k, tuple)}; "
            "print(len(found) >= 30, json.scanner.NUMBER_RE.pattern in found, "
            "logging.PercentStyle.validation_pattern.pattern in found, sum(isinstance(k, tuple) for k in m._new)); "
            "m.settle()")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           timeout=120, cwd=Path(__file__).resolve().parents[2]).stdout.split() for _ in range(2)]
    assert runs[0][:3] == runs[1][:3] == ["True", "True", "True"]
    assert int(runs[0][3]) >= 30 and runs[1][3] == "0"  # compiled and kept once, then found
