# SPDX-License-Identifier: LGPL-2.1-or-later
"""--forward-journal: systemd-journal-remote receives the guest's journal over vsock.

``systemd-socket-activate`` listens on ``vsock:2:<guest CID>`` (the port is the guest's CID, as
upstream does it; over vhost-device-vsock, a fixed port's Unix socket where such connections arrive) and
hands connections to ``systemd-journal-remote``, which writes one file
(``*.journal``, ``--split-mode=none``) or a directory of them (``--split-mode=host``).  The guest
learns where to send through the credential ``journal.forward_to_socket``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.identity import ROOT, Identity, acting_as
from vmspawnd.qemu.vsock import HOST_CID, GuestVsock
from vmspawnd.services.runner import RunningService, ServiceRunner, ServiceSpec

#: Where Debian and others install it when it is not on $PATH (package systemd-journal-remote).
JOURNAL_REMOTE_PATHS = (Path("/usr/lib/systemd/systemd-journal-remote"),
                        Path("/lib/systemd/systemd-journal-remote"))
CREDENTIAL = "journal.forward_to_socket"


@dataclass(frozen=True)
class JournalLimits:
    """journal-remote's disk limits (bytes; ``max_files`` a count); None leaves its default."""

    max_use: int | None = None
    keep_free: int | None = None
    max_file_size: int | None = None
    max_files: int | None = None

    def args(self) -> list[str]:
        named = (("--max-use", self.max_use), ("--keep-free", self.keep_free),
                 ("--max-file-size", self.max_file_size), ("--max-files", self.max_files))
        return [f"{option}={value}" for option, value in named if value is not None]

    @property
    def any(self) -> bool:
        return bool(self.args())


def find_tool(name: str, candidates: tuple[Path, ...] = ()) -> Path:
    """``name`` on $PATH, else the first executable candidate; ConfigError naming the package."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    package = "systemd-journal-remote" if name == "systemd-journal-remote" else "systemd"
    raise ConfigError("forward-journal", name, f"not installed (apt install {package})")


def prepare_output(output: Path) -> str:
    """Create the output directory (or a ``*.journal`` file's parent), 0755; the split mode to use."""
    single_file = output.name.endswith(".journal")
    directory = output.parent if single_file else output
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("forward-journal", str(output), f"cannot create {directory}: {e.strerror}") from None
    return "none" if single_file else "host"


def listen_address(vsock: GuestVsock) -> str:
    """Where the guest's journal arrives."""
    port = vsock.journal_port
    return f"vsock:{HOST_CID}:{port}" if vsock.socket is None else str(vsock.host_port_path(port))


def journal_remote_spec(machine: str, vsock: GuestVsock, output: Path, limits: JournalLimits,
                        bound_to: str | None = None, identity: Identity = ROOT) -> ServiceSpec:
    """The helper that listens for the journal of the guest with ``vsock`` and writes it (as ``identity``)
    to ``output``."""
    with acting_as(identity):
        split_mode = prepare_output(output)
        if vsock.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                vsock.host_port_path(vsock.journal_port).unlink()  # an earlier run's
    # socket-activate gives its child a clean environment: --setenv carries the setting across
    argv = [str(find_tool("systemd-socket-activate")), f"--listen={listen_address(vsock)}",
            "--setenv=SYSTEMD_JOURNAL_REMOTE_CONFIG_FILE=/dev/null",
            str(find_tool("systemd-journal-remote", JOURNAL_REMOTE_PATHS)), f"--output={output}",
            f"--split-mode={split_mode}", *limits.args()]
    return ServiceSpec(name=f"vmspawnd-{machine}-journal", argv=tuple(argv), bound_to=bound_to,
                       description=f"journal of VM {machine} into {output}",
                       env={"SYSTEMD_JOURNAL_REMOTE_CONFIG_FILE": "/dev/null"}, identity=identity)


def guest_credential(vsock: GuestVsock) -> tuple[str, bytes]:
    return CREDENTIAL, f"vsock:{HOST_CID}:{vsock.journal_port}".encode()


async def start_journal_remote(runner: ServiceRunner, machine: str, vsock: GuestVsock, output: Path,
                               limits: JournalLimits, bound_to: str | None = None,
                               identity: Identity = ROOT) -> RunningService:
    return await runner.start(journal_remote_spec(machine, vsock, output, limits, bound_to, identity))
