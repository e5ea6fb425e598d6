# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest's READY/STATUS/EXIT_STATUS and a run's exit status, without any I/O."""

from __future__ import annotations

import signal

import pytest

from vmspawnd.guest.readiness import STATUS_EVENTS_PER_SECOND, Readiness, exit_status, failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_is_announced_once_and_persisted():
    r = Readiness()
    first = r.feed("READY", "1")
    assert (first.event, first.persist, r.ready) == ("ready", True, True)
    again = r.feed("READY", "1")
    assert (again.event, again.persist) == (None, False)
    assert r.feed("READY", "0").event is None


def test_status_events_are_limited_per_second_but_the_latest_status_is_kept():
    clock = Clock()
    r = Readiness(clock=clock)
    events = [r.feed("STATUS", f"step {i}").event for i in range(50)]
    assert events.count("status") == STATUS_EVENTS_PER_SECOND
    assert r.status == "step 49"  # never lost, only not announced
    assert r.feed("STATUS", "step 49").event is None  # unchanged: nothing to say
    clock.now += 1.0
    assert r.feed("STATUS", "next second").event == "status"


def test_status_is_cut_to_a_sane_length_and_not_persisted():
    r = Readiness()
    change = r.feed("STATUS", "x" * 10_000)
    assert change.event == "status" and not change.persist and len(r.status or "") == 512


@pytest.mark.parametrize("value,kept", [("0", 0), ("7", 7), ("255", 255), ("256", None), ("-1", None),
                                        ("x", None), ("", None), ("²", None), ("٣", None)])
def test_exit_status_is_kept_only_when_valid(value, kept):
    r = Readiness()
    change = r.feed("EXIT_STATUS", value)
    assert r.exit_status == kept
    assert change.persist == (kept is not None)
    assert (change.warning is None) == (kept is not None)


def test_unknown_keys_change_nothing():
    r = Readiness()
    assert r.feed("MAINPID", "1") == r.feed("X_OTHER", "y")
    assert (r.ready, r.status, r.exit_status) == (False, None, None)


@pytest.mark.parametrize("guest,rc,forced,expected", [
    (None, 0, False, 0),  # a clean power-off
    (None, None, False, 0),  # an adopted QEMU ended (its status is not ours to know)
    (None, None, True, 1),  # ... because we killed it
    (None, 0, True, 1),  # QMP quit of a guest that would not power off
    (None, 1, False, 1),  # QEMU failed
    (None, -9, False, 1),  # QEMU killed
    (5, -9, True, 5),  # the guest's EXIT_STATUS wins
])
def test_exit_status_of_a_run(guest, rc, forced, expected):
    assert exit_status(guest, rc, forced) == expected


def test_a_signal_from_outside_is_no_power_off():
    assert exit_status(None, 0, forced=False, terminated=True) == 1
    assert exit_status(5, 0, forced=False, terminated=True) == 5  # what the guest said still wins
    assert "signal from outside" in (failure(0, expected_end=False, terminated=True) or "")
    assert failure(0, expected_end=True, terminated=True) is None  # our own stop or kill


def test_failure_of_a_run():
    assert failure(0, expected_end=False) is None
    assert failure(None, expected_end=False) is None
    assert failure(3, expected_end=True) == "QEMU exited with status 3"
    assert failure(-9, expected_end=False) == "QEMU killed by signal SIGKILL"
    poweroff_on_257 = failure(-(signal.SIGRTMIN + 4), expected_end=False)
    assert poweroff_on_257 is not None and poweroff_on_257.startswith("QEMU killed by signal SIGRTMIN+4 (machinectl")
    assert failure(-9, expected_end=True) is None  # we killed it: a stop, not a failure


def test_a_guest_repeating_or_churning_its_exit_status_writes_no_file_per_line():
    """The same EXIT_STATUS again persists nothing; changes persist a few times a second at most, but
    the latest value is always the one kept (a guest writing it in a loop froze the daemon)."""
    clock = Clock()
    r = Readiness(clock=clock)
    assert r.feed("EXIT_STATUS", "3").persist
    assert [r.feed("EXIT_STATUS", "3").persist for _ in range(1000)].count(True) == 0
    persisted = [r.feed("EXIT_STATUS", str(i % 2)).persist for i in range(1000)]
    assert persisted.count(True) <= STATUS_EVENTS_PER_SECOND
    assert r.exit_status == 1
    clock.now += 1.0
    assert r.feed("EXIT_STATUS", "9").persist and r.exit_status == 9


def test_invalid_exit_statuses_are_warned_about_once_a_boot():
    r = Readiness()
    warnings = [r.feed("EXIT_STATUS", f"bogus{i}").warning for i in range(2000)]
    assert len([w for w in warnings if w]) == 1 and "bogus0" in str(warnings[0])
    assert Readiness().feed("EXIT_STATUS", "x").warning  # a new boot (a reset) may warn again


def test_an_exit_status_not_written_yet_is_written_when_it_comes_again_and_status_does_not_use_up_its_writes():
    clock = Clock()
    r = Readiness(clock=clock)
    for i in range(STATUS_EVENTS_PER_SECOND):  # a chatty guest's progress
        r.feed("STATUS", f"step {i}")
    assert r.feed("EXIT_STATUS", "3").persist  # (its own allowance)
    for i in range(50):
        r.feed("EXIT_STATUS", str(i % 2))  # past the allowance: kept in memory, not all written
    assert r.exit_status == 1
    clock.now += 1.0
    assert r.feed("EXIT_STATUS", "1").persist  # the same value again: now it is written
    assert not r.feed("EXIT_STATUS", "1").persist
