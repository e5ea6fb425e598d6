# SPDX-License-Identifier: LGPL-2.1-or-later
"""A real OpenSSH sshd on loopback for tests, without installing (and so enabling) the ssh service.

The binary comes from Debian's openssh-server package, unpacked into the cache (``apt-get download``
and ``dpkg-deb -x``: nothing is installed, no service starts); it runs as our child on 127.0.0.1
with its own host key, authorized key and configuration.  Like the package, it needs the system
user ``sshd`` and ``/run/sshd`` for privilege separation: made if missing, and removed again after.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("VMSPAWND_CACHE", Path.home() / ".cache/vmspawnd")) / "sshd"


def sshd_binary(cache: Path = CACHE) -> Path:
    """The unpacked sshd (fetched once; needs root and Debian's package lists)."""
    binary = cache / "usr/sbin/sshd"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # apt's download user must be able to write there
        subprocess.run(["apt-get", "download", "-q", "openssh-server"], cwd=tmp, check=True, capture_output=True)
        (deb,) = Path(tmp).glob("openssh-server_*.deb")
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.move(str(unpacked), cache)
    return binary


class Sshd:
    """sshd on 127.0.0.1:port letting root in with one key; ``ssh_command`` is a matching ssh."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for key in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / key)], check=True)
        (workdir / "authorized_keys").write_text((workdir / "client.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = workdir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {workdir / 'host'}\nPidFile {workdir / 'pid'}\n"
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "AllowStreamLocalForwarding yes\nAllowTcpForwarding no\nX11Forwarding no\n")
        # its privilege-separation directory and user, as its package makes them (removed after, if ours)
        self._made_dir = not Path("/run/sshd").exists()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._made_user = subprocess.run(["getent", "passwd", "sshd"], capture_output=True).returncode != 0
        if self._made_user:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/run/sshd",
                            "--shell", "/usr/sbin/nologin", "sshd"], check=True)
        self.log = workdir / "sshd.log"
        self.proc = subprocess.Popen([str(sshd_binary()), "-D", "-e", "-f", str(config)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.ssh_command = workdir / "ssh"
        self.ssh_command.write_text(
            f"#!/bin/sh\nexec ssh -i {workdir / 'client'} -o StrictHostKeyChecking=no "
            f"-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR \"$@\"\n")
        self.ssh_command.chmod(0o755)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("sshd did not come up: " + self.log.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self._made_user:
            subprocess.run(["userdel", "sshd"], check=False, capture_output=True)
        if self._made_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)


#: sshd's configuration inside the test guest: root with a key only, no PAM (the guest has none).
GUEST_SSHD_CONFIG = (
    "HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nAuthorizedKeysFile /root/.ssh/authorized_keys\n"
    "PidFile none\nLogLevel VERBOSE\n")


def _shared_libraries(binary: Path) -> list[Path]:
    """The absolute paths ``ldd`` resolves ``binary``'s libraries (and its loader) to."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        words = line.replace("=>", " ").split()
        libs += [Path(w) for w in words if w.startswith("/")]
    return libs


def guest_sshd_initrd(workdir: Path) -> Path:
    """An extra initrd for the busybox test guest (``--initrd=`` after its own): the host's sshd with its
    libraries, a host key, ``/etc/passwd`` and a configuration for ``test.sshd=1``."""
    from vmspawnd.testing.guest import tree_entries, write_newc

    root = workdir / "sshd-root"
    (root / "bin").mkdir(parents=True)  # the guest's /usr/sbin is a link to /bin
    (root / "etc/ssh").mkdir(parents=True)
    binary = sshd_binary()
    shutil.copy(binary, root / "bin/sshd")
    for lib in _shared_libraries(binary):
        target = root / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, target)  # follows links: the file under the name the loader asks for
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc/ssh/sshd_config").write_text(GUEST_SSHD_CONFIG)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "etc/ssh/ssh_host_ed25519_key")],
                   check=True)
    initrd = workdir / "sshd.cpio"
    initrd.write_bytes(write_newc(tree_entries(root)))
    return initrd
