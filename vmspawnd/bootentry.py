# SPDX-License-Identifier: LGPL-2.1-or-later
"""The kernel of a directory tree booted without ``--linux``: its Boot Loader Specification entries.

The tree's ESP is ``<tree>/efi`` and its XBOOTLDR ``<tree>/boot``.  Type 1 entries are
``loader/entries/*.conf`` on either (``linux``, ``initrd`` lines; or ``efi`` naming a unified
kernel image); type 2 entries are the unified kernel images in ``EFI/Linux/*.efi``.  The entries are
ordered as systemd-boot orders them (``sort-key``, ``machine-id``, then the newest ``version`` or file
name first); the default is the first one ``default`` in ``<ESP>/loader/loader.conf`` matches, else
the first.

Every path is looked up inside the tree: ``..`` stops at the tree's root and symbolic links are
followed as the guest would follow them (an absolute target is taken inside the tree), so a tree
cannot make the VM boot a host file.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.qemu.firmware import is_uki

MAX_LINKS = 40  # symbolic links followed in one lookup, as the kernel allows
MAX_ENTRY_SIZE = 64 * 1024


@dataclass(frozen=True)
class BootEntry:
    """What QEMU boots: a kernel (or unified kernel image) and its initrds, as paths on the host."""

    id: str
    linux: Path
    initrds: tuple[Path, ...] = ()


@dataclass(frozen=True)
class _Candidate:
    entry: BootEntry
    sort_key: str
    machine_id: str
    version: str


def find_boot_entry(tree: Path) -> BootEntry:
    """The entry systemd-vmspawn would boot from ``tree``; ConfigError (naming ``directory``) if none."""
    found: list[_Candidate] = []
    for partition in ("efi", "boot"):
        found += _type1_entries(tree, partition)
        found += _type2_entries(tree, partition)
    if not found:
        raise ConfigError("directory", str(tree), "no boot loader entry in its /efi or /boot "
                          "(loader/entries/*.conf or EFI/Linux/*.efi): pass --linux=KERNEL")
    found.sort(key=_order)
    pattern = _default_pattern(tree)
    if pattern:
        for candidate in found:
            if fnmatch.fnmatchcase(candidate.entry.id, pattern):
                return candidate.entry
    return found[0].entry


def chase(tree: Path, path: str) -> Path | None:
    """``path`` as seen from inside ``tree`` (its root), on the host; None if it is not there."""
    current = tree
    rest = [part for part in path.split("/") if part not in ("", ".")]
    links = 0
    while rest:
        part = rest.pop(0)
        if part == "..":
            if current != tree:
                current = current.parent
            continue
        candidate = current / part
        try:
            target = os.readlink(candidate)
        except FileNotFoundError:
            return None
        except OSError:  # not a link (EINVAL), or a component that is no directory
            if not candidate.exists():
                return None
            current = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            return None
        if target.startswith("/"):
            current = tree
        rest[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return current


def _type1_entries(tree: Path, partition: str) -> list[_Candidate]:
    entries = chase(tree, f"{partition}/loader/entries")
    if entries is None or not entries.is_dir():
        return []
    found = []
    for conf in sorted(entries.glob("*.conf")):
        fields = _read_entry(conf)
        if fields is None:
            continue
        kernel = fields.get("linux", [None])[0] or fields.get("efi", [None])[0]
        linux = chase(tree, f"{partition}/{kernel}") if kernel else None  # (its paths are the partition's)
        if linux is None or not linux.is_file():
            continue
        initrds = tuple(chase(tree, f"{partition}/{p}") for p in fields.get("initrd", []))
        if any(p is None or not p.is_file() for p in initrds):
            continue
        entry = BootEntry(conf.name.removesuffix(".conf") + ".conf", linux,
                          tuple(p for p in initrds if p is not None))
        found.append(_Candidate(entry, _first(fields, "sort-key"), _first(fields, "machine-id"),
                                _first(fields, "version")))
    return found


def _type2_entries(tree: Path, partition: str) -> list[_Candidate]:
    directory = chase(tree, f"{partition}/EFI/Linux")
    if directory is None or not directory.is_dir():
        return []
    found = []
    for image in sorted(directory.glob("*.efi")):
        resolved = chase(directory, image.name)
        try:
            usable = resolved is not None and resolved.is_file() and is_uki(resolved)
        except (OSError, ValueError):
            usable = False
        if usable and resolved is not None:
            found.append(_Candidate(BootEntry(image.name, resolved), "", "", ""))
    return found


def _read_entry(conf: Path) -> dict[str, list[str]] | None:
    try:
        with conf.open("rb") as f:
            data = f.read(MAX_ENTRY_SIZE + 1)
    except OSError:
        return None
    if len(data) > MAX_ENTRY_SIZE:
        return None
    fields: dict[str, list[str]] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            fields.setdefault(key, []).append(value.strip())
    return fields


def _first(fields: dict[str, list[str]], key: str) -> str:
    return fields.get(key, [""])[0]


def _default_pattern(tree: Path) -> str:
    conf = chase(tree, "efi/loader/loader.conf")
    fields = _read_entry(conf) if conf is not None and conf.is_file() else None
    return _first(fields, "default") if fields else ""


def _order(candidate: _Candidate) -> tuple[object, ...]:
    """Entries with a sort-key first, by it; then machine-id; then the newest version (or file name)."""
    newest_first = _Descending(candidate.version or candidate.entry.id)
    return (candidate.sort_key == "", candidate.sort_key, candidate.machine_id, newest_first)


_VERSION_PART = re.compile(r"[0-9]+|[A-Za-z]+|~|\^")


class _Descending:
    """A version string that sorts the newest first (numbers compare as numbers, ``~`` before all)."""

    def __init__(self, text: str) -> None:
        self.key = [(-1, 0, "") if part == "~" else (2, int(part), "") if part.isdecimal() else (1, 0, part)
                    for part in _VERSION_PART.findall(text)]

    def __lt__(self, other: _Descending) -> bool:
        return self.key > other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.key == other.key
