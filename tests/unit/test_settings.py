# SPDX-License-Identifier: LGPL-2.1-or-later
"""The settings table: every setting means the same on the command line and in JSON.

Property tests generate a value for each setting, spell it both ways (vmspawn options and the
daemon's JSON ``Config``), and check that both spellings give the same MachineConfig (or both
are refused), and that command line → config → JSON → config is the identity.
"""

from __future__ import annotations

import argparse
import base64
import string
import uuid

import pytest
from asyncvarlink.conversion import DataclassVarlinkType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmspawnd import api, interface
from vmspawnd.errors import ConfigError
from vmspawnd.options import config_from_args, vmspawn_parser
from vmspawnd.settings import (
    JSON_FIELDS,
    SETTINGS,
    config_from_json,
    config_to_json,
    varlink_config_fields,
)

ABS = st.lists(st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=8), min_size=1,
               max_size=3).map(lambda parts: "/" + "/".join(p for p in parts if p not in (".", "..")) or "/x")
WORD = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=10)
TRISTATE = st.sampled_from(["yes", "no", "auto"])

# Each strategy yields (command-line words, JSON fields) for one setting.
Spelled = tuple[list[str], dict]


def _tristate(option: str, key: str) -> st.SearchStrategy[Spelled]:
    return TRISTATE.map(lambda v: ([f"--{option}={v}"], {key: v}))


def _boolean(option: str, key: str) -> st.SearchStrategy[Spelled]:
    return st.booleans().map(lambda v: ([f"--{option}={'yes' if v else 'no'}"], {key: v}))


def _flag(option: str, key: str) -> st.SearchStrategy[Spelled]:
    return st.booleans().map(lambda v: ([f"--{option}"] if v else [], {key: v}))


def _paths(option: str, key: str) -> st.SearchStrategy[Spelled]:
    return st.lists(ABS, max_size=2).map(lambda ps: ([f"--{option}={p}" for p in ps], {key: ps}))


def _path(option: str, key: str) -> st.SearchStrategy[Spelled]:
    return ABS.map(lambda p: ([f"--{option}={p}"], {key: p}))


def _choice(option: str, key: str, values: list[str]) -> st.SearchStrategy[Spelled]:
    return st.sampled_from(values).map(lambda v: ([f"--{option}={v}"], {key: v}))


def _state(option: str, key: str) -> st.SearchStrategy[Spelled]:
    return st.one_of(st.sampled_from(["auto", "off", "yes", "no"]), ABS).map(lambda v: ([f"--{option}={v}"],
                                                                                      {key: v}))


def _binds() -> st.SearchStrategy[Spelled]:
    bind = st.tuples(ABS, ABS, st.booleans())

    def spell(binds: list[tuple[str, str, bool]]) -> Spelled:
        binds = sorted(binds, key=lambda b: b[2])  # the command line lists --bind ones before --bind-ro ones
        cli = [f"--bind{'-ro' if ro else ''}={src}:{dst}" for src, dst, ro in binds]
        return cli, {"binds": [f"{'ro' if ro else 'rw'}:{src}:{dst}" for src, dst, ro in binds]}
    return st.lists(bind, max_size=3).map(spell)


def _credentials() -> st.SearchStrategy[Spelled]:
    cred = st.tuples(WORD, st.text(string.ascii_letters + string.digits + " .,", max_size=20))

    def spell(creds: list[tuple[str, str]]) -> Spelled:
        creds = list(dict(creds).items())  # IDs are unique
        return ([f"--set-credential={i}:{v}" for i, v in creds],
                {"credentials": [f"{i}:{base64.b64encode(v.encode()).decode()}" for i, v in creds]})
    return st.lists(cred, max_size=3).map(spell)


def _image() -> st.SearchStrategy[Spelled]:
    return st.one_of(st.just(([], {})), st.tuples(ABS, st.sampled_from(["raw", "qcow2"]),
                                                   st.sampled_from(["virtio-blk", "nvme", "virtio-scsi"])).map(
        lambda t: ([f"--image={t[0]}", f"--image-format={t[1]}", f"--image-disk-type={t[2]}"],
                   {"image": t[0], "imageFormat": t[1], "imageDiskType": t[2]})))


def _extra_drives() -> st.SearchStrategy[Spelled]:
    drive = st.tuples(st.sampled_from(["raw", "qcow2"]), st.sampled_from(["virtio-blk", "nvme"]), ABS)
    return st.lists(drive, max_size=2).map(lambda ds: ([f"--extra-drive={f}:{t}:{p}" for f, t, p in ds],
                                                       {"extraDrives": [f"{f}:{t}:{p}" for f, t, p in ds]}))


