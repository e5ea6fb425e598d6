# SPDX-License-Identifier: LGPL-2.1-or-later
"""Firmware descriptors: discovery, selection, --firmware resolution, NVRAM and QEMU arguments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vmspawnd.errors import ConfigError
from vmspawnd.qemu import firmware as fw
from vmspawnd.qemu.firmware import (
    FirmwareKind,
    apply_secure_boot,
    describe,
    enumerate_descriptors,
    format_list,
    is_pe_kernel,
    list_features,
    load_descriptor,
    machine_smm,
    nvram_state_path,
    parse_firmware_features,
    prepare_nvram,
    qemu_firmware_args,
    resolve_firmware,
    select_firmware,
)
from vmspawnd.values import StateLocation, Tristate

SYSTEM_DIR = Path("/usr/share/qemu/firmware")
OVMF = Path("/usr/share/OVMF")


def descriptor_json(description: str, code: str, features: list[str], *, template: str | None = "VARS.fd",
                    machines: tuple[str, ...] = ("pc-q35-*",), arch: str = "x86_64") -> dict:
    """A descriptor shaped like Debian's /usr/share/qemu/firmware/*-edk2-x86_64*.json."""
    mapping: dict = {"device": "flash", "executable": {"filename": f"/usr/share/OVMF/{code}", "format": "raw"}}
    if template is not None:
        mapping["nvram-template"] = {"filename": f"/usr/share/OVMF/{template}", "format": "raw"}
    return {"description": description, "interface-types": ["uefi"], "mapping": mapping,
            "targets": [{"architecture": arch, "machines": list(machines)}], "features": features, "tags": []}


ENROLLED = descriptor_json("SB, MS keys enrolled", "CODE.ms.fd",
                           ["acpi-s3", "amd-sev", "enrolled-keys", "requires-smm", "secure-boot", "verbose-dynamic"],
                           template="VARS.ms.fd")
SECURE = descriptor_json("SB, empty varstore", "CODE.secboot.fd",
                         ["acpi-s3", "amd-sev", "requires-smm", "secure-boot", "verbose-dynamic"])
PLAIN = descriptor_json("no SB, no SMM", "CODE.fd", ["acpi-s3", "amd-sev", "verbose-dynamic"],
                        machines=("pc-i440fx-*", "pc-q35-*"))


def write(directory: Path, name: str, data: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=4))
    return path


@pytest.fixture
def debian_dir(tmp_path: Path) -> Path:
    """A descriptor directory laid out like Debian's: enrolled (40), secure (50), plain (60)."""
    d = tmp_path / "share"
    write(d, "40-edk2-x86_64-secure-enrolled.json", ENROLLED)
    write(d, "50-edk2-x86_64-secure.json", SECURE)
    write(d, "60-edk2-x86_64.json", PLAIN)
    return d


def pick(descriptors: list[fw.Descriptor], features: list[str], secure_boot: str = "auto") -> str:
    include, exclude = apply_secure_boot(*parse_firmware_features(features), secure_boot)
    return select_firmware(descriptors, include=include, exclude=exclude).path.name


# --------------------------------------------------------------------------------------------
# Discovery


def test_search_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_DATA_DIRS", f"{tmp_path}/a:/usr/share")
    assert fw.search_path() == [tmp_path / "cfg/qemu/firmware", Path("/etc/qemu/firmware"),
                                tmp_path / "data/qemu/firmware", tmp_path / "a/qemu/firmware", SYSTEM_DIR]


def test_higher_directory_shadows_same_name_and_list_is_sorted_by_file_name(monkeypatch, tmp_path, debian_dir):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "nodata"))
    monkeypatch.setenv("XDG_DATA_DIRS", str(tmp_path / "xdg"))
    shutil.copytree(debian_dir, tmp_path / "xdg/qemu/firmware")
    user = tmp_path / "cfg/qemu/firmware"
    write(user, "50-edk2-x86_64-secure.json", dict(SECURE, description="user override"))
    write(user, "55-extra.json", PLAIN)
    found = [d for d in enumerate_descriptors() if d.path.parent != SYSTEM_DIR]
    assert [d.path.name for d in found] == ["40-edk2-x86_64-secure-enrolled.json", "50-edk2-x86_64-secure.json",
                                            "55-extra.json", "60-edk2-x86_64.json"]
    assert found[1].path.parent == user and found[1].description == "user override"
    assert found[0].path.parent == tmp_path / "xdg/qemu/firmware"


