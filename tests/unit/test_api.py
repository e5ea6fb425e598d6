# SPDX-License-Identifier: LGPL-2.1-or-later
"""The varlink API against a live daemon process: description, hostile input, many clients."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmspawnd
from tests.polling import poll
from tests.rawvarlink import call
from vmspawnd.interface import interface_description
from vmspawnd.server import (
    OVERRIDDEN,
    EncodedJson,
    EncodedReplyType,
    PreconvertedDataclass,
    encode_message,
    hooks_astray,
)

REPO = Path(__file__).resolve().parents[2]


def test_varlink_file_equals_the_served_interface(daemon):
    on_disk = (REPO / "varlink" / "io.vmspawnd.Manager.varlink").read_text()
    assert on_disk == interface_description()
    served = call(daemon.socket, "org.varlink.service.GetInterfaceDescription", {"interface": "io.vmspawnd.Manager"})
    assert served["parameters"]["description"] == on_disk


def test_get_info_lists_our_interface(daemon):
    info = call(daemon.socket, "org.varlink.service.GetInfo")["parameters"]
    assert "io.vmspawnd.Manager" in info["interfaces"]


@pytest.mark.parametrize("method,params,error", [
    ("io.vmspawnd.Manager.Describe", {"name": "../etc"}, "io.vmspawnd.Manager.InvalidConfig"),
    ("io.vmspawnd.Manager.Describe", {"name": ""}, "io.vmspawnd.Manager.InvalidConfig"),
    ("io.vmspawnd.Manager.Describe", {"name": "x" * 100}, "io.vmspawnd.Manager.InvalidConfig"),
    ("io.vmspawnd.Manager.Describe", {"name": 42}, "org.varlink.service.InvalidParameter"),
    ("io.vmspawnd.Manager.Describe", {}, "org.varlink.service.InvalidParameter"),
    ("io.vmspawnd.Manager.Describe", {"name": "ghost"}, "io.vmspawnd.Manager.NoSuchMachine"),
    ("io.vmspawnd.Manager.Create", {"name": "a", "config": []}, "org.varlink.service.InvalidParameter"),
    ("io.vmspawnd.Manager.Create", {"name": "a"}, "org.varlink.service.InvalidParameter"),
    ("io.vmspawnd.Manager.Create", {"name": "a", "config": None}, "org.varlink.service.InvalidParameter"),
    ("io.vmspawnd.Manager.Create", {"name": "a", "config": "linux=/bin/sh"}, "org.varlink.service.InvalidParameter"),
    ("io.vmspawnd.Manager.Create", {"name": "a", "config": {"ram": "9" * 5000}}, "io.vmspawnd.Manager.InvalidConfig"),
    ("io.vmspawnd.Manager.Create", {"name": "a", "config": {"linux": "relative/path"}},
     "io.vmspawnd.Manager.InvalidConfig"),
    ("io.vmspawnd.Manager.Create", {"name": "a", "config": {"cpus": "0"}}, "io.vmspawnd.Manager.InvalidConfig"),
    ("io.vmspawnd.Manager.Stop", {"name": "ghost", "timeout": -5}, "io.vmspawnd.Manager.NoSuchMachine"),
    ("io.vmspawnd.Manager.Nope", {}, "org.varlink.service.MethodNotFound"),
])
def test_bad_requests_get_error_replies(daemon, method, params, error):
    reply = call(daemon.socket, method, params)
    assert reply.get("error") == error, reply


def test_invalid_config_names_the_field(daemon):
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "a", "config": {"ram": "2G:1G"}})
    assert reply["error"] == "io.vmspawnd.Manager.InvalidConfig"
    assert reply["parameters"]["field"] == "ram"


@pytest.mark.parametrize("config,field,reason", [
    ({"cpus": 2}, "cpus", "invalid cpus=2: expected a string"),
    ({"ram": 2048}, "ram", "invalid ram=2048: expected a string"),
    ({"vsockCid": "5"}, "vsockCid", 'invalid vsockCid="5": expected an integer'),
    ({"ephemeral": "yes"}, "ephemeral", 'invalid ephemeral="yes": expected true or false'),
    ({"tpm": True}, "tpm", "invalid tpm=true: expected a string"),
    ({"binds": ["rw:/srv:/srv", 3]}, "binds", "invalid binds=3: expected a string"),
    ({"credentials": "id:eA=="}, "credentials",  # (a secret: not echoed, as a stored definition's error is logged)
     "invalid credentials=(a string, not shown): expected a list of at most 256 items"),
    ({"credentials": [None]}, "credentials", "invalid credentials=(null, not shown): expected a string"),
    ({"kernelCommandLine": "systemd.set_credential=id:x"}, "kernelCommandLine",
     "invalid kernelCommandLine=(a string, not shown): expected a list of at most 256 items"),
    ({"cpus": ["8"] * 100_000}, "cpus", 'invalid cpus=' + json.dumps(["8"] * 100)[:64] + "…: expected a string"),
    ({"bogus": 1}, "bogus", "invalid bogus: unknown field"),
    ({"cpus": "2", "tmp": "yes"}, "tmp", "invalid tmp: unknown field"),
])
def test_a_setting_of_the_wrong_json_type_or_unknown_is_invalid_config_naming_it(daemon, config, field, reason):
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "a", "config": {"linux": "/k", **config}})
    assert reply == {"error": "io.vmspawnd.Manager.InvalidConfig", "parameters": {"field": field, "reason": reason}}
    assert list((daemon.state / "machines").glob("*.json")) == []


@pytest.mark.parametrize("config,field,reason", [
    ({"kernelCommandLine": ["systemd.set_credential=id:top-secret\0"]}, "kernelCommandLine",
     "invalid kernelCommandLine=systemd.set_credential=id:…: expected a string of at most 4096 characters and no NUL"),
    ({"kernelCommandLine": ["systemd.set_credential=id:top-secret\ud800"]}, "kernelCommandLine",
     "invalid kernelCommandLine=systemd.set_credential=id:…: expected text (it has a lone surrogate)"),
    ({"smbios11": ["io.systemd.credential:id=top-secret\ud800"]}, "smbios11",
     "invalid smbios11=io.systemd.credential:id=…: expected text (it has a lone surrogate)"),
    ({"kernelCommandLine": ["systemd.set_credential=id:" + "s" * 5000 + "\0"]}, "kernelCommandLine",  # (one "…")
     "invalid kernelCommandLine=systemd.set_credential=id:…: expected a string of at most 4096 characters and no NUL"),
    ({"credentials": ["id:top-secret\ud800"]}, "credentials",
     "invalid credentials=id:…: expected text (it has a lone surrogate)"),
    ({"ram": "9" * 5000}, "ram", "invalid ram=" + "9" * 256 + "…: expected a string of at most 128 characters"),
    ({"kernelCommandLine": ["quiet\x1b[2J\0"]}, "kernelCommandLine",
     "invalid kernelCommandLine=quiet\\x1b[2J\\x00: expected a string of at most 4096 characters and no NUL"),
])
def test_an_invalid_value_of_the_right_type_is_shown_cut_short_escaped_and_without_a_secret(daemon, config, field,
                                                                                              reason):
    # (an error of a stored definition is logged, and Describe shows it: no credential's value in it, and a
    # megabyte sent in a setting does not come back whole)
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "a", "config": {"linux": "/k", **config}})
    assert reply == {"error": "io.vmspawnd.Manager.InvalidConfig", "parameters": {"field": field, "reason": reason}}


def test_an_invalid_machine_name_is_shown_cut_short_and_escaped(daemon):
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "\x1b]0;" + "x" * 100_000, "config": {}})
    assert reply["error"] == "io.vmspawnd.Manager.InvalidConfig"
    assert reply["parameters"]["reason"].startswith("invalid name=\\x1b]0;" + "x" * 60 + "…: a machine name is")


def test_a_config_of_a_few_settings_is_defined_with_the_defaults_for_the_rest(daemon):
    config = {"linux": "/bin/sh", "cpus": "2", "kernelCommandLine": ["quiet"], "tpm": None}
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "a", "config": config})
    shown = reply["parameters"]["machine"]["config"]
    assert (shown["cpus"], shown["kernelCommandLine"], shown["tpm"]) == ("2", ["quiet"], "auto")  # (null: left out)
    assert shown["ram"] == str(2 << 30)  # (vmspawn's default, 2G)


@pytest.mark.parametrize("name,config,field", [
    ("a", {"cpus": "²"}, "cpus"),  # (str.isdigit() takes it, int() does not)
    ("a", {"ram": "1G:2G:²"}, "ram"),
    ("a", {"privateUsers": "²"}, "privateUsers"),
    ("a", {"ram": "٣G"}, "ram"),  # (a digit to int() and float(), but not to systemd)
    ("a", {"linux": "/boot/vmlinuz\ud800"}, "linux"),  # JSON's lone surrogate: no path can carry it
    ("a", {"kernelCommandLine": ["quiet", "\udfff"]}, "kernelCommandLine"),
    ("foo\n", {}, "name"),
])
def test_unicode_tricks_are_invalid_config_naming_the_field_and_define_nothing(daemon, name, config, field):
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": name, "config": {"linux": "/k", **config}})
    assert reply.get("error") == "io.vmspawnd.Manager.InvalidConfig", reply
    assert reply["parameters"]["field"] == field, reply
    assert list((daemon.state / "machines").glob("*.json")) == []


def test_garbage_closes_only_that_connection(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(daemon.socket))
        s.sendall(b"{this is not json\0")
        data = b""
        while chunk := s.recv(65536):  # an error reply, then we hang up on a protocol violation
            data += chunk
        assert json.loads(data.split(b"\0")[0])["error"] == "invalid.asyncvarlink.ProtocolViolation"
    assert "io.vmspawnd.Manager" in call(daemon.socket, "org.varlink.service.GetInfo")["parameters"]["interfaces"]


def _replies(s: socket.socket) -> list[dict]:
    """Every message the daemon sends on ``s`` until it hangs up."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return [json.loads(m) for m in data.split(b"\0")[:-1]]


