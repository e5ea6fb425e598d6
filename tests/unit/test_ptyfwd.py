# SPDX-License-Identifier: LGPL-2.1-or-later
"""Console escape: Ctrl-] three times within one second kills the VM; two do nothing."""

from vmspawnd.ptyfwd import EscapeDetector


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_three_presses_within_a_second_fire():
    clock = Clock()
    d = EscapeDetector(clock)
    assert not d.feed(b"\x1d")
    clock.now += 0.3
    assert not d.feed(b"\x1d")
    clock.now += 0.3
    assert d.feed(b"\x1d")


def test_two_presses_then_a_pause_do_not_fire():
    clock = Clock()
    d = EscapeDetector(clock)
    assert not d.feed(b"\x1d\x1d")
    clock.now += 1.5
    assert not d.feed(b"\x1d")
    clock.now += 0.1
    assert not d.feed(b"\x1d")
    clock.now += 0.1
    assert d.feed(b"\x1d")


def test_other_bytes_reset_the_count():
    d = EscapeDetector(Clock())
    assert not d.feed(b"\x1d\x1dx\x1d")
    assert d.feed(b"\x1d\x1d")