@pytest.mark.parametrize("how", ["empty-file", "dev-null-link"])
def test_masking(tmp_path, debian_dir, how):
    user = tmp_path / "cfg"
    user.mkdir()
    mask = user / "50-edk2-x86_64-secure.json"
    if how == "empty-file":
        mask.write_text("")
    else:
        mask.symlink_to("/dev/null")
    names = [d.path.name for d in enumerate_descriptors([user, debian_dir])]
    assert names == ["40-edk2-x86_64-secure-enrolled.json", "60-edk2-x86_64.json"]


def test_format_list_prints_absolute_paths_one_per_line(tmp_path, debian_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = enumerate_descriptors([Path("share")])
    assert format_list(found).splitlines() == [str(debian_dir / n) for n in
                                               ["40-edk2-x86_64-secure-enrolled.json", "50-edk2-x86_64-secure.json",
                                                "60-edk2-x86_64.json"]]


def test_descriptor_model_is_parsed(debian_dir):
    d = load_descriptor(debian_dir / "60-edk2-x86_64.json")
    assert d.valid and d.interface_types == ("uefi",) and d.tags == ()
    assert d.mapping == fw.Mapping("flash", fw.FirmwareImage(OVMF / "CODE.fd", "raw"),
                                   fw.FirmwareImage(OVMF / "VARS.fd", "raw"), "split")
    assert d.targets == (fw.Target("x86_64", ("pc-i440fx-*", "pc-q35-*")),)
    assert d.supports("x86_64", "q35") and not d.supports("aarch64", "q35") and not d.supports("x86_64", "virt")


def test_memory_mapping(tmp_path):
    data = dict(PLAIN, mapping={"device": "memory", "filename": "/usr/share/qemu/bios.bin"})
    d = load_descriptor(write(tmp_path, "x.json", data))
    assert d.valid and d.mapping is not None and d.mapping.stateless
    assert qemu_firmware_args(d, None) == ["-bios", "/usr/share/qemu/bios.bin"]
    assert fw.nvram_template(d) is None


@pytest.mark.parametrize("content, problem", [
    ("{not json", "Expecting property name"),
    ("[]", "not a JSON object"),
    (json.dumps({k: v for k, v in SECURE.items() if k != "targets"}), "targets"),
    (json.dumps(dict(SECURE, features="secure-boot")), "features"),
    (json.dumps(dict(SECURE, targets=[{"architecture": "x86_64"}])), "machines"),
    (json.dumps(dict(SECURE, mapping={"device": "flash"})), "executable"),
    (json.dumps(dict(SECURE, mapping={"device": "kernel", "filename": "/k"})), "kernel"),
    (json.dumps(dict(SECURE, mapping=dict(SECURE["mapping"], mode="weird"))), "mode"),
])
def test_malformed_descriptor_is_skipped_with_a_warning(tmp_path, debian_dir, content, problem):
    user = tmp_path / "cfg"
    bad = write(user, "45-broken.json", content)
    with capture_logs() as logs:
        found = enumerate_descriptors([user, debian_dir])
    broken = [d for d in found if d.path == bad]
    assert len(broken) == 1 and not broken[0].valid and problem in (broken[0].problem or "")
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["path"] == str(bad)
    assert pick(found, [], "no") == "60-edk2-x86_64.json"
    assert pick(found, [""]) == "40-edk2-x86_64-secure-enrolled.json"


# --------------------------------------------------------------------------------------------
# Features and selection


def test_feature_parsing():
    assert parse_firmware_features([]) == (frozenset(), frozenset({"enrolled-keys"}))
    assert parse_firmware_features(["~secure-boot,amd-sev"]) == (frozenset({"amd-sev"}),
                                                                 frozenset({"enrolled-keys", "secure-boot"}))
    assert parse_firmware_features(["a", "~b"]) == (frozenset({"a"}), frozenset({"enrolled-keys", "b"}))
    assert parse_firmware_features(["a", ""]) == (frozenset(), frozenset())
    assert parse_firmware_features(["", "~x"]) == (frozenset(), frozenset({"x"}))
    assert parse_firmware_features(["a,,b,"]) == (frozenset({"a", "b"}), frozenset({"enrolled-keys"}))
    for bad in ["~", "a,~~b", "list"]:
        with pytest.raises(ConfigError) as e:
            parse_firmware_features([bad])
        assert e.value.field == "firmware-features"


def test_secure_boot_folding():
    inc, exc = parse_firmware_features([])
    assert apply_secure_boot(inc, exc, Tristate.YES) == ({"secure-boot"}, {"enrolled-keys"})
    assert apply_secure_boot(inc, exc, "no") == (set(), {"enrolled-keys", "secure-boot"})
    assert apply_secure_boot(inc, exc, "auto") == (inc, exc)


def test_default_skips_enrolled_keys(debian_dir):
    assert pick(enumerate_descriptors([debian_dir]), []) == "50-edk2-x86_64-secure.json"


def test_secure_boot_yes_and_no(debian_dir):
    found = enumerate_descriptors([debian_dir])
    assert pick(found, [], "yes") == "50-edk2-x86_64-secure.json"
    assert pick(found, [], "no") == "60-edk2-x86_64.json"


def test_exclude_and_include_features(debian_dir):
    found = enumerate_descriptors([debian_dir])
    assert pick(found, ["~secure-boot,amd-sev"]) == "60-edk2-x86_64.json"
    assert pick(found, ["enrolled-keys"]) == "40-edk2-x86_64-secure-enrolled.json"  # include wins


def test_empty_string_clears_default_exclusion(debian_dir):
    assert pick(enumerate_descriptors([debian_dir]), [""]) == "40-edk2-x86_64-secure-enrolled.json"


def test_arch_machine_interface_and_template_are_required(tmp_path):
    d = tmp_path / "fw"
    write(d, "10-arm.json", descriptor_json("arm", "A.fd", [], arch="aarch64", machines=("virt-*",)))
    write(d, "20-i440fx.json", descriptor_json("pc", "P.fd", [], machines=("pc-i440fx-*",)))
    write(d, "30-bios.json", dict(descriptor_json("bios", "B.fd", []), **{"interface-types": ["bios"]}))
    write(d, "40-stateless.json", descriptor_json("no vars", "S.fd", [], template=None))
    write(d, "50-good.json", descriptor_json("good", "G.fd", []))
    found = enumerate_descriptors([d])
    assert select_firmware(found, include=set(), exclude=set()).path.name == "50-good.json"
    arm = select_firmware(found, include=set(), exclude=set(), arch="aarch64", machine="virt")
    assert arm.path.name == "10-arm.json"


def test_no_match_without_wanted_features_names_the_firmware(debian_dir):
    with pytest.raises(ConfigError) as e:
        select_firmware(enumerate_descriptors([debian_dir]), include=set(), exclude={"secure-boot", "amd-sev"})
    assert (e.value.field, e.value.value) == ("firmware", "uefi")


def test_no_match_is_a_config_error_naming_the_requirements(debian_dir):
    found = enumerate_descriptors([debian_dir])
    with pytest.raises(ConfigError) as e:
        select_firmware(found, include={"secure-boot"}, exclude={"enrolled-keys", "amd-sev"})
    assert (e.value.field, e.value.value) == ("firmware-features", "secure-boot")  # what no descriptor has
    text = str(e.value)
    assert "features secure-boot" in text and "none of amd-sev, enrolled-keys" in text and "x86_64" in text
    assert "60-edk2-x86_64.json" in text
    with pytest.raises(ConfigError, match="no descriptors found"):
        select_firmware([], include=set(), exclude=set())


def test_list_features_and_describe(debian_dir):
    found = enumerate_descriptors([debian_dir])
    assert list_features(found) == ["acpi-s3", "amd-sev", "enrolled-keys", "requires-smm", "secure-boot",
                                    "verbose-dynamic"]
    assert json.loads(describe(found[1])) == SECURE
    assert describe(found[1]).startswith('{\n  "description": "SB, empty varstore",\n')


# --------------------------------------------------------------------------------------------
# --firmware= resolution and PE detection


@pytest.fixture
def pe_kernel(tmp_path: Path) -> Path:
    """A minimal MZ/PE header: e_lfanew at 0x3c points at PE\\0\\0."""
    data = bytearray(0x100)
    data[:2] = b"MZ"
    data[0x3C:0x40] = (0x80).to_bytes(4, "little")
    data[0x80:0x84] = b"PE\0\0"
    path = tmp_path / "vmlinuz.efi"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def plain_kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(os.urandom(4096).replace(b"MZ", b"xx").replace(b"\x7fELF", b"xxxx"))
    return path


def test_is_pe_kernel(pe_kernel, plain_kernel, tmp_path):
    assert is_pe_kernel(pe_kernel)
    assert not is_pe_kernel(plain_kernel)
    bad = tmp_path / "bad"
    bad.write_bytes(pe_kernel.read_bytes()[:0x80] + b"NE\0\0")  # MZ without PE signature
    assert not is_pe_kernel(bad)
    short = tmp_path / "short"
    short.write_bytes(b"MZ")
    assert not is_pe_kernel(short)


def test_the_debian_guest_kernel_is_pe():
    kernels = sorted(Path.home().glob(".cache/vmspawnd/guest/*/vmlinuz"))
    if not kernels:
        pytest.skip("no cached Debian guest kernel")
    assert is_pe_kernel(kernels[0])


def test_resolve_keywords(debian_dir, pe_kernel, plain_kernel):
    found = enumerate_descriptors([debian_dir])
    auto = resolve_firmware("auto", descriptors=found)
    assert auto.kind is FirmwareKind.UEFI and auto.descriptor is not None and auto.smm
    assert auto.descriptor.path.name == "50-edk2-x86_64-secure.json"
    assert resolve_firmware("", linux=pe_kernel, descriptors=found).kind is FirmwareKind.UEFI
    assert resolve_firmware("auto", linux=plain_kernel, descriptors=found).kind is FirmwareKind.NONE
    assert resolve_firmware("none", linux=plain_kernel).kind is FirmwareKind.NONE
    bios = resolve_firmware("bios", linux=plain_kernel)
    assert bios.kind is FirmwareKind.BIOS and bios.qemu_args(None) == [] and bios.smm is None
    no_sb = resolve_firmware("uefi", include=set(), exclude={"enrolled-keys", "secure-boot"}, descriptors=found)
    assert no_sb.descriptor is not None and no_sb.descriptor.path.name == "60-edk2-x86_64.json" and not no_sb.smm


@pytest.mark.parametrize("value, kernel", [("none", None), ("uefi", "plain"), ("./x.json", "plain"),
                                           ("list", None), ("describe", None), ("relative.json", None),
                                           ("/nonexistent/descriptor.json", None)])
def test_resolve_errors(value, kernel, plain_kernel, debian_dir):
    with pytest.raises(ConfigError) as e:
        resolve_firmware(value, linux=plain_kernel if kernel else None, descriptors=enumerate_descriptors([debian_dir]))
    assert e.value.field == "firmware"


def test_missing_kernel_is_a_linux_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_firmware("auto", linux=tmp_path / "nope")
    assert e.value.field == "linux"


def test_explicit_descriptor_path(debian_dir, monkeypatch, pe_kernel):
    monkeypatch.chdir(debian_dir)
    chosen = resolve_firmware("./40-edk2-x86_64-secure-enrolled.json", linux=pe_kernel)  # no feature filtering
    assert chosen.kind is FirmwareKind.UEFI and chosen.descriptor is not None
    assert chosen.descriptor.path == debian_dir / "40-edk2-x86_64-secure-enrolled.json"
    with pytest.raises(ConfigError, match="Secure Boot"):
        resolve_firmware(str(debian_dir / "60-edk2-x86_64.json"), include={"secure-boot"})
    write(debian_dir, "c.json", dict(PLAIN, mapping=dict(PLAIN["mapping"], mode="combined")))
    with pytest.raises(ConfigError, match="combined"):
        resolve_firmware("./c.json")
    write(debian_dir, "bad.json", "{")
    with capture_logs() as logs, pytest.raises(ConfigError, match="malformed"):
        resolve_firmware("./bad.json")
    assert not logs  # (the error says it: no "skipping" warning for the file named, which is not skipped)


# --------------------------------------------------------------------------------------------
# NVRAM


def nvram_state(text: str) -> StateLocation:
    return StateLocation.parse(text, "efi-nvram-state")


def test_nvram_state_path(tmp_path):
    image = tmp_path / "foo.raw"
    assert nvram_state_path(nvram_state("auto"), image, False) == tmp_path / "foo.raw.efinvramstate"
    assert nvram_state_path(nvram_state("yes"), tmp_path / "tree/", False) == tmp_path / "tree.efinvramstate"
    assert nvram_state_path(nvram_state("auto"), image, True) is None
    assert nvram_state_path(nvram_state("auto"), None, False) is None
    for off in ("off", "no", ""):
        assert nvram_state_path(nvram_state(off), image, False) is None
    assert nvram_state_path(nvram_state("/x/vars.fd"), image, True) == Path("/x/vars.fd")
    assert nvram_state_path(nvram_state("./vars.fd"), image, False) == Path.cwd() / "vars.fd"
    with pytest.raises(ConfigError) as e:
        nvram_state_path(nvram_state("vars.fd"), image, False)
    assert e.value.field == "efi-nvram-state"


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "OVMF_VARS.fd"
    path.write_bytes(os.urandom(64 * 1024))
    os.utime(path, (1_000_000_000, 1_000_000_000))
    return path


def test_nvram_is_created_once_then_reused_and_never_overwritten(tmp_path, template):
    runtime = tmp_path / "run"
    runtime.mkdir()
    state = nvram_state_path(nvram_state("auto"), tmp_path / "foo.raw", False)
    assert state is not None
    assert prepare_nvram(template, state, runtime) == state
    assert state.read_bytes() == template.read_bytes()
    assert state.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OVMF_VARS.fd", "foo.raw.efinvramstate", "run"]

    state.write_bytes(b"guest wrote variables")  # the guest changed its variables
    os.utime(state, (2_000_000_000, 2_000_000_000))
    before = state.stat()
    assert prepare_nvram(template, state, runtime) == state
    assert state.read_bytes() == b"guest wrote variables"
    assert state.stat().st_mtime_ns == before.st_mtime_ns and state.stat().st_ino == before.st_ino
    assert list(runtime.iterdir()) == []


def test_a_copy_of_the_nvram_template_a_crash_interrupted_is_removed_by_the_next(tmp_path, template):
    gone = subprocess.Popen(["true"])
    gone.wait()  # (its pid is no process's now)
    state = tmp_path / "n7.vars"
    leftover = tmp_path / f".n7.vars.{gone.pid}-0.tmp"  # what a daemon killed while copying left
    leftover.write_bytes(b"half a copy")
    others = [tmp_path / f".other.{gone.pid}-0.tmp", tmp_path / ".n7.vars.notes.tmp"]  # another's; not a temp of ours
    for path in others:
        path.write_bytes(b"theirs")
    assert prepare_nvram(template, state, tmp_path) == state
    assert state.read_bytes() == template.read_bytes()
    assert not leftover.exists() and all(path.read_bytes() == b"theirs" for path in others)


def test_nvram_creation_never_replaces_a_store_that_appears_meanwhile(tmp_path, template, monkeypatch):
    state = tmp_path / "vars"
    real_link = os.link

    def racing_link(src, dst, *a, **kw):
        Path(dst).write_bytes(b"other vmspawn won")
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "link", racing_link)
    assert prepare_nvram(template, state, tmp_path) == state
    assert state.read_bytes() == b"other vmspawn won"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OVMF_VARS.fd", "vars"]


