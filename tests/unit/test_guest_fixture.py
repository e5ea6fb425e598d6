# SPDX-License-Identifier: LGPL-2.1-or-later
"""Tests for the busybox test-guest fixture (vmspawnd.testing.guest)."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vmspawnd.testing import guest as g

# ---------------------------------------------------------------- fast, no build


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMSPAWND_GUEST_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert g.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("VMSPAWND_GUEST_CACHE")
    assert g.default_cache_dir() == tmp_path / "xdg/vmspawnd/guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert g.default_cache_dir() == tmp_path / "home/.cache/vmspawnd/guest"


def test_cache_key_covers_every_input() -> None:
    base = ("linux-image-6.1.0-1-cloud-amd64", "6.1.1-1", "ab" * 32, "#!/bin/sh\n", ("virtio_pci",))
    key = g.cache_key(*base)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert g.cache_key(*base) == key
    for i, other in enumerate(("linux-image-x", "6.1.1-2", "cd" * 32, "#!/bin/sh\n:\n", ("evdev",))):
        changed = list(base)
        changed[i] = other
        assert g.cache_key(*changed) != key, f"input {i} does not change the key"


def test_init_script_parses() -> None:
    busybox = g.find_busybox()
    subprocess.run([busybox, "sh", "-n", "-c", g.INIT_SCRIPT], check=True)


def test_init_script_handles_documented_words() -> None:
    handled = set(re.findall(r"^\s*(test\.[a-z_]+)=\*\)", g.INIT_SCRIPT, re.M))
    documented = set(re.findall(r"^#\s+(test\.[a-z_]+)=", g.INIT_SCRIPT, re.M))
    assert handled == set(g.INIT_WORDS)
    assert set(g.INIT_WORDS) <= documented | {"test.notify_timeout"}


def test_init_script_essentials() -> None:
    script = g.INIT_SCRIPT
    first_modprobe = next(line for line in script.splitlines() if "modprobe" in line)
    assert "virtio_console" in first_modprobe
    assert "exec </dev/console >/dev/console 2>&1" in script
    assert 'echo "TESTGUEST: $*"' in script
    for needle in (
        "io.systemd.notify",
        "/sys/class/virtio-ports/",
        "READY=1",
        "EXIT_STATUS=",
        "timeout ",
        "io.systemd.credential:",
        "io.systemd.credential.binary:",
        "/sys/firmware/dmi/entries/11-",
        "qemu_fw_cfg/by_name/opt/io.systemd.credentials/",
        "Power Button",
        "sysrq-trigger",
        "setsid cttyhack sh",
        "poweroff -f",
        "reboot -f",
        "mount -t virtiofs",
    ):
        assert needle in script, needle


def test_newc_roundtrip_and_busybox_lists_it(tmp_path: Path) -> None:
    entries = [
        g.CpioEntry("bin", stat.S_IFDIR | 0o755),
        g.CpioEntry("bin/prog", stat.S_IFREG | 0o755, b"#!/bin/sh\necho odd-sized\n"),
        g.CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"prog"),
        g.CpioEntry("dev", stat.S_IFDIR | 0o755),
        g.CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    data = g.write_newc(entries)
    assert len(data) % 4 == 0
    parsed = g.read_newc(data)
    assert list(parsed) == [e.name for e in entries]
    assert parsed["bin/prog"].data == entries[1].data
    assert parsed["dev/console"].rdev == (5, 1)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(data)
    listing = subprocess.run(
        [g.find_busybox(), "cpio", "-t", "-F", archive], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing == [e.name for e in entries]


def test_module_closure() -> None:
    table = g.parse_modules_dep(
        "kernel/a/virtio_pci.ko: kernel/a/virtio.ko kernel/a/virtio_ring.ko\n"
        "kernel/a/virtio.ko: kernel/a/virtio_ring.ko\n"
        "kernel/a/virtio_ring.ko:\n"
        "kernel/b/virtio-rng.ko.xz: kernel/a/virtio.ko\n"
    )
    paths, missing = g.module_closure(table, ["virtio_pci", "virtio-rng", "evdev", "nonesuch"], {"evdev"})
    assert paths == sorted(
        ["kernel/a/virtio_pci.ko", "kernel/a/virtio.ko", "kernel/a/virtio_ring.ko", "kernel/b/virtio-rng.ko.xz"]
    )
    assert missing == ["nonesuch"]


def test_offline_without_cache_says_apt_get_update(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline() -> tuple[str, str]:
        raise RuntimeError("E: No packages found")

    monkeypatch.setattr(g, "_query_apt", offline)
    with pytest.raises(RuntimeError, match="apt-get update"):
        g.build_guest(tmp_path, log=lambda _: None)


def test_cli_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_a: object, **_k: object) -> g.TestGuest:
        raise RuntimeError("cannot resolve\nthe kernel")

    monkeypatch.setattr(g, "build_guest", broken)
    assert g.main([]) == 1
    err = capsys.readouterr().err
    assert err == "error: cannot resolve the kernel\n"


# ---------------------------------------------------------------- the real build (downloads a kernel once)


@pytest.fixture(scope="session")
def built() -> g.TestGuest:
    """The test guest in the default cache (built on first use, reused afterwards)."""
    return g.build_guest(log=lambda _: None)


@pytest.mark.vm
def test_fixture_contents(built: g.TestGuest) -> None:
    assert built.kernel.stat().st_size > 1 << 20
    assert built.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # x86 boot protocol header
    raw = built.initrd.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    entries = g.read_newc(gzip.decompress(raw))
    assert entries["init"].data.decode() == g.INIT_SCRIPT
    assert entries["init"].mode & 0o111
    assert stat.S_ISREG(entries["bin/busybox"].mode)
    assert entries["bin/sh"].data == b"busybox"
    modules = [n for n in entries if n.startswith(f"lib/modules/{built.kernel_version}/")]
    assert any(re.search(r"/virtio_console\.ko(\.\w+)?$", n) for n in modules)
    assert f"lib/modules/{built.kernel_version}/modules.dep" in entries


@pytest.mark.vm
def test_second_build_is_cached(built: g.TestGuest, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(*_a: object, **_k: object) -> None:
        raise AssertionError("rebuilt although the inputs did not change")

    monkeypatch.setattr(g, "_build_into", no_rebuild)
    mtime = built.initrd.stat().st_mtime_ns
    again = g.build_guest(built.kernel.parent.parent, log=lambda _: None)
    assert again == built
    assert built.initrd.stat().st_mtime_ns == mtime


@pytest.mark.vm
def test_offline_reuses_cached_build(built: g.TestGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built.kernel.parent, cache / built.kernel.parent.name)
    (cache / ".build-killed").mkdir()  # leftover of a killed build: never picked
    (cache / ".build-killed" / "fixture.json").write_text(json.dumps({"kernel_version": "x"}))

    def offline() -> tuple[str, str]:
        raise RuntimeError("E: No packages found")

    monkeypatch.setattr(g, "_query_apt", offline)
    lines: list[str] = []
    reused = g.build_guest(cache, log=lines.append)
    assert reused.kernel == cache / built.kernel.parent.name / "vmlinuz"
    assert reused.kernel_version == built.kernel_version
    assert any("reusing" in line for line in lines)


@pytest.mark.vm
def test_cli_json(built: g.TestGuest, capsys: pytest.CaptureFixture[str]) -> None:
    assert g.main(["--cache-dir", str(built.kernel.parent.parent), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {"kernel": str(built.kernel), "initrd": str(built.initrd), "kernel_version": built.kernel_version}