def _features() -> st.SearchStrategy[Spelled]:
    feature = st.sampled_from(["secure-boot", "~secure-boot", "enrolled-keys", "~enrolled-keys", ""])
    return st.tuples(st.lists(feature, max_size=3), st.one_of(st.none(), TRISTATE)).map(
        lambda t: ([f"--firmware-features={f}" for f in t[0]] + ([f"--secure-boot={t[1]}"] if t[1] else []),
                   {"firmwareFeatures": t[0], **({"secureBoot": t[1]} if t[1] else {})}))


def _network() -> st.SearchStrategy[Spelled]:
    return st.sampled_from([([], {}), (["--network-tap"], {"network": "tap"}),
                            (["--network-user-mode"], {"network": "user"})])


STRATEGIES: list[st.SearchStrategy[Spelled]] = [
    _image(), _extra_drives(), _paths("initrd", "initrds"),
    _flag("ephemeral", "ephemeral"), _boolean("discard-disk", "discardDisk"),
    st.sampled_from(["1G", "512M", "3G"]).map(lambda v: ([f"--grow-image={v}"], {"growImage": v})),
    st.integers(1, 64).map(lambda n: ([f"--cpus={n}"], {"cpus": str(n)})),
    st.sampled_from(["256M", "2G", "1G:4G:8", "1536M"]).map(lambda v: ([f"--ram={v}"], {"ram": v})),
    _tristate("kvm", "kvm"), _tristate("vsock", "vsock"), _tristate("tpm", "tpm"), _tristate("register", "register"),
    _tristate("pass-ssh-key", "passSshKey"),
    st.integers(3, 0xFFFFFFFE).map(lambda n: ([f"--vsock-cid={n}"], {"vsockCid": n})),
    st.one_of(st.sampled_from(["auto", "uefi", "bios", "none"]), ABS).map(lambda v: ([f"--firmware={v}"],
                                                                                    {"firmware": v})),
    _features(), _path("efi-nvram-template", "efiNvramTemplate"),
    _state("efi-nvram-state", "efiNvramState"), _state("tpm-state", "tpmState"),
    _binds(), _credentials(), _network(),
    st.text(string.ascii_lowercase, min_size=1, max_size=8).flatmap(
        lambda n: st.sampled_from([n, f"{n}.slice"]).map(lambda v: ([f"--slice={v}"], {"slice": v}))),
    st.lists(st.sampled_from(["MemoryMax=1G", "TasksMax=10", "CPUWeight=50"]), max_size=2).map(
        lambda ps: ([f"--property={p}" for p in ps], {"properties": ps})),
    _flag("keep-unit", "keepUnit"), _boolean("notify-ready", "notifyReady"),
    st.uuids().filter(lambda u: u.int != 0).map(lambda u: ([f"--uuid={u}"], {"uuid": str(u)})),
    st.lists(st.text(string.ascii_letters + "=.", min_size=1, max_size=12), max_size=2).map(
        lambda s: ([f"--smbios11={v}" for v in s], {"smbios11": s})),
    _choice("console", "console", ["interactive", "read-only", "headless"]),
    _choice("console-transport", "consoleTransport", ["virtio", "serial"]),
    _choice("ssh-key-type", "sshKeyType", ["ed25519", "rsa"]),
    st.lists(WORD.map(lambda w: f"{w}=1"), max_size=3).map(lambda ws: (ws, {"kernelCommandLine": ws})),
]


@st.composite
def machine(draw: st.DrawFn) -> Spelled:
    """A machine: a kernel, and each setting given or not, spelled both ways."""
    cli, data = ["--linux=/boot/vmlinuz"], {"linux": "/boot/vmlinuz"}
    for strategy in STRATEGIES:
        if draw(st.booleans()):
            words, fields = draw(strategy)
            cli += words
            data.update(fields)
    return cli, data


def from_cli(words: list[str]) -> object:
    parser = vmspawn_parser()
    ns: argparse.Namespace = parser.parse_intermixed_args(["-M", "vm", *words])
    return config_from_args(ns)


def outcome(make) -> object:
    try:
        return make()
    except ConfigError as e:
        return ("refused", e.reason)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machine())
def test_the_command_line_and_json_spell_the_same_config(spelled: Spelled) -> None:
    cli, data = spelled
    data = {"console": "interactive", **data}  # a daemon's JSON default is headless; vmspawn's is not
    by_cli = outcome(lambda: from_cli(cli))
    by_json = outcome(lambda: config_from_json("vm", data))
    assert type(by_cli) is type(by_json), (cli, data, by_cli, by_json)
    if isinstance(by_cli, tuple):
        return  # both refused it (e.g. --ephemeral with --extra-drive)
    assert by_cli == by_json
    again = config_from_json("vm", config_to_json(by_cli))  # type: ignore[arg-type]
    assert again == by_cli


