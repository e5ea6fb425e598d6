# SPDX-License-Identifier: LGPL-2.1-or-later
"""Two small asyncio helpers the layers share: resolving a future from a callback, and a done one."""

from __future__ import annotations

import asyncio


def resolve(future: asyncio.Future[None]) -> None:
    """Set ``future``'s result unless it is done already (a reader callback may run twice, a waiter
    may have been cancelled)."""
    if not future.done():
        future.set_result(None)


def resolved(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future that is done already (for an API that returns one when there is nothing to wait for)."""
    future: asyncio.Future[None] = loop.create_future()
    future.set_result(None)
    return future