def test_nvram_creation_without_hard_links_falls_back_to_rename(tmp_path, template, monkeypatch):
    def no_links(*_a, **_kw):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    state = tmp_path / "vars"
    assert prepare_nvram(template, state, tmp_path) == state
    assert state.read_bytes() == template.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OVMF_VARS.fd", "vars"]


def test_a_failed_copy_leaves_no_half_store(tmp_path, template, monkeypatch):
    state = tmp_path / "vars"

    def crash(*_a, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(ConfigError):
        prepare_nvram(template, state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OVMF_VARS.fd"]


def test_nvram_off_is_a_copy_in_the_runtime_dir(tmp_path, template):
    runtime = tmp_path / "run"
    runtime.mkdir()
    copy = prepare_nvram(template, None, runtime)
    assert copy.parent == runtime and copy.read_bytes() == template.read_bytes()
    copy.write_bytes(b"stale")  # a stale runtime dir is reused: the transient copy starts fresh
    assert prepare_nvram(template, None, runtime).read_bytes() == template.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".efinvramstate")] == []


def test_nvram_errors(tmp_path, template):
    with pytest.raises(ConfigError) as e:
        prepare_nvram(tmp_path / "missing.fd", None, tmp_path)
    assert e.value.field == "efi-nvram-template"
    with pytest.raises(ConfigError) as e:
        prepare_nvram(template, tmp_path / "no/such/dir/vars", tmp_path)
    assert e.value.field == "efi-nvram-state"
    with pytest.raises(ConfigError):
        prepare_nvram(template, tmp_path, tmp_path)  # a directory is not a store


