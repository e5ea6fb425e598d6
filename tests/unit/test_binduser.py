# SPDX-License-Identifier: LGPL-2.1-or-later
"""--bind-user: host users looked up for real (Debian's own system users), records and checks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import VMSPAWN
from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.options import vmspawn_parser
from vmspawnd.services import virtiofsd
from vmspawnd.services.binduser import MAP_UID_MIN, resolve_bound_users
from vmspawnd.services.virtiofsd import Flavour, UidMap, Virtiofsd
from vmspawnd.settings import config_from_json, config_to_json
from vmspawnd.values import parse_bind_user_shell

# Debian's base system has these: "daemon" (1:1, home /usr/sbin) and "games" (5, group games 60,
# home /usr/games) own private groups of their names; "sync" lives in nogroup.
NO_SHADOW = Path("/nonexistent/shadow")


def test_daemon_user_becomes_vm_uid_60514_with_its_own_group_and_home_under_run_vmhost():
    (user,) = resolve_bound_users(("daemon",), shadow=NO_SHADOW)
    assert (user.name, user.host_uid, user.host_gid, user.host_home) == ("daemon", 1, 1, Path("/usr/sbin"))
    assert user.vm_uid == MAP_UID_MIN == 60514
    assert user.vm_home == Path("/run/vmhost/home/daemon")
    assert user.user_record == {"userName": "daemon", "uid": 60514, "gid": 60514,
                                "homeDirectory": "/run/vmhost/home/daemon", "service": "io.systemd.NSpawn"}
    assert user.group_record == {"groupName": "daemon", "gid": 60514, "service": "io.systemd.NSpawn"}
    creds = dict(user.credentials())
    assert json.loads(creds["userdb.transient.user.daemon"]) == user.user_record
    assert json.loads(creds["userdb.transient.group.daemon"]) == user.group_record


def test_several_users_get_consecutive_vm_uids_and_keep_their_host_gid():
    daemon, games = resolve_bound_users(("daemon", "games"), shadow=NO_SHADOW)
    assert (daemon.vm_uid, games.vm_uid) == (60514, 60515)
    assert (games.host_uid, games.host_gid) == (5, 60)


def test_shell_groups_and_password_hash_go_into_the_user_record(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:1::::::\ndaemon:$y$j9T$salt$hash:19000:0:99999:7:::\n")
    (host_shell,) = resolve_bound_users(("daemon",), "yes", ("wheel", "users"), shadow=shadow)
    assert host_shell.user_record["shell"] == "/usr/sbin/nologin"  # the host's
    assert host_shell.user_record["memberOf"] == ["wheel", "users"]
    assert host_shell.user_record["privileged"] == {"hashedPassword": ["$y$j9T$salt$hash"]}
    (fixed,) = resolve_bound_users(("daemon",), "/bin/sh", shadow=NO_SHADOW)
    assert fixed.user_record["shell"] == "/bin/sh" and "privileged" not in fixed.user_record
    (none,) = resolve_bound_users(("daemon",), "no", shadow=NO_SHADOW)
    assert "shell" not in none.user_record and "memberOf" not in none.user_record


@pytest.mark.parametrize(("names", "reason"), [
    (("root",), "root user cannot"),
    (("nobody",), "nobody user cannot"),
    (("no-such-user-here",), "no such user"),
    (("sync",), "private group"),
    (("daemon", "daemon"), "given twice"),
])
def test_users_that_cannot_be_bound_are_refused_by_name(names, reason):
    with pytest.raises(ConfigError) as e:
        resolve_bound_users(names, shadow=NO_SHADOW)
    assert e.value.field == "bind-user" and reason in str(e.value)
    assert names[-1] in str(e.value)


def test_shell_setting_parses_booleans_and_absolute_paths_only():
    assert parse_bind_user_shell("yes") == "yes" and parse_bind_user_shell("off") == "no"
    assert parse_bind_user_shell("/bin/zsh") == "/bin/zsh"
    for bad in ("zsh", "/bin/sh\n", "/bin/s\0h"):
        with pytest.raises(ConfigError, match="bind-user-shell"):
            parse_bind_user_shell(bad)


@pytest.mark.parametrize(("change", "field"), [
    ({"bind_user_groups": ("wheel",)}, "bind-user-group"),
    ({"bind_user_shell": "yes"}, "bind-user-shell"),
    ({"bind_users": ("../etc",)}, "bind-user"),
    ({"bind_users": ("daemon",), "bind_user_groups": ("a b",)}, "bind-user-group"),
])
def test_config_rules(change, field):
    config = MachineConfig(name="vm", linux=Path("/vmlinuz"), **change)
    with pytest.raises(ConfigError) as e:
        config.validated()
    assert e.value.field == field


def test_options_and_json_round_trip(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    ns = vmspawn_parser().parse_intermixed_args([f"--linux={kernel}", "-M", "vm", "--bind-user=daemon",
                                                 "--bind-user=games", "--bind-user-shell=/bin/sh",
                                                 "--bind-user-group=wheel"])
    assert (ns.bindUsers, ns.bindUserShell, ns.bindUserGroups) == (["daemon", "games"], "/bin/sh", ["wheel"])
    config = MachineConfig(name="vm", linux=kernel, bind_users=("daemon", "games"), bind_user_shell="/bin/sh",
                           bind_user_groups=("wheel",))
    data = config_to_json(config)
    assert (data["bindUsers"], data["bindUserShell"], data["bindUserGroups"]) == (["daemon", "games"], "/bin/sh",
                                                                                  ["wheel"])
    again = config_from_json("vm", data)
    assert (again.bind_users, again.bind_user_shell, again.bind_user_groups) == (("daemon", "games"), "/bin/sh",
                                                                                 ("wheel",))


def test_rust_virtiofsd_translates_the_bound_user_uid_and_gid_separately(tmp_path):
    rust = Virtiofsd(Path("/usr/libexec/virtiofsd"), Flavour.RUST, readonly=True, translate_ids=True)
    argv = virtiofsd.virtiofsd_argv(rust, Path("/usr/games"), read_only=False,
                                    sandbox="namespace", uid_map=UidMap(60515, 5, 1, 60, squash_others=True))
    rules = [argv[i + 1] for i, a in enumerate(argv) if a == "--translate-uid"]
    assert rules == ["map:60515:5:1", "squash-guest:0:5:60515", "squash-guest:60516:5:4294906779"]
    rules = [argv[i + 1] for i, a in enumerate(argv) if a == "--translate-gid"]
    assert rules == ["map:60515:60:1", "squash-guest:0:60:60515", "squash-guest:60516:60:4294906779"]


def _virtiofsd_translates() -> bool:
    try:
        return virtiofsd.find_virtiofsd().translate_ids
    except ConfigError:  # none at all: vmspawn refuses --bind-user just as clearly
        return False


@pytest.mark.skipif(_virtiofsd_translates(),
                    reason="this host's virtiofsd can translate UIDs (the VM test in tests/systemd covers it)")
def test_vmspawn_refuses_bind_user_clearly_when_virtiofsd_cannot_translate(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    p = subprocess.run([*VMSPAWN, f"--linux={kernel}", "-M", "bu", "--bind-user=daemon"], capture_output=True,
                       text=True, env=env, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert "cannot translate UIDs" in p.stderr or "no virtiofsd found" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []
