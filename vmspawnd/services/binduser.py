# SPDX-License-Identifier: LGPL-2.1-or-later
"""--bind-user: a host user, with their home directory, made available inside the VM.

Each user gets a VM UID from 60514–60577 (the same number as their private group's GID), a
minimal JSON user and group record passed as the credentials ``userdb.transient.user.<name>`` and
``userdb.transient.group.<name>`` (systemd's userdb in the guest picks them up), and their home
shared read-write over virtiofs at ``/run/vmhost/home/<name>``, with virtiofsd translating the VM
UID/GID to the host's so files keep their host owner.
"""

from __future__ import annotations

import grp
import json
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.errors import ConfigError

MAP_UID_MIN, MAP_UID_MAX = 60514, 60577
HOME_MOUNT_DIR = Path("/run/vmhost/home")
NOBODY_UID = 65534
RECORD_SERVICE = "io.systemd.NSpawn"  # what systemd's own --bind-user writes into the records
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")


@dataclass(frozen=True)
class BoundUser:
    """A host user as they appear in the VM."""

    name: str
    host_uid: int
    host_gid: int
    host_home: Path
    vm_uid: int  # also the GID of their group in the VM
    user_record: dict
    group_record: dict

    @property
    def vm_home(self) -> Path:
        return HOME_MOUNT_DIR / self.name

    def credentials(self) -> list[tuple[str, bytes]]:
        return [(f"userdb.transient.user.{self.name}", _record_bytes(self.user_record)),
                (f"userdb.transient.group.{self.name}", _record_bytes(self.group_record))]


def _record_bytes(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def _hashed_password(name: str, shadow: Path) -> str | None:
    """The user's password hash from ``shadow``, when we may read it and there is one."""
    try:
        lines = shadow.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":")
        if len(fields) > 1 and fields[0] == name and fields[1] not in ("", "x"):
            return fields[1]
    return None


def resolve_bound_users(names: tuple[str, ...], shell: str = "no", groups: tuple[str, ...] = (),
                        shadow: Path = Path("/etc/shadow")) -> list[BoundUser]:
    """Look the users up on the host and build what the VM gets; ConfigError names the culprit."""
    if len(names) > MAP_UID_MAX - MAP_UID_MIN + 1:
        raise ConfigError("bind-user", str(len(names)), f"at most {MAP_UID_MAX - MAP_UID_MIN + 1} users")
    if len(set(names)) != len(names):
        raise ConfigError("bind-user", next(n for n in names if names.count(n) > 1), "given twice")
    users = []
    for vm_uid, name in enumerate(names, MAP_UID_MIN):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError("bind-user", name, "no such user on the host") from None
        if pw.pw_uid == 0:
            raise ConfigError("bind-user", name, "the root user cannot be bound into a VM")
        if pw.pw_uid == NOBODY_UID:
            raise ConfigError("bind-user", name, "the nobody user cannot be bound into a VM")
        try:
            group = grp.getgrgid(pw.pw_gid)
        except KeyError:
            raise ConfigError("bind-user", name, f"the user's group {pw.pw_gid} does not exist") from None
        if group.gr_name != name:
            raise ConfigError("bind-user", name, f"the user's primary group is {group.gr_name!r}; only users with "
                              "a private group of their own name can be bound")
        home = Path(pw.pw_dir)
        if not home.is_absolute() or not home.is_dir():
            raise ConfigError("bind-user", name, f"the user's home directory {home} is not a directory")
        vm_home = HOME_MOUNT_DIR / name
        user_record: dict = {"userName": name, "uid": vm_uid, "gid": vm_uid, "homeDirectory": str(vm_home),
                             "service": RECORD_SERVICE}
        login_shell = pw.pw_shell if shell == "yes" else None if shell == "no" else shell
        if login_shell:
            user_record["shell"] = login_shell
        if groups:
            user_record["memberOf"] = list(groups)
        hashed = _hashed_password(name, shadow)
        if hashed is not None:
            user_record["privileged"] = {"hashedPassword": [hashed]}
        group_record = {"groupName": name, "gid": vm_uid, "service": RECORD_SERVICE}
        users.append(BoundUser(name, pw.pw_uid, pw.pw_gid, home, vm_uid, user_record, group_record))
    return users
