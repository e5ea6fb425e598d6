# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash points: ``$VMSPAWND_CRASH_AT=NAME`` makes the process SIGKILL itself at the point NAME.

Only tests set it, to prove that a daemon killed at any point of a start leaves no process,
registration or file behind that the next daemon does not find and end, and that no Create a client
was answered is lost by a crash before its definition file is durable (definitionlog.py).  The points are named
where they are placed (``crash_point("exec")``…).
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "VMSPAWND_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here, at once and without cleaning up, if the environment asks for it."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
