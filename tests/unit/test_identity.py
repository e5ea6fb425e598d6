# SPDX-License-Identifier: LGPL-2.1-or-later
"""Acting as a VM's user: the kernel, not our code, refuses what that user may not touch; only the
calling thread is affected, and root's rights come back after the block."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.identity import ROOT, Identity, acting_as, connect_as

NOBODY = Identity.of_uid(65534) if os.geteuid() == 0 else None
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to act as another user)")


def readable(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except PermissionError:
        return False


def test_acting_as_a_user_is_that_users_rights_in_this_thread_only(public_dir: Path) -> None:
    assert NOBODY is not None
    tmp_path = public_dir
    secret = tmp_path / "secret"
    secret.write_text("root's")
    secret.chmod(0o600)
    public = tmp_path / "public"
    public.mkdir(mode=0o777)
    public.chmod(0o777)
    inside, other_thread = threading.Event(), []
    done = threading.Event()

    def elsewhere() -> None:
        inside.wait(10)
        other_thread.append(readable(secret))
        done.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    with acting_as(NOBODY):
        assert not readable(secret)  # root's override of permissions is gone
        assert not os.access(secret, os.R_OK, effective_ids=True)
        (public / "made").write_text("x")  # what it creates is its own
        assert os.getgroups() == list(NOBODY.groups)
        inside.set()
        assert done.wait(10)
    thread.join()
    assert other_thread == [True]  # the event loop's other threads kept root's rights
    assert readable(secret) and os.getgroups() != list(NOBODY.groups)  # and so does this one, after
    made = (public / "made").stat()
    assert (made.st_uid, made.st_gid) == (NOBODY.uid, NOBODY.gid)


def test_a_path_the_user_put_anywhere_is_connected_to_with_their_rights(tmp_path: Path) -> None:
    assert NOBODY is not None
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(private / "sock"))
    server.listen(1)
    link = tmp_path / "users-link"  # what a user could leave in their runtime directory
    link.symlink_to(private / "sock")
    with pytest.raises(PermissionError):
        connect_as(NOBODY, str(link))
    connect_as(ROOT, str(link)).close()  # root's own VMs: as before
    server.close()


def test_a_uid_without_an_account_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no user with this uid"):
        Identity.of_uid(4_000_000_000)
    with pytest.raises(ConfigError, match="no user with this uid"):
        Identity.of_uid(-1)


def test_a_vms_processes_get_none_of_what_the_service_manager_gave_the_daemon(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("LC_") or n in ("LANGUAGE", "TZ")]:
        monkeypatch.delenv(name)  # (the test's own locale)
    for name, value in {"NOTIFY_SOCKET": "/run/systemd/notify", "LISTEN_FDS": "1", "LISTEN_PID": "7",
                        "JOURNAL_STREAM": "8:9", "STATE_DIRECTORY": "/var/lib/vmspawnd", "HTTPS_PROXY": "http://u:pw@p",
                        "LANG": "de_DE.UTF-8", "LC_TIME": "C", "PATH": "/usr/bin:/bin"}.items():
        monkeypatch.setenv(name, value)
    own = ROOT.environment()  # a VM of the daemon's own user: its environment, but the manager's variables
    assert not {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM", "STATE_DIRECTORY"} & set(own)
    assert (own["HTTPS_PROXY"], own["LANG"]) == ("http://u:pw@p", "de_DE.UTF-8")
    if os.geteuid() == 0:  # a user's VM: PATH, locale and time zone only, and the user's own names
        users = Identity.of_uid(65534).environment()
        assert users == {"PATH": "/usr/bin:/bin", "LANG": "de_DE.UTF-8", "LC_TIME": "C", "HOME": "/nonexistent",
                         "USER": "nobody", "LOGNAME": "nobody"}, users
    monkeypatch.delenv("LANG")
    assert ROOT.environment()["LANG"] == "C.UTF-8"  # where we name no locale