def _request(method: str, more: bool = False, **parameters: object) -> bytes:
    call = {"method": f"io.vmspawnd.Manager.{method}", "parameters": parameters, **({"more": True} if more else {})}
    return json.dumps(call).encode() + b"\0"


def test_calls_sent_in_one_write_are_each_answered_in_order(daemon):
    created = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "a", "config": {"linux": "/bin/sh"}})
    assert "error" not in created, created
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(daemon.socket))
        s.sendall(_request("Describe", name="a") + _request("Describe", name="nope") + _request("List", more=True))
        s.shutdown(socket.SHUT_WR)  # (the daemon hangs up once it answered all)
        replies = _replies(s)
    assert [r.get("error") for r in replies] == [None, "io.vmspawnd.Manager.NoSuchMachine", None], replies
    assert replies[0]["parameters"]["machine"]["name"] == "a"
    assert replies[2]["parameters"]["machine"]["name"] == "a" and not replies[2].get("continues")


def test_nothing_after_a_protocol_violation_in_the_same_write_is_called(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(daemon.socket))
        s.sendall(_request("Create", name="before", config={"linux": "/bin/sh"}) + b"{not json\0"
                  + _request("Create", name="after", config={"linux": "/bin/sh"}))
        replies = _replies(s)  # the daemon hangs up
    assert [r.get("error") for r in replies] == [None, "invalid.asyncvarlink.ProtocolViolation"], replies
    assert "not valid JSON" in replies[1]["parameters"]["reason"]
    assert sorted(p.stem for p in (daemon.state / "machines").glob("*.json")) == ["before"]


