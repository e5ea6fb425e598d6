"""QEMU firmware descriptors ("interop" JSON): discovery in the standard search path.

Search path, highest priority first: $XDG_CONFIG_HOME/qemu/firmware, /etc/qemu/firmware,
$XDG_DATA_HOME and $XDG_DATA_DIRS entries + /qemu/firmware, /usr/share/qemu/firmware.  A file
name in a higher-priority directory hides the same name below it; an empty file (or a link to
/dev/null) masks it.  The result is ordered by file name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()


def search_path() -> list[Path]:
    home = Path.home()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    data_home = Path(os.environ.get("XDG_DATA_HOME") or home / ".local/share")
    data_dirs = [Path(d) for d in (os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share").split(":") if d]
    dirs = [config_home / "qemu/firmware", Path("/etc/qemu/firmware"),
            *(d / "qemu/firmware" for d in [data_home, *data_dirs]), Path("/usr/share/qemu/firmware")]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


@dataclass(frozen=True)
class Descriptor:
    """One firmware descriptor file; ``valid`` is False when it could not be parsed."""

    path: Path
    description: str | None = None
    interface_types: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    valid: bool = True


def load_descriptor(path: Path) -> Descriptor:
    """Parse one descriptor; a malformed one is returned with ``valid=False`` and a warning."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Descriptor(path=path, description=str(data.get("description", "")),
                          interface_types=tuple(str(x) for x in data.get("interface-types", [])),
                          features=tuple(str(x) for x in data.get("features", [])), data=data)
    except (OSError, ValueError, TypeError) as e:
        log.warning("skipping malformed firmware descriptor", path=str(path), error=str(e))
        return Descriptor(path=path, valid=False)


def enumerate_descriptors(dirs: list[Path] | None = None) -> list[Descriptor]:
    """Every descriptor in the search path, shadowed and masked by file name, sorted by file name."""
    chosen: dict[str, Path | None] = {}
    for directory in dirs if dirs is not None else search_path():
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name in chosen:
                continue
            masked = entry.resolve() == Path("/dev/null") or (entry.is_file() and entry.stat().st_size == 0)
            chosen[entry.name] = None if masked else entry
    return [load_descriptor(p) for _, p in sorted(chosen.items()) if p is not None]
