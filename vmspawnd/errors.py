# SPDX-License-Identifier: LGPL-2.1-or-later
"""Every error vmspawnd raises on purpose, in one tree (nothing here imports the rest of the package).

- :class:`VmspawndError`: the root; front ends catch it and show its message, never a traceback.
  - :class:`ConfigError`: the caller asked for something invalid (names the field and value).
  - :class:`LookupFailed`: :class:`NoSuchMachine`, :class:`MachineExists` — a name that is
    not there, or already is.
  - :class:`WrongState`: the machine is not in a state that allows the command.
  - :class:`StartError`: a run could not be started (the reason is the message).
  - :class:`HostError`: the host failed us (a full disk, a path the kernel refuses…).
  - :class:`PermissionDenied`: the caller may not do this.
  - :class:`LimitReached`: the caller has as much as one user but root may have.

The varlink interface maps each of these to its typed error in one place (``api.varlink_error``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class VmspawndError(Exception):
    """Root of every error a caller can cause or should be told about."""


class ConfigError(VmspawndError, ValueError):
    """The user asked for something invalid: carries the field, value and reason."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field}={value!s}: {reason}" if value != "" else f"invalid {field}: {reason}")


class LookupFailed(VmspawndError, LookupError):
    """A machine name that is not there, or already is."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class NoSuchMachine(LookupFailed):
    def __init__(self, name: str) -> None:
        super().__init__(name, f"no machine named {name}")


class MachineExists(LookupFailed):
    def __init__(self, name: str) -> None:
        super().__init__(name, f"a machine named {name} exists already")


class WrongState(VmspawndError):
    """The command does not fit the machine's state (e.g. Stop of a stopped machine)."""

    def __init__(self, name: str, state: str, wanted: str) -> None:
        super().__init__(f"machine {name} is {state}; {wanted}")
        self.name, self.state = name, state


class StartError(VmspawndError):
    """The VM could not be started (the reason is the message)."""


class HostError(VmspawndError):
    """The host refused an operation we could not avoid (disk full, path too long, no permission)."""

    def __init__(self, what: str, error: OSError) -> None:
        self.what = what
        self.errno = error.errno
        reason = error.strerror or str(error)
        if error.errno == errno.ENOSPC:
            reason = "no space left on the device"
        super().__init__(f"{what}: {reason}")


@contextlib.contextmanager
def naming_file(path: os.PathLike[str] | str) -> Iterator[None]:
    """Give an OSError raised inside that names no file ``path`` as its file: a write to a full disk
    names none, and whoever reports it (:class:`HostError`'s makers) can then say where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(path)
        raise


class PermissionDenied(VmspawndError):
    """The caller may not do this (``action`` names what it would need)."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(reason)
        self.action = action
        self.reason = reason


class LimitReached(VmspawndError):
    """The caller would have more than a user but root may have of something (``limit`` names it)."""

    def __init__(self, limit: str, reason: str) -> None:
        super().__init__(reason)
        self.limit = limit
        self.reason = reason