def test_file_descriptors_a_client_sends_with_a_call_are_closed(daemon):
    baseline = daemon.fds()  # (the daemon holds 100 for a while after each call, not 2,000)
    r, w = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(daemon.socket))
            for _ in range(20):
                socket.send_fds(s, [_request("Describe", name="nope")], [r, w] * 50)
                data = b""
                while not data.endswith(b"\0"):
                    data += s.recv(65536)
                assert json.loads(data[:-1])["error"] == "io.vmspawnd.Manager.NoSuchMachine", data
            poll(daemon.fds, lambda n: n <= baseline + 1, 5)  # (the connection itself)
    finally:
        os.close(r)
        os.close(w)


def test_a_huge_message_does_not_eat_the_daemons_memory(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket))
        try:
            for _ in range(64):
                s.sendall(b"x" * 65536)  # 4 MiB without a terminating NUL
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert daemon.proc.poll() is None
    assert call(daemon.socket, "io.vmspawnd.Manager.ListFirmware")["parameters"]["firmware"] is not None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["Create", "Describe", "Start", "Stop", "Kill", "Reboot", "Pause", "Resume", "Remove",
                               "List", "Subscribe", "OpenConsole", "ListFirmware"]),
       params=st.dictionaries(st.sampled_from(["name", "config", "timeout", "signal", "extra"]), json_values,
                              max_size=4),
       raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_fuzzed_requests_never_hurt_the_daemon(daemon, method, params, raw):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.5)
        s.connect(str(daemon.socket))
        payload = raw if raw is not None else json.dumps(
            {"method": f"io.vmspawnd.Manager.{method}", "parameters": params}).encode()
        try:
            s.sendall(payload + b"\0")
            s.recv(65536)
        except (TimeoutError, ConnectionError):
            pass
    assert daemon.proc.poll() is None
    reply = call(daemon.socket, "io.vmspawnd.Manager.List", more=True)
    assert "error" not in reply, reply
    # whatever was thrown at it, nothing with a hostile name got defined
    for entry in (daemon.state / "machines").glob("*.json"):
        assert "/" not in entry.stem and entry.stem


