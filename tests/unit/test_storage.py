# SPDX-License-Identifier: LGPL-2.1-or-later
"""Definitions are written atomically: the old or the new file, never a torn one."""

import dataclasses
import json
import os

import pytest

from vmspawnd.api import Config
from vmspawnd.errors import ConfigError
from vmspawnd.options import parse_vmspawn_args
from vmspawnd.plan import plan_launch
from vmspawnd.settings import JSON_FIELDS, config_from_json, config_to_json
from vmspawnd.storage import write_json_atomic


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
