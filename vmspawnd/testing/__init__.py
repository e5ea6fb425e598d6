"""Test helpers for vmspawnd: the busybox test guest fixture (see :mod:`vmspawnd.testing.guest`)."""
