# SPDX-License-Identifier: LGPL-2.1-or-later
"""The cache of the modules' bytecode (vmspawnd/modulecache.py), each case in fresh interpreters, as
the commands start: what is imported is always what the usual way imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Imports a module, a package and its submodule (found in the script's directory, first on the search
# path, or in lib/ after it) through the cache at argv[1], and prints what a user of them sees.
PROBE = '''
import json, sys
sys.path.insert(1, sys.path[0] + "/lib")
from vmspawnd import modulecache
modulecache.install(sys.argv[1])
import alpha, beta, pkg.sub
seen = {m.__name__: [m.VALUE, m.__file__, m.__cached__, getattr(m, "__path__", None), m.__spec__.origin,
                     type(m.__loader__).__name__, m.__loader__.get_source(m.__name__) is not None]
        for m in (alpha, beta, pkg, pkg.sub)}
modulecache.settle(write=None if len(sys.argv) < 3 else sys.argv[2] == "write")
print(json.dumps([seen, modulecache._Finder in sys.meta_path]))
'''


def tree(tmp_path: Path) -> Path:
    """The probe and its modules in ``tmp_path/app``."""
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "lib").mkdir()
    (app / "probe.py").write_text(PROBE)
    (app / "alpha.py").write_text("VALUE = 'alpha 1'\n")
    (app / "lib" / "beta.py").write_text("VALUE = 'beta from lib'\n")
    (app / "pkg" / "__init__.py").write_text("VALUE = 'pkg'\n")
    (app / "pkg" / "sub.py").write_text("from . import VALUE as PARENT\nVALUE = PARENT + '.sub'\n")
    return app


def run(app: Path, cache: Path | str, *args: str, env: dict[str, str] | None = None) -> dict[str, list]:
    """What the probe saw of each module, in a fresh interpreter (its ``.pyc`` files written as usual)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""} | (env or {})
    out = subprocess.run([sys.executable, str(app / "probe.py"), str(cache), *args], capture_output=True, text=True,
                         check=True, timeout=60, cwd="/", env=env)
    seen, installed_after = json.loads(out.stdout)
    assert not installed_after  # (settled: later imports go the usual way)
    return seen


def values(seen: dict[str, list]) -> dict[str, str]:
    return {name: shown[0] for name, shown in seen.items()}


def loaders(seen: dict[str, list]) -> set[str]:
    return {shown[5] for shown in seen.values()}


def test_modules_read_from_the_cache_are_those_imported_the_usual_way(tmp_path) -> None:
    app, cache = tree(tmp_path), tmp_path / "cache"
    usual = run(app, cache)
    assert loaders(usual) == {"SourceFileLoader"} and cache.is_file()
    cached = run(app, cache)
    assert loaders(cached) == {"CachedLoader"}
    assert {n: s[:5] + s[6:] for n, s in cached.items()} == {n: s[:5] + s[6:] for n, s in usual.items()}
    assert values(cached) == {"alpha": "alpha 1", "beta": "beta from lib", "pkg": "pkg", "pkg.sub": "pkg.sub"}
    assert cached["pkg"][3] == [str(app / "pkg")]


def test_an_edited_module_is_imported_as_it_is_now_and_cached_again(tmp_path) -> None:
    app, cache = tree(tmp_path), tmp_path / "cache"
    run(app, cache)
    run(app, cache)
    source = app / "alpha.py"
    before = source.stat()
    source.write_text("VALUE = 'alpha 2'\n")  # (the same size)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    edited = run(app, cache)
    assert values(edited)["alpha"] == "alpha 2"
    assert edited["alpha"][5] == "SourceFileLoader" and edited["beta"][5] == "CachedLoader"
    again = run(app, cache)
    assert values(again)["alpha"] == "alpha 2" and loaders(again) == {"CachedLoader"}


def test_a_module_that_now_comes_first_on_the_search_path_is_the_one_imported(tmp_path) -> None:
    app, cache = tree(tmp_path), tmp_path / "cache"
    run(app, cache)
    run(app, cache)
    (app / "beta.py").write_text("VALUE = 'beta first'\n")  # (the script's directory comes before lib/)
    shadowed = run(app, cache)
    assert values(shadowed)["beta"] == "beta first"
    assert shadowed["beta"][1] == str(app / "beta.py")
    assert run(app, cache)["beta"][1] == str(app / "beta.py")


def test_a_removed_module_is_not_imported_from_the_cache(tmp_path) -> None:
    app, cache = tree(tmp_path), tmp_path / "cache"
    run(app, cache)
    (app / "alpha.py").unlink()
    failed = subprocess.run([sys.executable, str(app / "probe.py"), str(cache)], capture_output=True, text=True,
                            timeout=60, cwd="/", env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    assert failed.returncode == 1 and "No module named 'alpha'" in failed.stderr


@pytest.mark.parametrize("damage", ["empty", "torn", "garbage", "another python"])
def test_a_damaged_or_foreign_cache_is_ignored_and_written_again(tmp_path, damage) -> None:
    app, cache = tree(tmp_path), tmp_path / "cache"
    usual = run(app, cache)
    data = cache.read_bytes()
    damaged = {"empty": b"", "torn": data[:len(data) // 2], "garbage": data[:20] + b"\xff" * 40,
               "another python": b"\x00\x00\r\n" + data[4:]}[damage]
    cache.write_bytes(damaged)
    shown = run(app, cache)
    assert values(shown) == values(usual)
    assert cache.read_bytes() != damaged and loaders(run(app, cache)) == {"CachedLoader"}  # (written whole again)


def test_the_cache_is_written_as_bytecode_is(tmp_path) -> None:
    app, cache = tree(tmp_path), tmp_path / "cache"
    run(app, cache, env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert not cache.exists()
    run(app, cache, "write", env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert cache.is_file()
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "file" / "cache"  # (under a file: no directory can be made there)
    assert values(run(app, unwritable)) == values(run(app, cache))


def test_an_install_precompiles_what_the_commands_import_so_none_has_to_write_it(tmp_path) -> None:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-m", "vmspawnd.precompile"], env=env, check=True, timeout=300, cwd="/")
    caches = sorted(p.name for p in tmp_path.rglob("vmspawnd/__pycache__/*") if not p.name.endswith(".pyc"))
    assert caches == [f"compiled-at-import.{sys.implementation.cache_tag}.marshal",
                      f"imported-modules.{sys.implementation.cache_tag}.bin"]
    written = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("vmspawnd/__pycache__/*")
               if not p.name.endswith(".pyc")}
    for command in ("vmspawn", "vmspawnctl", "vmspawnd"):
        subprocess.run([str(Path(sys.executable).with_name(command)), "--version"], check=True, timeout=60,
                       capture_output=True, env={**env, "PYTHONDONTWRITEBYTECODE": ""})
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written} == written  # (none had more to add)