def test_a_client_hanging_up_mid_stream_does_not_disturb_others(daemon):
    for _ in range(20):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(daemon.socket))
            s.sendall(json.dumps({"method": "io.vmspawnd.Manager.Subscribe", "parameters": {},
                                  "more": True}).encode() + b"\0")
            s.recv(4096)  # the "subscribed" reply, then we vanish
    watcher = subprocess.Popen([*daemon.ctl_argv(), "--json", "events"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create",
                 {"name": "evt", "config": {"linux": "/nonexistent"}})
    assert reply["error"] == "io.vmspawnd.Manager.InvalidConfig"
    watcher.terminate()
    watcher.communicate(timeout=10)
    assert daemon.proc.poll() is None


def test_a_hundred_concurrent_clients(daemon):
    async def one(i: int) -> dict:
        reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
        method = "io.vmspawnd.Manager.Describe" if i % 2 else "org.varlink.service.GetInfo"
        writer.write(json.dumps({"method": method, "parameters": {"name": f"m{i}"} if i % 2 else {}}).encode()
                     + b"\0")
        await writer.drain()
        data = await asyncio.wait_for(reader.readuntil(b"\0"), 30)
        writer.close()
        return json.loads(data[:-1])

    async def all_clients() -> list[dict]:
        return await asyncio.gather(*(one(i) for i in range(100)))

    replies = asyncio.run(all_clients())
    assert len(replies) == 100
    for i, r in enumerate(replies):
        if i % 2:
            assert r["error"] == "io.vmspawnd.Manager.NoSuchMachine"
        else:
            assert "interfaces" in r["parameters"]


def test_an_unreadable_definition_is_never_overwritten(daemon):
    broken = daemon.state / "machines" / "keepme.json"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("{ not json")
    daemon.stop_daemon()
    daemon.start()
    reply = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "keepme", "config": {"linux": "/bin/sh"}})
    assert reply["error"] == "io.vmspawnd.Manager.MachineExists"
    assert broken.read_text() == "{ not json"


def test_state_paths_over_varlink_must_be_absolute(daemon):
    for field in ("tpmState", "efiNvramState"):
        reply = call(daemon.socket, "io.vmspawnd.Manager.Create",
                     {"name": "st", "config": {"linux": "/bin/sh", field: "./relative"}})
        assert reply["error"] == "io.vmspawnd.Manager.InvalidConfig" and reply["parameters"]["field"] == field


def test_io_systemd_service_answers_like_systemds_daemons(daemon):
    assert "error" not in call(daemon.socket, "io.systemd.service.Ping")
    env = call(daemon.socket, "io.systemd.service.GetEnvironment")["parameters"]["environment"]
    assert any(line.startswith("PATH=") for line in env)
    assert "error" not in call(daemon.socket, "io.systemd.service.SetLogLevel", {"level": 7})
    assert call(daemon.socket, "io.systemd.service.SetLogLevel", {"level": 9})["error"].endswith("InvalidParameter")
    info = call(daemon.socket, "org.varlink.service.GetInfo")["parameters"]
    assert info["url"].startswith("file://") and info["url"].endswith("README.md")
    assert "io.systemd.service" in info["interfaces"]


