# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest's vsock device: open /dev/vhost-vsock and claim a CID for it."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import struct

from vmspawnd.errors import ConfigError
from vmspawnd.values import CID_MAX, CID_MIN

VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60


def candidate_cids(name: str, attempts: int = 64) -> list[int]:
    """Stable CIDs derived from the machine name, then random ones."""
    derived = [
        CID_MIN + int.from_bytes(hashlib.sha256(f"{name}/{i}".encode()).digest()[:8], "little") % (CID_MAX - CID_MIN)
        for i in range(attempts)
    ]
    return derived + [random.randint(CID_MIN, CID_MAX) for _ in range(attempts)]


def claim_vsock(name: str, device: str = "/dev/vhost-vsock", fixed_cid: int | None = None) -> tuple[int, int]:
    """Open the vhost-vsock device and set a free guest CID (exactly ``fixed_cid`` if given); return (fd, cid)."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        for cid in candidate_cids(name) if fixed_cid is None else [fixed_cid]:
            try:
                fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("<Q", cid))
                return fd, cid
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                if fixed_cid is not None:
                    raise ConfigError("vsock-cid", fixed_cid, "already taken by another VM") from None
        raise OSError(errno.EADDRNOTAVAIL, "no free vsock CID")
    except BaseException:
        os.close(fd)
        raise
