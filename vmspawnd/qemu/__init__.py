# SPDX-License-Identifier: LGPL-2.1-or-later
"""Everything about talking to QEMU: binary and accelerator, argv, firmware, disks, QMP."""


def qemu_escape(value: object) -> str:
    """QEMU option values double every comma."""
    return str(value).replace(",", ",,")
