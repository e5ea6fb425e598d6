# SPDX-License-Identifier: LGPL-2.1-or-later
"""Test helpers for vmspawnd: the busybox test guest fixture (see :mod:`vmspawnd.testing.guest`)."""
