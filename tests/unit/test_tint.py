# SPDX-License-Identifier: LGPL-2.1-or-later
"""Console tint and --background validation."""

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.tint import Tinter, tint_from_background, validate_background


def test_first_chunk_starts_with_the_tint_and_newlines_reapply_it():
    t = Tinter("41")
    assert t.feed(b"hello\nworld") == b"\x1b[41m\x1b[Khello\n\x1b[41mworld"
    assert t.feed(b"\r") == b"\r\x1b[41m"


def test_background_resets_get_the_tint_appended():
    t = Tinter("41")
    t.feed(b"")
    assert t.feed(b"\x1b[0m") == b"\x1b[0;41m"
    assert t.feed(b"\x1b[m") == b"\x1b[0;41m"
    assert t.feed(b"\x1b[1;49m") == b"\x1b[1;49;41m"
    assert t.feed(b"\x1b[0;44m") == b"\x1b[0;44m"  # the guest set its own background: leave it
    assert t.feed(b"\x1b[38;5;0m") == b"\x1b[38;5;0m"  # 0 is a sub-parameter here, not a reset
    assert t.feed(b"\x1b[1m") == b"\x1b[1m"


def test_sequences_split_across_chunks_and_resets():
    t = Tinter("41")
    t.feed(b"")
    assert t.feed(b"\x1b[") == b""
    assert t.feed(b"0m") == b"\x1b[0;41m"
    assert t.feed(b"\x1bc") == b"\x1bc\x1b[41m"
    assert t.feed(b"\x1b]0;title\x07x") == b"\x1b]0;title\x07x"


def test_background_validation():
    assert validate_background("48;2;1;2;3") == "48;2;1;2;3"
    assert validate_background("") == ""
    with pytest.raises(ConfigError):
        validate_background("red")


def test_default_tint_is_green_and_lighter_on_light_terminals():
    dark = tint_from_background((0.0, 0.0, 0.0))
    light = tint_from_background((1.0, 1.0, 1.0))
    r, g, b = map(int, dark.split(";")[2:])
    assert g > r and g > b
    assert sum(map(int, light.split(";")[2:])) > sum((r, g, b))