def list_replies(path: Path, on_sent: Callable[[], None] = lambda: None) -> list[dict]:
    """Every reply of one List (``more``), in order (``on_sent`` runs before the first is read)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(json.dumps({"method": "io.vmspawnd.Manager.List", "parameters": {}, "more": True}).encode() + b"\0")
        on_sent()
        data, replies = b"", []
        while chunk := s.recv(1 << 20):
            data += chunk
            *messages, data = data.split(b"\0")
            replies += [json.loads(m) for m in messages]
            if replies and not replies[-1].get("continues"):
                return replies
    raise AssertionError(f"the List ended after {len(replies)} replies")


def test_lists_stream_every_machine_and_show_each_change(daemon):
    """Replies written at once (and in bursts) arrive whole and in order, for several clients at a time;
    a machine's reply, kept between changes, follows a change of its definition."""
    names = sorted(f"m{i:03}" for i in range(150))
    for name in names:
        assert "error" not in call(daemon.socket, "io.vmspawnd.Manager.Create",
                                   {"name": name, "config": {"linux": "/bin/sh"}})

    async def concurrent_lists() -> list[list[str]]:
        return await asyncio.gather(*(asyncio.to_thread(
            lambda: [r["parameters"]["machine"]["name"] for r in list_replies(daemon.socket)]) for _ in range(6)))

    for listed in asyncio.run(concurrent_lists()):
        assert listed == names
    replies = list_replies(daemon.socket)
    assert [r.get("continues", False) for r in replies] == [True] * 149 + [False]
    assert call(daemon.socket, "io.vmspawnd.Manager.Describe", {"name": "m007"})["parameters"]["machine"][
        "config"]["linux"] == "/bin/sh"
    definition = daemon.state / "machines" / "m007.json"
    saved = json.loads(definition.read_text())
    saved["config"]["linux"] = "/bin/true"
    definition.write_text(json.dumps(saved))
    assert "error" not in call(daemon.socket, "io.systemd.service.Reload")
    assert call(daemon.socket, "io.vmspawnd.Manager.Describe", {"name": "m007"})["parameters"]["machine"][
        "config"]["linux"] == "/bin/true"
    assert "error" not in call(daemon.socket, "io.vmspawnd.Manager.Remove", {"name": "m100"})
    assert len(list_replies(daemon.socket)) == 149


def test_a_list_larger_than_the_socket_buffer_reaches_a_slow_reader_whole(daemon):
    """≈ 0.7 MB of replies to a client that reads only later: what the socket cannot take waits, in
    order, and the daemon answers others meanwhile."""
    names = [f"big{i:03}" for i in range(300)]
    long_cmdline = [f"x{i}={'y' * 60}" for i in range(31)]  # ≈ 2 KB (the kernel's limit) of reply per machine
    for name in names:
        assert "error" not in call(daemon.socket, "io.vmspawnd.Manager.Create",
                                   {"name": name, "config": {"linux": "/bin/sh", "kernelCommandLine": long_cmdline}})
    answered = []

    def others_are_answered() -> None:  # while our List waits for us to read (a blocked daemon: a timeout)
        time.sleep(0.5)
        for _ in range(5):
            answered.append(call(daemon.socket, "io.vmspawnd.Manager.Describe", {"name": "big007"}, timeout=10))

    replies = list_replies(daemon.socket, on_sent=others_are_answered)
    assert [r["parameters"]["machine"]["name"] for r in replies] == names
    assert [r.get("continues", False) for r in replies] == [True] * 299 + [False]
    assert all(r["parameters"]["machine"]["config"]["kernelCommandLine"] == long_cmdline for r in replies)
    assert [a["parameters"]["machine"]["config"]["kernelCommandLine"] for a in answered] == [long_cmdline] * 5


@pytest.mark.parametrize("head", [{}, {"continues": True}])
def test_a_parameter_encoded_once_goes_out_as_the_json_it_stands_for(head):
    machine = {"name": "web", "config": {"ram": "2G", "kernelCommandLine": ["a=\"b\"", "ü\u2028"]}, "pid": None}
    data = encode_message({**head, "parameters": {"machine": EncodedJson(machine), "other": [1, "two"]}})
    assert data.endswith(b"\0") and data.count(b"\0") == 1
    assert json.loads(data[:-1]) == {**head, "parameters": {"machine": machine, "other": [1, "two"]}}
    alone = encode_message({**head, "parameters": {"machine": EncodedJson(machine)}})
    assert json.loads(alone[:-1]) == {**head, "parameters": {"machine": machine}}


@pytest.mark.parametrize("continues", [False, True])
def test_a_reply_made_straight_from_its_encoded_json_is_the_reply_converted_field_by_field(continues):
    @dataclasses.dataclass
    class Shown:
        name: str
        pid: int | None = None

    shown = Shown("web")
    shown.varlink_json = EncodedJson({"name": "web", "pid": None, "ü": "\u2028"})  # type: ignore[attr-defined]
    reply_type = EncodedReplyType({"machine": PreconvertedDataclass(Shown).optional()})
    straight = reply_type.message({"machine": shown}, continues)
    converted = encode_message({**({"continues": True} if continues else {}),
                                "parameters": reply_type.tojson({"machine": shown})})
    assert straight == converted
    assert json.loads(straight[:-1])["parameters"]["machine"]["ü"] == "\u2028"
    none = reply_type.message({"machine": None}, continues)  # (a List of no machines: no JSON carried)
    assert json.loads(none[:-1])["parameters"] == {"machine": None}


