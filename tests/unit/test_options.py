# SPDX-License-Identifier: LGPL-2.1-or-later
"""The vmspawn option parser: defaults, aliases, sizes, and clear errors."""

import re
from pathlib import Path

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.options import parse_vmspawn_args, vmspawn_parser
from vmspawnd.plan import plan_launch
from vmspawnd.values import ConsoleMode, Ram, Tristate, parse_size


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel")
    return k


def parse(kernel: Path, *args: str):
    return parse_vmspawn_args([f"--linux={kernel}", *args])


def test_defaults_are_one_cpu_and_2g(kernel):
    c = parse(kernel)
    assert c.cpus == "1"
    assert c.ram.size_mib == 2048
    assert c.kvm is Tristate.AUTO
    assert c.notify_ready is True
    assert c.console is ConsoleMode.INTERACTIVE
    assert c.name == "vmlinuz"


@pytest.mark.parametrize("value,mib", [("1G", 1024), ("512M", 512), ("1000000", 1), ("1.5G", 1536), ("1025K", 2)])
def test_ram_is_rounded_up_to_mib(kernel, value, mib):
    assert parse(kernel, f"--ram={value}").ram.size_mib == mib


def test_hidden_aliases_work_and_are_not_in_help(kernel):
    c = parse(kernel, "--qemu-mem=1G", "--qemu-smp=3", "--qemu-kvm=no", "--qemu-vsock=no")
    assert (c.ram.size_mib, c.cpus, c.kvm, c.vsock) == (1024, "3", Tristate.NO, Tristate.NO)
    assert parse(kernel, "--qemu-gui").console is ConsoleMode.GUI
    text = vmspawn_parser().format_help()
    for alias in ("--qemu-mem", "--qemu-smp", "--qemu-kvm", "--qemu-vsock", "--qemu-gui"):
        assert alias not in text
    for option in ("--ram", "--cpus", "--kvm", "--linux", "--initrd", "--notify-ready", "--console"):
        assert option in text
    assert text.startswith("usage: vmspawn [OPTIONS...] [ARGUMENTS...]\n")  # (systemd-vmspawn's synopsis)


def test_options_may_follow_kernel_cmdline_words(kernel):
    c = parse_vmspawn_args(["quiet", f"--linux={kernel}", "test.exit=7", "--ram=256M"])
    assert c.kernel_cmdline == ("quiet", "test.exit=7")
    assert c.ram.size_mib == 256


def test_ram_with_max_and_slots(kernel):
    assert parse(kernel, "--ram=1G:4G:2").ram == Ram(1 << 30, 4 << 30, 2)


@pytest.mark.parametrize("args,field", [
    (["--ram=2G:1G"], "ram"),
    (["--ram=2G::4"], "ram"),
    (["--ram=lots"], "ram"),
    (["--ram=0"], "ram"),
    (["--ram=-1G"], "ram"),
    (["--cpus=0"], "cpus"),
    (["--cpus=two"], "cpus"),
    (["--cpus=cpus=2,bogus=1"], "cpus"),
    (["--kvm=maybe"], "kvm"),
    (["--notify-ready=perhaps"], "notify-ready"),
    (["--console=fancy"], "console"),
    (["-M", "../etc"], "machine"),
    (["-M", "a" * 65], "machine"),
    (["--uuid=00000000-0000-0000-0000-000000000000"], "uuid"),
    (["--uuid=nope"], "uuid"),
    (["--bogus"], "arguments"),
])
def test_bad_values_name_the_field(kernel, args, field):
    with pytest.raises(ConfigError) as e:
        parse(kernel, *args)
    assert e.value.field == field
    assert field in str(e.value) or field == "arguments"