def test_nvram_template_override(debian_dir, tmp_path):
    d = load_descriptor(debian_dir / "60-edk2-x86_64.json")
    assert fw.nvram_template(d) == OVMF / "VARS.fd"
    assert fw.nvram_template(d, tmp_path / "mine.fd") == tmp_path / "mine.fd"


# --------------------------------------------------------------------------------------------
# QEMU arguments


def test_flash_args_double_commas(tmp_path, debian_dir):
    d = load_descriptor(debian_dir / "50-edk2-x86_64-secure.json")
    assert qemu_firmware_args(d, Path("/var/lib/a,b.efinvramstate")) == [
        "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/CODE.secboot.fd",
        "-global", "driver=cfi.pflash01,property=secure,value=on",
        "-drive", "file=/var/lib/a,,b.efinvramstate,if=pflash,format=raw"]
    qcow = dict(PLAIN, mapping={"device": "flash", "executable": {"filename": "/fw/c,ode.qcow2", "format": "qcow2"},
                                "nvram-template": {"filename": "/fw/vars.raw", "format": "raw"}})
    q = load_descriptor(write(tmp_path, "q.json", qcow))
    assert qemu_firmware_args(q, Path("/n")) == ["-drive", "if=pflash,format=qcow2,readonly=on,file=/fw/c,,ode.qcow2",
                                                 "-drive", "file=/n,if=pflash,format=qcow2"]
    assert qemu_firmware_args(q, None) == ["-drive", "if=pflash,format=qcow2,readonly=on,file=/fw/c,,ode.qcow2"]
    assert qemu_firmware_args(None, Path("/n")) == []


