# SPDX-License-Identifier: LGPL-2.1-or-later
"""The machine image pool: ``vmspawn -M NAME`` without ``--image``/``--directory`` boots NAME from it."""

from __future__ import annotations

import stat
from pathlib import Path

#: Searched in this order, as systemd does for machine images.
MACHINE_POOL = (Path("/etc/machines"), Path("/run/machines"), Path("/var/lib/machines"),
                Path("/var/lib/container"), Path("/usr/local/lib/machines"), Path("/usr/lib/machines"))


def find_machine_image(name: str, pool: tuple[Path, ...] = MACHINE_POOL) -> tuple[str, Path] | None:
    """``("image", path)`` for ``NAME.raw`` (a file or block device) or a block device ``NAME``,
    ``("directory", path)`` for a directory ``NAME``; the first hit in ``pool`` wins; None if none."""
    for directory in pool:
        for candidate in (directory / f"{name}.raw", directory / name):
            try:
                mode = candidate.stat().st_mode  # symlinks followed, as the pool allows them
            except OSError:
                continue
            if stat.S_ISDIR(mode) and candidate.name == name:
                return "directory", candidate
            if stat.S_ISBLK(mode) or (stat.S_ISREG(mode) and candidate.name.endswith(".raw")):
                return "image", candidate
    return None