@pytest.mark.parametrize("value,reason", [
    ("0", "invalid cpus=0: must be between 1 and 4096"),
    ("9999", "invalid cpus=9999: must be between 1 and 4096"),
    ("2,sockets=5000", "sockets=5000: must be between 1 and 4096"),
    ("two", "expected a CPU count"),
])
def test_a_cpu_count_out_of_range_says_the_range(kernel, value, reason):
    with pytest.raises(ConfigError) as e:
        parse(kernel, f"--cpus={value}")
    assert reason in str(e.value)


def test_initrd_requires_linux(tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    with pytest.raises(ConfigError, match="--initrd requires --linux"):
        parse_vmspawn_args(["-M", "x", f"--initrd={initrd}"])


def test_missing_kernel_is_an_error_of_the_launch_plan(tmp_path):
    config = parse_vmspawn_args([f"--linux={tmp_path}/nope"])  # a definition: the host is not looked at
    with pytest.raises(ConfigError, match="no such file"):
        plan_launch(config)


@pytest.mark.parametrize("option", ["--linux", "--directory", "--bind"])
def test_a_path_the_kernel_refuses_is_a_config_error_naming_the_option(option, kernel):
    words = [f"{option}=/{'a' * 4100}"] if option == "--linux" else [f"--linux={kernel}", f"{option}=/{'a' * 4100}"]
    with pytest.raises(ConfigError, match=f"invalid {option[2:]}=/a+: file name too long"):
        plan_launch(parse_vmspawn_args(["-M", "x", *words]))


@pytest.mark.parametrize(("option", "path", "problem"), [
    ("--linux", "DIR", "is a directory, not a file"), ("--initrd", "/dev/null", "not a regular file"),
    ("--efi-nvram-template", "/dev/null", "not a regular file"), ("--directory", "/dev/null", "not a directory"),
])
def test_a_path_of_the_wrong_kind_is_a_config_error_saying_what_it_is(option, path, problem, kernel, tmp_path):
    path = str(tmp_path) if path == "DIR" else path
    words = [f"{option}={path}"] if option == "--linux" else [f"--linux={kernel}", f"{option}={path}"]
    with pytest.raises(ConfigError, match=f"^invalid {option[2:]}={re.escape(path)}: {problem}$"):
        plan_launch(parse_vmspawn_args(["-M", "x", *words]))


def test_relative_paths_are_made_absolute(kernel, monkeypatch):
    monkeypatch.chdir(kernel.parent)
    assert parse_vmspawn_args(["--linux=vmlinuz"]).linux == kernel


def test_parse_size_suffixes():
    assert parse_size("x", "1K") == 1024
    assert parse_size("x", "2T") == 2 << 40
    with pytest.raises(ConfigError):
        parse_size("x", "1Q")


def test_credentials_are_parsed_with_c_escapes(kernel, tmp_path):
    f = tmp_path / "c"
    f.write_bytes(b"file\0data")
    c = parse(kernel, "--set-credential=foo:a\\x00b\\n", f"--load-credential=bar:{f}", "-s", "x", "--smbios11=",
              "--smbios11=y")
    assert dict(c.credentials) == {"foo": b"a\0b\n", "bar": b"file\0data"}
    assert c.smbios11 == ("y",)


@pytest.mark.parametrize("args", [["--set-credential=noval"], ["--set-credential=a/b:x"],
                                  ["--set-credential=a:\\q"], ["--load-credential=a:/nonexistent"],
                                  ["--set-credential=a:1", "--set-credential=a:2"]])
def test_bad_credentials_are_errors(kernel, args):
    with pytest.raises(ConfigError):
        parse(kernel, *args)


def test_private_users_needs_a_directory_and_a_valid_range(kernel, tmp_path):
    c = parse(kernel, f"--directory={tmp_path}", "--private-users=100000:65536", "--firmware=none")
    assert c.private_users == (100000, 65536)
    assert parse(kernel, f"--directory={tmp_path}", "--private-users=5", "--firmware=none").private_users == (5, 65536)
    for bad in (["--private-users=1000"], [f"--directory={tmp_path}", "--private-users=x:1"],
                [f"--directory={tmp_path}", "--private-users=4294967295:2"]):
        with pytest.raises(ConfigError) as e:
            parse(kernel, "--firmware=none", *bad)
        assert e.value.field == "private-users"


@pytest.mark.parametrize(("value", "cid"), [("3", 3), ("4294967294", 4294967294), ("", None), ("any", None),
                                            ("-1", None)])
def test_vsock_cid_values(kernel, value, cid):
    assert parse(kernel, f"--vsock-cid={value}").vsock_cid == cid


@pytest.mark.parametrize("value", ["2", "host", "local", "hypervisor", "4294967295", "0x10", "seven", "²", "٣"])
def test_vsock_cid_outside_the_regular_range_is_refused_by_name(kernel, value):
    with pytest.raises(ConfigError) as e:
        parse(kernel, f"--vsock-cid={value}")
    assert e.value.field == "vsock-cid" and value in str(e.value)


def test_vsock_cid_without_vsock_is_refused(kernel):
    with pytest.raises(ConfigError, match="vsock-cid=7.*--vsock=no"):
        parse(kernel, "--vsock=no", "--vsock-cid=7")


def test_vsock_cid_json_round_trip_and_type_check(kernel):
    from vmspawnd.settings import config_from_json, config_to_json

    data = config_to_json(parse(kernel, "-M", "cid", "--vsock-cid=1234"))
    assert data["vsockCid"] == 1234
    assert config_from_json("cid", data).vsock_cid == 1234
    with pytest.raises(ConfigError, match="vsockCid"):
        config_from_json("cid", {**data, "vsockCid": "1234"})


@pytest.mark.parametrize(("data", "field"), [
    ({"vsock": "no", "vsockCid": 7}, "vsockCid"),
    ({"sshKeyType": "dsa"}, "sshKeyType"),
    ({"bindUserGroups": ["wheel"]}, "bindUserGroups"),
    ({"initrds": ["/initrd"], "linux": None}, "initrds"),
    ({"properties": ["NoSuchThing=1"]}, "properties"),
])
def test_json_config_errors_name_the_json_field(data, field):
    from vmspawnd.settings import config_from_json

    with pytest.raises(ConfigError) as e:
        config_from_json("vm", {"linux": "/vmlinuz", **data})
    assert e.value.field == field, e.value


def test_vmspawnctl_create_help_and_bad_options_need_no_daemon(tmp_path):
    import subprocess
    import sys

    ctl = [sys.executable, "-m", "vmspawnd.cli.vmspawnctl", f"--address={tmp_path}/nobody-listens"]
    helped = subprocess.run([*ctl, "create", "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--bind-user" in helped.stdout and "--forward-journal" in helped.stdout
    assert helped.stdout.startswith("usage: vmspawnctl create NAME [OPTIONS...] [ARGUMENTS...]\n")
    bad = subprocess.run([*ctl, "create", "vm", "--linux=/etc/hostname", "--ram=2G:1G"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 1 and "invalid ram=2G:1G" in bad.stderr and "cannot reach" not in bad.stderr
    stray = subprocess.run([*ctl, "list", "--bogus"], capture_output=True, text=True, timeout=30)
    assert stray.returncode == 2 and "--bogus" in stray.stderr


def test_compatibility_flags_are_accepted_and_the_other_manager_refused(kernel):
    import os

    assert parse(kernel, "--no-pager", "--no-ask-password").linux == kernel
    ours, other = ("--system", "--user") if os.geteuid() == 0 else ("--user", "--system")
    assert parse(kernel, ours).linux == kernel
    with pytest.raises(ConfigError) as e:
        parse(kernel, other)
    assert e.value.field == other[2:] and "not supported" in e.value.reason


def test_double_dash_ends_the_options_and_passes_every_later_word_to_the_kernel(kernel):
    c = parse(kernel, "quiet", "--ram=1G", "--", "-b", "-x", "-s", "--ram=2G")
    assert c.kernel_cmdline == ("quiet", "-b", "-x", "-s", "--ram=2G")
    assert (c.ram.size_mib, c.ephemeral, c.smbios11) == (1024, False, ())
    assert parse(kernel, "--", "-b").kernel_cmdline == ("-b",)  # (no word needed before --)


def test_vmspawnctl_create_takes_double_dash_and_its_name_only_as_name(kernel):
    from vmspawnd.cli.vmspawnctl import parse_create

    name, config = parse_create(["web", f"--linux={kernel}", "--", "-s", "--help"])
    assert (name, config.name, config.kernel_cmdline) == ("web", "web", ("-s", "--help"))
    with pytest.raises(ConfigError) as e:  # (-M would be a second name; create's NAME is the one)
        parse_create(["web", "-M", "other", f"--linux={kernel}"])
    assert "-M other" in e.value.reason


def test_an_empty_machine_name_resets_it_and_the_root_directory_takes_the_hosts_name(kernel, tmp_path):
    import socket

    assert parse(kernel, "-M", "web", "-M", "").name == "vmlinuz"
    host = socket.gethostname().split(".")[0]
    assert parse_vmspawn_args(["-D", "/", f"--linux={kernel}"]).name.startswith(host)
    assert parse_vmspawn_args(["-D", str(tmp_path), f"--linux={kernel}"]).name == tmp_path.name.replace("_", "-")


def test_zero_or_empty_grow_image_and_empty_ssh_key_type_are_the_defaults(kernel):
    for value in ("0", "0M", ""):
        assert parse(kernel, f"--grow-image={value}").grow_image == 0
    assert parse(kernel, "-G", "1G").grow_image == 1 << 30
    assert parse(kernel, "--ssh-key-type=").ssh_key_type == "ed25519"
    assert parse(kernel, "--ssh-key-type=rsa").ssh_key_type == "rsa"
    for args, field in ((("-G", "-1"), "grow-image"), (("--ssh-key-type=dsa",), "ssh-key-type")):
        with pytest.raises(ConfigError) as e:
            parse(kernel, *args)
        assert e.value.field == field


def test_an_empty_tristate_is_auto_again_and_an_empty_boolean_an_error(kernel):
    c = parse(kernel, "--kvm=no", "--kvm=", "--register=", "--vsock=", "--tpm=")
    assert (c.kvm, c.register, c.vsock, c.tpm) == (Tristate.AUTO,) * 4
    with pytest.raises(ConfigError) as e:
        parse(kernel, "--notify-ready=")
    assert e.value.field == "notify-ready"
    with pytest.raises(ConfigError, match="invalid tpm=maybe: expected auto or a boolean") as e:
        parse(kernel, "--tpm=maybe")  # (the error says that auto is one too)


def test_a_definition_refuses_the_firmware_actions_that_only_print(kernel):
    from vmspawnd.cli.vmspawnctl import parse_create
    from vmspawnd.settings import config_from_json

    for option in ("--firmware=list", "--firmware=describe", "--firmware-features=list",
                   "--firmware-features=uefi,list"):
        with pytest.raises(ConfigError, match="is an action") as e:
            parse_create(["web", f"--linux={kernel}", option])
        assert e.value.field == option[2:].split("=")[0]
    for features in (["list"], ["~"]):  # (an action, a syntax error: each failed every start)
        with pytest.raises(ConfigError) as e:
            config_from_json("web", {"linux": str(kernel), "firmwareFeatures": features})
        assert e.value.field == "firmwareFeatures"


@pytest.mark.parametrize(("args", "field"), [(["--ram=abc"], "ram"), (["--cpus=0"], "cpus"),
                                             (["--console=bogus"], "console"), ([], "linux")])
def test_with_nothing_to_boot_a_bad_option_is_named_first(args, field):
    with pytest.raises(ConfigError) as e:
        parse_vmspawn_args(args)
    assert e.value.field == field, e.value