def test_combined_mode_is_rejected(tmp_path):
    d = load_descriptor(write(tmp_path, "c.json", dict(PLAIN, mapping=dict(PLAIN["mapping"], mode="combined"))))
    with pytest.raises(ConfigError, match="combined"):
        qemu_firmware_args(d, None)


def test_smm_iff_secure_boot(debian_dir):
    found = {d.path.name: d for d in enumerate_descriptors([debian_dir])}
    assert machine_smm(found["50-edk2-x86_64-secure.json"])
    assert machine_smm(found["40-edk2-x86_64-secure-enrolled.json"])
    assert not machine_smm(found["60-edk2-x86_64.json"]) and not machine_smm(None)


needs_system_firmware = pytest.mark.skipif(
    not (SYSTEM_DIR / "50-edk2-x86_64-secure.json").exists() or not (SYSTEM_DIR / "60-edk2-x86_64.json").exists(),
    reason="Debian's edk2 descriptors are not installed")


def system_choice(secure_boot: str) -> fw.Descriptor:
    found = enumerate_descriptors([SYSTEM_DIR])
    include, exclude = apply_secure_boot(*parse_firmware_features([]), secure_boot)
    return select_firmware(found, include=include, exclude=exclude)


@needs_system_firmware
def test_real_descriptors_on_this_machine():
    default = system_choice("auto")
    assert default.path == SYSTEM_DIR / "50-edk2-x86_64-secure.json"  # 40-…-enrolled is skipped
    assert machine_smm(default)
    code = default.mapping.executable.filename if default.mapping else None
    assert qemu_firmware_args(default, Path("/x/foo.raw.efinvramstate")) == [
        "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
        "-global", "driver=cfi.pflash01,property=secure,value=on",
        "-drive", "file=/x/foo.raw.efinvramstate,if=pflash,format=raw"]
    plain = system_choice("no")
    assert plain.path == SYSTEM_DIR / "60-edk2-x86_64.json" and not machine_smm(plain)
    assert fw.nvram_template(plain) == OVMF / "OVMF_VARS_4M.fd"
    assert system_choice("yes") == default


