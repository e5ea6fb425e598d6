# SPDX-License-Identifier: LGPL-2.1-or-later
"""The machine image pool lookup behind ``vmspawn -M NAME``."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.images import find_machine_image
from vmspawnd.options import parse_vmspawn_args


def test_first_pool_directory_wins_and_raw_files_and_directories_are_found(tmp_path):
    first, second = tmp_path / "etc", tmp_path / "var"
    for d in (first, second):
        d.mkdir()
    (second / "web.raw").write_bytes(b"\0" * 512)
    (second / "tree").mkdir()
    (first / "notes").write_text("a plain file is not a machine")
    pool = (first, second)
    assert find_machine_image("web", pool) == ("image", second / "web.raw")
    assert find_machine_image("tree", pool) == ("directory", second / "tree")
    assert find_machine_image("notes", pool) is None
    assert find_machine_image("missing", pool) is None
    (first / "web").mkdir()  # an earlier pool directory shadows a later one
    assert find_machine_image("web", pool) == ("directory", first / "web")
    (second / "link.raw").symlink_to(second / "web.raw")
    assert find_machine_image("link", pool) == ("image", second / "link.raw")


def test_machine_name_alone_with_nothing_in_the_pool_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        parse_vmspawn_args(["-M", "vmspawnd-no-such-machine-anywhere"])
    assert e.value.field == "linux" and "/var/lib/machines" in e.value.reason


def test_machine_name_with_a_kernel_and_nothing_in_the_pool_boots_the_kernel_alone(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    config = parse_vmspawn_args(["-M", "vmspawnd-no-such-machine-anywhere", f"--linux={kernel}"])
    assert config.image is None and config.directory is None and config.linux == Path(kernel)
