# SPDX-License-Identifier: LGPL-2.1-or-later
"""What a VM running as an unprivileged user cannot have: each such setting is named, with why;
everything else runs as its owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmspawnd.options import parse_vmspawn_args
from vmspawnd.plan import LaunchPlan, needs_privileges
from vmspawnd.qemu.firmware import FirmwareChoice, FirmwareKind
from vmspawnd.services.virtiofsd import Flavour, Virtiofsd

RUST = Virtiofsd(Path("/usr/libexec/virtiofsd"), Flavour.RUST, readonly=True, translate_ids=True)
RUST_NO_READONLY = Virtiofsd(Path("/usr/libexec/virtiofsd"), Flavour.RUST)
C = Virtiofsd(Path("/usr/lib/qemu/virtiofsd"), Flavour.C)


def needs(*words: str, virtiofsd: Virtiofsd | None = RUST) -> list[str]:
    config = parse_vmspawn_args(["--linux=/boot/vmlinuz", "--console=headless", *words], terminal=False)
    plan = LaunchPlan(FirmwareChoice(FirmwareKind.BIOS, None, "test"), False, virtiofsd)
    return [setting for setting, _value, _why in needs_privileges(config, plan)]


def test_a_plain_vm_with_a_share_needs_nothing(tmp_path: Path) -> None:
    assert needs(f"--bind={tmp_path}:/mnt", f"--bind-ro={tmp_path}:/ro", "--tpm=yes", "--network-user-mode") == []


@pytest.mark.parametrize("words, setting", [
    (["--network-tap"], "network-tap"),
    (["--slice=other"], "slice"),
    (["--property=CPUWeight=10000"], "property"),
    (["--keep-unit"], "keep-unit"),
    (["--bind-user=root"], "bind-user"),
])
def test_what_needs_root_is_named(words: list[str], setting: str) -> None:
    assert needs(*words) == [setting]


def test_shares_that_need_root(tmp_path: Path) -> None:
    assert needs(f"--directory={tmp_path}", "--private-users=100000", "--linux=/boot/vmlinuz") == ["private-users"]
    assert needs(f"--directory={tmp_path}", "--ephemeral") == ["ephemeral"]
    assert needs(f"--bind={tmp_path}", virtiofsd=C) == ["bind"]  # QEMU's C virtiofsd runs only as root
    assert needs(f"--bind-ro={tmp_path}", virtiofsd=RUST_NO_READONLY) == ["bind-ro"]
    assert needs(f"--bind={tmp_path}", virtiofsd=RUST_NO_READONLY) == []
