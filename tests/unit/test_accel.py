# SPDX-License-Identifier: LGPL-2.1-or-later
"""KVM detection must not trust "/dev/kvm exists"."""

import platform

import pytest

from vmspawnd.qemu.accel import kvm_problem

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 module names")


def test_pvm_only_kvm_is_rejected(tmp_path):
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm_pvm").mkdir()
    assert "kvm_pvm" in kvm_problem(tmp_path, device="/dev/null")


def test_hardware_kvm_is_accepted(tmp_path):
    (tmp_path / "kvm_intel").mkdir()
    assert kvm_problem(tmp_path, device="/dev/null") is None


def test_missing_device_is_reported(tmp_path):
    assert "No such file" in kvm_problem(tmp_path, device=str(tmp_path / "kvm"))
