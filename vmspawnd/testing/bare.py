# SPDX-License-Identifier: LGPL-2.1-or-later
"""The test guest on a bare QEMU, with the command line vmspawn would give it: for the bench's
comparisons with vmspawn, and for tests that drive QEMU's monitor themselves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmspawnd.config import ConsoleMode, MachineConfig, Ram, Tristate
from vmspawnd.plan import choose_firmware
from vmspawnd.qemu import qemu_escape
from vmspawnd.qemu.accel import choose_accelerator, find_qemu
from vmspawnd.qemu.argv import Resources, build_qemu_argv
from vmspawnd.qemu.firmware import prepare_nvram
from vmspawnd.testing.guest import TestGuest


def bare_qemu_argv(guest: TestGuest, words: Sequence[str], *, qmp_fd: int, notify_path: Path,
                   name: str = "bare", ram_mib: int = 256, firmware: str = "bios",
                   runtime_dir: Path | None = None) -> list[str]:
    """QEMU's argv for ``guest`` (kernel command line ``words``, TCG, headless) as vmspawn builds it, its
    monitor on the listening socket ``qmp_fd`` (to be inherited) and the guest's notify port connecting
    to ``notify_path`` (listen there first: the guest waits for its peer).  ``firmware``: ``bios``
    (SeaBIOS) or ``uefi`` (the descriptor vmspawn would choose, its variables a fresh copy of their
    template in ``runtime_dir``, as a run without a persistent store has them)."""
    config = MachineConfig(name=name, linux=guest.kernel, initrds=(guest.initrd,), kernel_cmdline=tuple(words),
                           ram=Ram(ram_mib << 20), console=ConsoleMode.HEADLESS, kvm=Tristate.NO,
                           firmware=firmware).validated()
    choice = choose_firmware(config)
    nvram = None
    if (template := choice.nvram_template()) is not None:
        if runtime_dir is None:
            raise ValueError(f"firmware={firmware}: its variables need a runtime_dir")
        nvram = prepare_nvram(template, None, runtime_dir)
    notify = ("-chardev", f"socket,id=notify,path={qemu_escape(str(notify_path))},reconnect=1",
              "-device", "virtserialport,chardev=notify,name=io.systemd.notify")
    resources = Resources(qemu=find_qemu(), kvm=choose_accelerator(Tristate.NO).kvm, qmp_fd=qmp_fd,
                          notify_args=notify, initrd=guest.initrd, firmware_args=tuple(choice.qemu_args(nvram)),
                          smm=choice.smm)
    return build_qemu_argv(config, resources)
