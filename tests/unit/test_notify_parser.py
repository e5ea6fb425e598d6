# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest notify parser: valid messages pass, garbage is bounded and dropped."""

import os

from vmspawnd.guest.channel import MAX_GARBAGE, MAX_LINE, NotifyParser


def test_lines_split_across_chunks():
    p = NotifyParser()
    assert p.feed(b"READ") == []
    assert p.feed(b"Y=1\nSTATUS=booting up\n") == [("READY", "1"), ("STATUS", "booting up")]


def test_carriage_returns_end_lines_too():
    assert NotifyParser().feed(b"READY=1\r\nEXIT_STATUS=3\r") == [("READY", "1"), ("EXIT_STATUS", "3")]


def test_overlong_line_is_dropped_and_the_next_line_still_parses():
    p = NotifyParser()
    assert p.feed(b"STATUS=" + b"x" * (MAX_LINE * 3)) == []
    assert p.feed(b"y" * 100 + b"\nREADY=1\n") == [("READY", "1")]


def test_binary_garbage_does_not_hide_a_following_ready():
    p = NotifyParser()
    junk = os.urandom(200_000).replace(b"READY=1", b"")
    assert ("READY", "1") in p.feed(junk + b"\n\xff\xfe\x00=1\nREADY=1\n")


def test_invalid_keys_are_ignored():
    assert NotifyParser().feed(b"ready=1\n=1\nNOEQUALS\nA B=1\nX_Y=ok\n") == [("X_Y", "ok")]


def test_a_guest_that_only_sends_garbage_is_cut_off():
    p = NotifyParser()
    for _ in range(MAX_GARBAGE // 65536 + 2):
        p.feed(b"\xff" * 65536)
    assert p.exhausted
    assert p.feed(b"\nREADY=1\n") == []


def test_vsock_message_limit():
    p = NotifyParser()
    assert p.feed_message(b"STATUS=hi\nREADY=1") == [("STATUS", "hi"), ("READY", "1")]
    assert p.feed_message(b"READY=1\n" + b"x" * MAX_LINE) == []
