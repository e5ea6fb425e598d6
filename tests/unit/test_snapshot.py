# SPDX-License-Identifier: LGPL-2.1-or-later
"""--ephemeral copies of --directory trees: made with real cp, removed only when they are copies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmspawnd.snapshot import EphemeralCopy, SnapshotError, copy_path, is_copy_of, remove_copy, snapshot_directory


@pytest.fixture
def tree(tmp_path) -> Path:
    t = tmp_path / "tree"
    (t / "etc").mkdir(parents=True)
    (t / "etc" / "hostname").write_text("original\n")
    os.symlink("/etc/passwd", t / "etc" / "link")
    return t


def test_copy_is_a_full_hidden_sibling_and_removal_takes_only_it(tree):
    target = copy_path(tree)
    assert target.parent == tree.parent and target.name.startswith(".#tree.")
    snapshot_directory(tree, target)
    assert (target / "etc" / "hostname").read_text() == "original\n"
    assert os.readlink(target / "etc" / "link") == "/etc/passwd"  # links copied as links
    (target / "locked").mkdir()
    (target / "locked" / "f").write_text("x")
    (target / "locked").chmod(0)  # a guest may leave directories nobody can enter
    remove_copy(target, tree)
    assert not target.exists() and (tree / "etc" / "hostname").read_text() == "original\n"
    assert Path("/etc/passwd").exists()


def test_a_symlinked_tree_is_copied_not_linked(tree, tmp_path):
    link = tmp_path / "machines" / "web"
    link.parent.mkdir()
    link.symlink_to(tree)
    target = copy_path(link)
    assert target.parent == tree.parent  # beside the real tree
    snapshot_directory(link, target)
    assert not target.is_symlink() and (target / "etc" / "hostname").is_file()
    (target / "etc" / "hostname").write_text("changed in the copy\n")
    assert (tree / "etc" / "hostname").read_text() == "original\n"
    remove_copy(target, link)
    assert not target.exists()


def test_an_existing_name_is_never_copied_into_or_removed(tree):
    taken = copy_path(tree)
    taken.mkdir()
    (taken / "someone-elses").write_text("keep")
    with pytest.raises(SnapshotError, match="File exists"):
        snapshot_directory(tree, taken)
    assert (taken / "someone-elses").read_text() == "keep"


@pytest.mark.parametrize("name", ["tree", ".#tree", ".#tree.notsixteenhexdigits", ".#other.0123456789abcdef"])
def test_only_copies_of_the_tree_are_ever_removed(tree, name):
    victim = tree.parent / name if name != "tree" else tree
    victim.mkdir(exist_ok=True)
    assert not is_copy_of(victim, tree)
    remove_copy(victim, tree)
    assert victim.exists()


def test_a_symlink_named_like_a_copy_is_not_followed(tree, tmp_path):
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "data").write_text("keep")
    fake = tree.parent / ".#tree.0123456789abcdef"
    fake.symlink_to(elsewhere)
    remove_copy(fake, tree)
    assert (elsewhere / "data").read_text() == "keep"


async def test_a_recorded_copy_is_removed_though_its_tree_was_re_pointed_since(tree, tmp_path):
    """A link to the tree re-pointed while the VM ran (an atomic upgrade), or a definition changed:
    the copy is still known as one by the tree recorded with it."""
    other = tmp_path / "other"
    other.mkdir()
    link = tmp_path / "current"
    link.symlink_to(tree)
    record = tmp_path / "ephemeral-copy"
    async with EphemeralCopy(link, record) as copy:
        link.unlink()
        link.symlink_to(other)
        later = EphemeralCopy.recorded(record, link)  # as the next run (or daemon) finds it
        assert later is not None and later.path == copy and later.source == tree
        await later.remove()
    assert not copy.exists() and not record.exists() and (tree / "etc" / "hostname").is_file()


async def test_a_cp_left_copying_is_ended_and_the_record_kept_until_the_copy_is_gone(tree, tmp_path, monkeypatch):
    record = tmp_path / "ephemeral-copy"
    copy = copy_path(tree)
    copy.mkdir()
    record.write_text(f"{copy}\n{tree}\n")
    copying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{copy}/"])  # as cp's argv
    try:
        found = EphemeralCopy.recorded(record)
        assert found is not None
        await found.remove()
        assert copying.wait(5) == -signal.SIGKILL
        assert not copy.exists() and not record.exists()
    finally:
        copying.kill()
    copy.mkdir()
    record.write_text(f"{copy}\n{tree}\n")
    found = EphemeralCopy.recorded(record)
    assert found is not None
    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # a removal that leaves it (EBUSY, say)
        await found.remove()
    assert copy.exists() and record.exists()  # for the next run to remove
    await found.remove()
    assert not copy.exists() and not record.exists()