def test_the_installed_asyncvarlink_has_every_method_the_servers_guards_override():
    assert hooks_astray() == []  # (else: an asyncvarlink the guards were not written for; pyproject.toml pins it)
    assert sum(len(names) for _, names in OVERRIDDEN) == 4


def test_a_guard_whose_asyncvarlink_method_was_renamed_or_reshaped_is_named():
    class Upstream:
        def _accept(self) -> None: ...
        def _read(self, size: int) -> int: ...

    class Guarded(Upstream):
        def _accept(self) -> None: ...
        def _read(self, size: int, fds: list[int]) -> int: ...
        def _gone(self) -> None: ...

    assert hooks_astray(((Guarded, ("_accept", "_read", "_gone")),)) == ["Upstream._read", "Upstream._gone"]


def test_a_credentials_value_is_never_sent_back_but_is_kept(daemon):
    """Create's, Describe's and List's replies show a credential's ID, not its value (nor an SMBIOS
    credential's); the definition keeps the values, for the VM."""
    secret = base64.b64encode(b"s3cret-token").decode()
    config = {"linux": "/bin/sh", "credentials": [f"token:{secret}"],
              "smbios11": ["io.systemd.credential:password=hunter2", "io.systemd.stub.kernel-cmdline-extra=quiet"],
              "kernelCommandLine": ["quiet", "systemd.set_credential=passwd.plaintext-password.root:swordfish",
                                    f"systemd.set_credential_binary=key:{secret}",
                                    "quiet systemd.set_credential=pin:pin4711 ro",  # words are joined with spaces
                                    'x\t"systemd.set_credential=otp:otp992 113"']}
    replies = [call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "cred", "config": config}),
               call(daemon.socket, "io.vmspawnd.Manager.Describe", {"name": "cred"}),
               *list_replies(daemon.socket)]
    for reply in replies:
        assert "error" not in reply, reply
        # (values that are not bare digits: a reply's timestamps hold any run of digits now and then)
        values = (secret, "hunter2", "swordfish", "pin4711", "otp992")
        assert not any(word in json.dumps(reply) for word in values), reply
        shown = reply["parameters"]["machine"]["config"]
        assert shown["credentials"] == ["token"]
        assert shown["smbios11"] == ["io.systemd.credential:password=…", "io.systemd.stub.kernel-cmdline-extra=quiet"]
        assert shown["kernelCommandLine"] == ["quiet", "systemd.set_credential=passwd.plaintext-password.root:…",
                                              "systemd.set_credential_binary=key:…",
                                              "quiet systemd.set_credential=pin:…", 'x\t"systemd.set_credential=otp:…']
    saved = json.loads((daemon.state / "machines" / "cred.json").read_text())["config"]
    assert saved["credentials"] == [f"token:{secret}"] and "io.systemd.credential:password=hunter2" in saved["smbios11"]


def test_a_name_that_differs_from_anothers_only_in_case_is_refused(daemon):
    """ssh lowercases host names, so an address naming MyVM's vsock socket reaches myvm's: two such
    machines must not exist at once (they may belong to different users)."""
    config = {"linux": "/bin/sh"}
    assert "error" not in call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "MyVM", "config": config})
    refused = call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "myvm", "config": config})
    assert refused["error"] == "io.vmspawnd.Manager.InvalidConfig", refused
    assert refused["parameters"]["field"] == "name" and "MyVM" in refused["parameters"]["reason"], refused
    assert "error" not in call(daemon.socket, "io.vmspawnd.Manager.Remove", {"name": "MyVM"})
    assert "error" not in call(daemon.socket, "io.vmspawnd.Manager.Create", {"name": "myvm", "config": config})


def test_the_readme_url_is_a_file_url_for_a_path_of_any_bytes(tmp_path, monkeypatch) -> None:
    # (vmspawnd.docs_url: not made by Path.as_uri, which imports ssl on Python 3.14, but the same URL)
    copy = tmp_path / os.fsdecode(b"a copy \xff%")
    (copy / "vmspawnd").mkdir(parents=True)
    (copy / "README.md").write_text("readme\n")
    monkeypatch.setattr(vmspawnd, "__file__", str(copy / "vmspawnd" / "__init__.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "no-prefix"))
    assert vmspawnd.docs_url() == (copy / "README.md").as_uri()
    assert "%FF" in vmspawnd.docs_url() and "%20" in vmspawnd.docs_url()
