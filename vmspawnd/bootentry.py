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


def _files(tree: Path, directory: str, pattern: str) -> list[tuple[str, Path]]:
    """``(name, host path)`` of each regular file matching ``pattern`` in the tree's ``directory``, each
    looked up inside the tree (a link among them is followed as the guest would)."""
    found = chase(tree, directory)
    if found is None or not found.is_dir():
        return []
    files = ((entry.name, chase(tree, f"{directory}/{entry.name}")) for entry in sorted(found.glob(pattern)))
    return [(name, path) for name, path in files if path is not None and path.is_file()]


def _type1_entries(tree: Path, partition: str) -> list[_Candidate]:
    found = []
    for name, conf in _files(tree, f"{partition}/loader/entries", "*.conf"):
        fields = _read_entry(conf)
        if fields is None:
            continue
        kernel = _first(fields, "linux") or _first(fields, "efi")
        linux = chase(tree, f"{partition}/{kernel}") if kernel else None  # (its paths are the partition's)
        initrds = [chase(tree, f"{partition}/{p}") for p in fields.get("initrd", [])]
        files = [p for p in (linux, *initrds) if p is not None and p.is_file()]
        if linux is None or len(files) != 1 + len(initrds):
            continue
        found.append(_Candidate(BootEntry(name, files[0], tuple(files[1:])), _first(fields, "sort-key"),
                                _first(fields, "machine-id"), _first(fields, "version")))
    return found


def _type2_entries(tree: Path, partition: str) -> list[_Candidate]:
    found = []
    for name, image in _files(tree, f"{partition}/EFI/Linux", "*.efi"):
        try:
            usable = is_uki(image)
        except OSError:
            usable = False
        if usable:
            found.append(_Candidate(BootEntry(name, image), "", "", ""))
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
        words = line.split(None, 1)  # (key and value are separated by spaces or tabs)
        if words and not words[0].startswith("#"):
            fields.setdefault(words[0], []).append(words[1].strip() if len(words) > 1 else "")
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