@needs_system_firmware
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
@pytest.mark.parametrize("secure_boot", ["auto", "no"])
def test_qemu_accepts_the_firmware_args(tmp_path, secure_boot):
    """QEMU parses the arguments (started paused, quit over QMP; the guest never runs)."""
    d = system_choice(secure_boot)
    template = fw.nvram_template(d)
    assert template is not None
    vars_path = prepare_nvram(template, tmp_path / "a,b.efinvramstate", tmp_path)
    argv = ["qemu-system-x86_64", "-machine", f"q35,smm={'on' if machine_smm(d) else 'off'}", "-accel", "tcg",
            "-nodefaults", "-display", "none", "-m", "64", *qemu_firmware_args(d, vars_path), "-S", "-qmp", "stdio"]
    qmp = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    result = subprocess.run(argv, input=qmp, capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.count(b'"return"') == 2


# ---- behaviours matched to systemd-vmspawn 262 by the peer check (tests/peer)
def test_secure_boot_applies_in_command_line_order():
    from vmspawnd.qemu.firmware import parse_firmware_features, secure_boot_token

    inc, exc = parse_firmware_features(["secure-boot", secure_boot_token("no")])
    assert "secure-boot" in exc and "secure-boot" not in inc
    inc, exc = parse_firmware_features([secure_boot_token("no"), "secure-boot"])
    assert "secure-boot" in inc
    inc, exc = parse_firmware_features([secure_boot_token("no"), ""])
    assert inc == exc == frozenset()
    inc, exc = parse_firmware_features([secure_boot_token("yes"), secure_boot_token("auto")])
    assert "secure-boot" not in inc | exc


def test_hidden_dangling_and_duplicate_key_descriptors(tmp_path):
    import json as _json

    from vmspawnd.qemu.firmware import enumerate_descriptors, load_descriptor

    good = {"description": "x", "interface-types": ["uefi"], "targets": [],
            "mapping": {"device": "flash", "executable": {"filename": "relative/code.fd", "format": "raw"}},
            "features": [], "tags": []}
    (tmp_path / ".hidden.json").write_text(_json.dumps(good))
    (tmp_path / "20-good.json").write_text(_json.dumps(good))
    (tmp_path / "30-dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "40-dup.json").write_text('{"description": "a", "description": "b"}')
    found = enumerate_descriptors([tmp_path])
    assert [d.path.name for d in found] == ["20-good.json", "40-dup.json"]
    assert found[0].valid  # a relative firmware path is accepted, as upstream does
    assert not load_descriptor(tmp_path / "40-dup.json").valid
