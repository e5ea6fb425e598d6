# SPDX-License-Identifier: LGPL-2.1-or-later
"""A directory booted without --linux: the kernel of its Boot Loader Specification entry, looked up
inside the tree only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_uki import make_pe
from vmspawnd.bootentry import chase, find_boot_entry
from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.plan import plan_launch


def entry(tree: Path, name: str, *lines: str, partition: str = "boot") -> None:
    entries = tree / partition / "loader" / "entries"
    entries.mkdir(parents=True, exist_ok=True)
    (entries / f"{name}.conf").write_text("\n".join(lines) + "\n")


def kernel(tree: Path, path: str) -> Path:
    file = tree / path.lstrip("/")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"kernel " + path.encode())
    return file


def test_the_newest_entry_is_booted_with_its_initrds(tmp_path):
    for version in ("6.1.0", "6.10.0", "6.9.2"):
        kernel(tmp_path, f"/boot/vmlinuz-{version}")
        kernel(tmp_path, f"/boot/initrd-{version}")
        entry(tmp_path, f"debian-{version}", "title Debian", f"version {version}", f"linux /vmlinuz-{version}",
              f"initrd /initrd-{version}", f"initrd /initrd-{version}", "options quiet")
    found = find_boot_entry(tmp_path)
    assert found.id == "debian-6.10.0.conf"  # 6.10 after 6.9: versions compare as numbers
    assert found.linux == tmp_path / "boot/vmlinuz-6.10.0"
    assert found.initrds == (tmp_path / "boot/initrd-6.10.0",) * 2


def test_a_sort_key_comes_first_and_loader_conf_names_the_default(tmp_path):
    kernel(tmp_path, "/efi/a")
    kernel(tmp_path, "/efi/b")
    kernel(tmp_path, "/efi/c")
    entry(tmp_path, "new", "version 9", "linux /a", partition="efi")
    entry(tmp_path, "sorted", "sort-key zzz", "version 1", "linux /b", partition="efi")
    assert find_boot_entry(tmp_path).linux == tmp_path / "efi/b"
    entry(tmp_path, "chosen-1", "linux /c", partition="efi")
    (tmp_path / "efi/loader/loader.conf").write_text("timeout 3\ndefault chosen-*\n")
    assert find_boot_entry(tmp_path).id == "chosen-1.conf"


def test_a_unified_kernel_image_in_efi_linux_is_an_entry(tmp_path):
    (tmp_path / "efi/EFI/Linux").mkdir(parents=True)
    make_pe(tmp_path / "efi/EFI/Linux/not-a-uki.efi", [".text"])
    uki = make_pe(tmp_path / "efi/EFI/Linux/linux-6.1.efi", [".text", ".osrel", ".linux"])
    assert find_boot_entry(tmp_path).linux == uki


def test_paths_and_links_never_leave_the_tree(tmp_path):
    tree = tmp_path / "tree"
    host_file = kernel(tmp_path, "/host-secret")  # beside the tree, as /etc/shadow would be
    inside = kernel(tree, "/host-secret")
    assert chase(tree, "/../../host-secret") == inside  # ".." stops at the tree's root
    (tree / "boot").mkdir()
    os.symlink("/host-secret", tree / "boot" / "vmlinuz")  # absolute: taken inside the tree
    os.symlink("../../../host-secret", tree / "boot" / "relative")
    assert chase(tree, "/boot/vmlinuz") == inside and chase(tree, "/boot/relative") == inside
    inside.unlink()
    assert chase(tree, "/boot/vmlinuz") is None and host_file.exists()
    os.symlink("loop", tree / "boot" / "loop")
    assert chase(tree, "/boot/loop") is None
    entry(tree, "escape", "linux /vmlinuz")
    with pytest.raises(ConfigError, match="no boot loader entry") as e:
        find_boot_entry(tree)  # its kernel is not in the tree: no entry
    assert e.value.field == "directory"


def test_plan_boots_the_entry_and_a_tree_without_one_is_refused_by_name(tmp_path):
    kernel(tmp_path, "/boot/vmlinuz")
    config = MachineConfig(name="tree", directory=tmp_path)
    with pytest.raises(ConfigError, match=r"invalid directory=.*no boot loader entry.*pass --linux=KERNEL"):
        plan_launch(config)
    entry(tmp_path, "only", "linux /vmlinuz")
    plan = plan_launch(config)
    assert plan.effective(config).linux == tmp_path / "boot/vmlinuz" and plan.effective(config).initrds == ()
    named = MachineConfig(name="tree", directory=tmp_path, linux=tmp_path / "boot/vmlinuz")
    assert plan_launch(named).boot_entry is None  # --linux wins


def test_entry_files_that_are_links_are_followed_inside_the_tree(tmp_path):
    """A loader entry or UKI that is an absolute link: the tree's file it names, never the host's."""
    tree = tmp_path / "tree"
    host_conf = tmp_path / "entry.conf"  # beside the tree: what the link would name on the host
    host_conf.write_text("linux /vmlinuz\n")
    kernel(tree, "/boot/vmlinuz")
    (tree / "boot/loader/entries").mkdir(parents=True)
    os.symlink(str(host_conf), tree / "boot/loader/entries/linked.conf")
    with pytest.raises(ConfigError, match="no boot loader entry"):
        find_boot_entry(tree)  # (the tree has no such file)
    kernel(tree, str(host_conf)).write_text("linux\t/vmlinuz\n")  # now it has: its own
    assert find_boot_entry(tree).linux == tree / "boot/vmlinuz"
    (tree / "efi/EFI/Linux").mkdir(parents=True)
    uki = make_pe(tree / "efi/uki-store.efi", [".text", ".linux"])
    os.symlink("/efi/uki-store.efi", tree / "efi/EFI/Linux/linux.efi")
    entry(tree, "gone", "linux /nothing", partition="efi")
    (tree / "efi/loader/loader.conf").write_text("default linux.efi\n")
    assert find_boot_entry(tree).linux == uki