def test_slice_and_secure_boot_mean_the_same_both_ways() -> None:
    cli = from_cli(["--linux=/k", "--slice=foo", "--firmware-features=~secure-boot", "--secure-boot=yes"])
    data = config_from_json("vm", {"linux": "/k", "slice": "foo", "firmwareFeatures": ["~secure-boot"],
                                   "secureBoot": "yes", "console": "interactive"})
    assert cli == data and cli.slice == "foo.slice"  # type: ignore[attr-defined]
    assert cli.firmware_features == ("~secure-boot", "secure-boot=yes")  # type: ignore[attr-defined]


@pytest.mark.parametrize("key,value,reason", [
    ("slice", "bad/name", "slice unit name"), ("tpmState", "./relative", "absolute"),
    ("vsockCid", "1234", "integer"), ("notifyReady", "yes", "true or false"), ("bogus", 1, "unknown field"),
])
def test_json_errors_name_the_field_and_value(key: str, value: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as e:
        config_from_json("vm", {"linux": "/k", key: value})
    assert e.value.field == key


def test_every_json_setting_is_in_the_served_config_type_and_back() -> None:
    names = [name for name, _ in varlink_config_fields()]
    assert names == list(JSON_FIELDS)
    assert [f.name for f in interface.Config.__dataclass_fields__.values()] == names
    full = config_to_json(config_from_json("vm", {"linux": "/k", "uuid": str(uuid.uuid4())}))
    assert set(full) == set(JSON_FIELDS)
    interface.Config(**full)  # every field the JSON form has, the varlink type takes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machine(), st.sampled_from(list(interface.MachineState)), st.one_of(st.none(), st.integers(1, 1 << 22)))
def test_a_machines_reply_is_what_the_interfaces_types_make_of_it(spelled: Spelled, state: interface.MachineState,
                                                                  pid: int | None) -> None:
    # (a reply's config is JSON already and is not converted by type again: it must come out the same)
    config = outcome(lambda: config_from_json("vm", spelled[1]))
    if isinstance(config, tuple):
        return
    shown = api._shown_config(config)  # type: ignore[arg-type]
    info = interface.MachineInfo(name="vm", state=state, ready=pid is not None, since=1, pid=pid,
                                 runtimeDirectory="/run/vmspawnd/machines/vm" if pid else None, tpmStatePath=None,
                                 units=["machine-vm.scope"] if pid else [], status=None, exitStatus=None, failure=None,
                                 config=interface.Config(**shown), owner=1000, runAs=1000)
    typed = DataclassVarlinkType(interface.MachineInfo).tojson(info)
    typed["config"] = {key: value for key, value in typed["config"].items() if value is not None}
    assert api._reply_json(info, shown) == typed
    assert list(api._reply_json(info, shown)) == list(typed)  # (the same order of fields, too)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machine())
def test_a_config_without_its_secrets_is_still_valid_and_the_same_but_for_them(spelled: Spelled) -> None:
    # (what a run records, run.json: a restarted daemon shows it when the machine's definition is gone)
    config = outcome(lambda: config_from_json("vm", spelled[1]))
    if isinstance(config, tuple):
        return
    full = config_to_json(config)  # type: ignore[arg-type]
    kept = config_to_json(config_from_json("vm", config_to_json(config, secrets=False)))  # type: ignore[arg-type]
    assert [c.split(":")[0] + ":" for c in full["credentials"]] == kept.pop("credentials")
    full.pop("credentials")
    assert kept == full


def test_no_credential_value_is_left_where_a_config_can_carry_one() -> None:
    config = config_from_json("vm", {
        "linux": "/k", "credentials": [f"a:{base64.b64encode(b'secret-a').decode()}"],
        "smbios11": ["io.systemd.credential:b=secret-b", "io.systemd.credential.binary:c=c2VjcmV0LWM=", "x=shown"],
        "kernelCommandLine": ["quiet", "systemd.set_credential=d:secret-d", '"systemd.set_credential_binary=e:c2Vj"']})
    kept = config_to_json(config, secrets=False)
    again = config_from_json("vm", kept)
    assert again.credentials == (("a", b""),)
    assert again.smbios11 == ("io.systemd.credential:b=…", "io.systemd.credential.binary:c=…", "x=shown")
    assert kept["kernelCommandLine"] == ["quiet", "systemd.set_credential=d:…", '"systemd.set_credential_binary=e:…']
    assert "secret" not in str(kept) and "c2Vj" not in str(kept) and "c2VjcmV0LWE" not in str(kept)


def test_each_option_is_spelled_once_and_documented() -> None:
    options = [s.option for s in SETTINGS if s.option]
    assert len(options) == len(set(options))
    assert all(s.help for s in SETTINGS if s.option), [s.key for s in SETTINGS if s.option and not s.help]
    text = vmspawn_parser().format_help()
    for option in options:
        assert option in text
    assert "--qemu-mem" not in text  # hidden compatibility spellings stay hidden
