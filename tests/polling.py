# SPDX-License-Identifier: LGPL-2.1-or-later
"""Waiting for a condition a test can only observe by asking again."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(fetch: Callable[[], T], predicate: Callable[[T], bool], timeout: float = 60, interval: float = 0.2) -> T:
    """Call ``fetch`` until ``predicate`` holds for its result; fail with the last result on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s; last seen: {value}")
        time.sleep(interval)
