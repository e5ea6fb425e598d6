# SPDX-License-Identifier: LGPL-2.1-or-later
"""The peer tier: ``@pytest.mark.peer`` tests compare our vmspawn with upstream systemd-vmspawn 262.

They are opt-in (``make test-peer``, i.e. ``pytest -m peer tests/peer``): a plain ``pytest`` run
skips them, so ``make test`` does not build a forky tree behind anyone's back. Selected, they
still skip -- with the reason -- when not root or when the tree cannot be built (no network...).
"""

from __future__ import annotations

import pytest

MARKER = "peer: compares with systemd-vmspawn 262 in a cached Debian forky tree (root; network for the first build)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "peer" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="peer comparison is opt-in: make test-peer (pytest -m peer tests/peer)")
    for item in items:
        if item.get_closest_marker("peer") is not None:
            item.add_marker(skip)
