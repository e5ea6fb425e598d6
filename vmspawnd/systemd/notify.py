# SPDX-License-Identifier: LGPL-2.1-or-later
"""sd_notify to our own service manager ($NOTIFY_SOCKET): messages via the sdnotify package, and
messages with file descriptors (the fd store, systemd/fdstore.py) via systemd-python, as sdnotify
cannot pass them."""

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


def send_with_fds(message: str, fds: list[int]) -> object:
    """Send ``message`` with ``fds`` attached (SCM_RIGHTS); raises OSError if it cannot be sent."""
    from systemd import daemon  # on first use: the commands that share this package start faster

    return daemon.notify(message, fds=fds)
