# SPDX-License-Identifier: LGPL-2.1-or-later
"""Journal MESSAGE_IDs of a machine's lifecycle (``journalctl MESSAGE_ID=… MACHINE=NAME``).

Each is logged with the field ``message_id`` (MESSAGE_ID= in the journal); the README lists them.
"""

from __future__ import annotations

CREATED = "5f04b5278f3c460892605df241caf7f9"
STARTED = "21de781e496843f4be2f447cc96ef96c"  # QEMU runs
READY = "f63a63ef5de347379bb59cdbcbd6762c"  # the guest sent READY=1
STOPPED = "a6143dc804264637add9905432051171"
FAILED = "1a9029bb064a4aa8b47d6b08f103684a"
RESET = "fb56df7bb0fa48e0b3f3d7b1de44a834"  # the VM was reset (machinectl reboot, or the guest rebooted)
REMOVED = "ee4b3434de9a4a54b63d200835c4e0f1"
REGISTRATION_FAILED = "f96fb6b5fb3c438491ae63aa3b493f54"  # systemd-machined could not be reached or refused

ALL = {"created": CREATED, "started": STARTED, "ready": READY, "stopped": STOPPED, "failed": FAILED,
       "reset": RESET, "removed": REMOVED, "registration failed": REGISTRATION_FAILED}
