# SPDX-License-Identifier: LGPL-2.1-or-later
"""Definitions are written atomically: the old or the new file, never a torn one; where making a file is
slow, the next one is made ahead; temporary files of a daemon that is gone are removed."""

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import threading

import pytest

from tests.polling import poll
from vmspawnd.definitionlog import FILE_NAME as DEFINITIONS_LOG
from vmspawnd.errors import ConfigError
from vmspawnd.interface import Config
from vmspawnd.manager import Manager
from vmspawnd.options import parse_vmspawn_args
from vmspawnd.plan import plan_launch
from vmspawnd.settings import JSON_FIELDS, config_from_json, config_to_json
from vmspawnd.storage import FileAhead, remove_leftover_temps, write_json_atomic


def test_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"v": 1})
    write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failure_while_writing_keeps_the_old_definition(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"v": 1})

    def crash(*_args, **_kw):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        write_json_atomic(path, {"v": 2, "big": "x" * 100000})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def made_ahead(directory) -> list:
    return sorted(p for p in directory.iterdir() if p.name.startswith(".ahead."))


def one_made_ahead(directory):
    """The one file made ahead in ``directory``, once the worker made it."""
    [made] = poll(lambda: made_ahead(directory), lambda found: len(found) == 1, timeout=10, interval=0.01)
    return made


def workers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("file-ahead")]


def test_where_making_a_file_is_slow_the_next_write_fills_one_made_ahead(tmp_path):
    others = len(workers())  # (of other tests' daemons)
    ahead = FileAhead(tmp_path)
    ahead.SLOW_NS = 10**12  # every file is fast to make
    write_json_atomic(tmp_path / "a.json", {"v": "a"}, ahead=ahead)
    assert not made_ahead(tmp_path) and len(workers()) == others  # none made ahead, no thread
    ahead.SLOW_NS = -1  # every file is slow to make
    write_json_atomic(tmp_path / "b.json", {"v": "b"}, ahead=ahead)
    spare = one_made_ahead(tmp_path)
    assert spare.stat().st_size == 0 and spare.stat().st_mode & 0o777 == 0o600 and len(workers()) == others + 1
    inode = spare.stat().st_ino
    write_json_atomic(tmp_path / "c.json", {"v": "c"}, ahead=ahead)
    assert (tmp_path / "c.json").stat().st_ino == inode  # the file made ahead, filled and renamed
    assert json.loads((tmp_path / "c.json").read_text()) == {"v": "c"}
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o600
    assert one_made_ahead(tmp_path) != spare  # and the next one made
    ahead.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]
    assert len(workers()) == others


def test_where_files_cannot_be_made_unnamed_they_are_still_made_ahead(tmp_path, no_tmpfile):
    ahead = FileAhead(tmp_path)
    ahead.SLOW_NS = -1  # every file is slow to make
    write_json_atomic(tmp_path / "a.json", {"v": "a"}, ahead=ahead)
    spare = one_made_ahead(tmp_path)
    inode = spare.stat().st_ino
    write_json_atomic(tmp_path / "b.json", {"v": "b"}, ahead=ahead)
    assert json.loads((tmp_path / "b.json").read_text()) == {"v": "b"}
    assert (tmp_path / "b.json").stat().st_ino == inode
    ahead.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_with_its_directory_gone_a_write_fails_as_it_would_and_files_are_made_ahead_again_once_it_is_back(tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    ahead = FileAhead(directory)
    ahead.SLOW_NS = -1  # every file is slow to make
    write_json_atomic(directory / "m.json", {"v": 0}, ahead=ahead)
    one_made_ahead(directory)
    shutil.rmtree(directory)  # (with the file made ahead)
    for _ in range(2):  # the file made ahead, then the one it makes (or fails to) meanwhile
        with pytest.raises(FileNotFoundError):
            write_json_atomic(directory / "m.json", {"v": 1}, ahead=ahead)
    directory.mkdir()
    write_json_atomic(directory / "m.json", {"v": 1}, ahead=ahead)
    write_json_atomic(directory / "n.json", {"v": 2}, ahead=ahead)
    assert json.loads((directory / "m.json").read_text()) == {"v": 1}
    assert json.loads((directory / "n.json").read_text()) == {"v": 2}
    one_made_ahead(directory)
    ahead.close()
    assert sorted(p.name for p in directory.iterdir()) == ["m.json", "n.json"]


def a_pid_that_is_gone() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_processes_that_are_gone_are_removed_at_load_and_those_of_live_ones_kept(tmp_path):
    (tmp_path / "run").mkdir(mode=0o700)
    manager = Manager(tmp_path / "state", tmp_path / "run")
    manager.definitions.mkdir(parents=True)
    write_json_atomic(manager.definitions / "m.json", {"name": "m", "owner": 0, "runAs": 0,
                                                       "config": {"linux": "/bin/sh"}})
    gone = a_pid_that_is_gone()
    # (named with our pid: an earlier process's, as nothing of ours is written before the load)
    leftovers = [f".m.json.{gone}-3.tmp", f".ahead.{gone}-0.tmp", f".ahead.{os.getpid()}-0.tmp"]
    kept = [".ahead.1-0.tmp", ".notes.tmp", "m.json"]
    for name in leftovers + kept[:-1]:
        (manager.definitions / name).write_text("")
    asyncio.run(manager.load())
    assert sorted(p.name for p in manager.definitions.iterdir()) == sorted([*kept, DEFINITIONS_LOG])
    assert list(manager.machines) == ["m"]
    assert remove_leftover_temps(manager.definitions) == []


def test_the_varlink_config_type_covers_every_config_field(tmp_path):
    assert [f.name for f in dataclasses.fields(Config)] == list(JSON_FIELDS)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    config = parse_vmspawn_args([f"--linux={kernel}", "--ram=1G:2G:2", "--cpus=2", "--notify-ready=no", "x=y"])
    assert config_from_json(config.name, config_to_json(config)) == config
    assert set(config_to_json(config)) == set(JSON_FIELDS)


def test_binds_with_colons_and_backslashes_round_trip(tmp_path):
    odd = tmp_path / "a:b\\c"
    odd.mkdir()
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    escaped = str(odd).replace(":", "\\:")
    config = parse_vmspawn_args([f"--linux={kernel}", "--firmware=none", f"--bind={escaped}:/x\\:y"])
    assert config.binds[0].source == odd and str(config.binds[0].destination) == "/x:y"
    assert config_from_json(config.name, config_to_json(config)) == config


def test_stored_definitions_load_even_when_their_files_are_gone(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    config = parse_vmspawn_args([f"--linux={kernel}", "--firmware=none"])
    data = config_to_json(config)
    kernel.unlink()
    assert config_from_json(config.name, data).linux == kernel
    with pytest.raises(ConfigError):
        plan_launch(config_from_json(config.name, data))  # starting it is another matter
