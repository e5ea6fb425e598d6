# SPDX-License-Identifier: LGPL-2.1-or-later
"""sd_notify to our own service manager ($NOTIFY_SOCKET), via the sdnotify package."""

from __future__ import annotations

import os

import sdnotify


class ManagerNotifier:
    """Sends READY=1 / STATUS= / … to $NOTIFY_SOCKET when there is one; a no-op otherwise."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    def send(self, **fields: object) -> None:
        """Send ``KEY=VALUE`` lines, e.g. ``send(READY=1, STATUS="VM running.")``."""
        if self._notifier is None:
            return
        self._notifier.notify("\n".join(f"{k}={v}" for k, v in fields.items()))
