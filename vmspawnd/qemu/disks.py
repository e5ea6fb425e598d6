# SPDX-License-Identifier: LGPL-2.1-or-later
"""Disk images: the root image, extra drives, GPT root partition lookup, growing images."""

from __future__ import annotations

import os
import stat
import struct
import uuid
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.qemu import qemu_escape
from vmspawnd.values import DiskType, Drive, ImageFormat, sha256

ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
USR_X86_64 = uuid.UUID("8484680c-9521-48c6-9c11-b0720656f69e")


def check_image(path: Path, fmt: ImageFormat, field: str) -> None:
    """A disk image must be a regular file or a block device; qcow2 only as a regular file."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(field, str(path), e.strerror or "cannot access") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ConfigError(field, str(path), "not a regular file or block device")
    if fmt is ImageFormat.QCOW2 and not stat.S_ISREG(mode):
        raise ConfigError(field, str(path), "qcow2 images must be regular files")


def drive_serial(path: Path, disk_type: DiskType) -> str:
    """The file name, or a SHA-256 prefix when it is too long for the device's serial field."""
    limit = 30 if disk_type in (DiskType.VIRTIO_SCSI, DiskType.SCSI_CD) else 20
    name = path.name
    return name if len(name) <= limit else sha256(name).hex()[:limit]


def _device(disk_type: DiskType, drive_id: str, serial: str, boot: bool) -> list[str]:
    serial = qemu_escape(serial)
    bootindex = ",bootindex=1" if boot else ""
    if disk_type is DiskType.VIRTIO_BLK:
        return ["-device", f"virtio-blk-pci,drive={drive_id}{bootindex},serial={serial}"]
    if disk_type is DiskType.NVME:
        return ["-device", f"nvme,drive={drive_id}{bootindex},serial={serial}"]
    model = "scsi-cd" if disk_type is DiskType.SCSI_CD else "scsi-hd"
    return ["-device", f"{model},drive={drive_id},bus=vmspawn_scsi.0{bootindex},serial={serial}"]


ROOT_DRIVE = "vmspawn"  # the root image's drive id (QEMU's events name it so)
EXTRA_NODE = "vmspawn_extra_{}"  # the node name of extra drive N


def drive_path(root: Drive | None, extras: tuple[Drive, ...], name: str) -> Path | None:
    """The file of the drive QEMU names ``name`` (a drive id or node name, as :func:`drive_args` gave)."""
    if name == ROOT_DRIVE:
        return root.path if root is not None else None
    found = [d.path for i, d in enumerate(extras) if EXTRA_NODE.format(i) == name]
    return found[0] if found else None


def drive_args(root: Drive | None, extras: tuple[Drive, ...], *, discard: bool, ephemeral: bool) -> list[str]:
    """QEMU arguments for the root image and the extra drives (classic command-line form)."""
    args: list[str] = []
    drives = ([root] if root else []) + list(extras)
    if any(d.disk_type in (DiskType.VIRTIO_SCSI, DiskType.SCSI_CD) for d in drives):
        args += ["-device", "virtio-scsi-pci,id=vmspawn_scsi"]
    if root is not None:
        read_only = ",readonly=on" if root.disk_type is DiskType.SCSI_CD else ""
        args += ["-drive", f"if=none,id={ROOT_DRIVE},file={qemu_escape(str(root.path))},format={root.format.value},"
                           f"discard={'on' if discard else 'off'},snapshot={'on' if ephemeral else 'off'}{read_only}"]
        args += _device(root.disk_type, ROOT_DRIVE, drive_serial(root.path, root.disk_type), boot=True)
    for i, d in enumerate(extras):
        node = EXTRA_NODE.format(i)
        driver = "host_device" if d.is_block_device else "file"
        args += ["-blockdev", f"driver={d.format.value},cache.direct=off,cache.no-flush=on,file.driver={driver},"
                              f"file.filename={qemu_escape(str(d.path))},node-name={node}"
                              + (",read-only=on" if d.disk_type is DiskType.SCSI_CD else "")]
        args += _device(d.disk_type, node, drive_serial(d.path, d.disk_type), boot=False)
    return args


def grow_image(path: Path, size: int) -> bool:
    """Grow a raw image file to ``size`` (rounded up to 4096); never shrink.  True if it grew."""
    size = -(-size // 4096) * 4096
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_size >= size:
            return False
        os.ftruncate(fd, size)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def find_partition(path: Path, type_uuid: uuid.UUID) -> uuid.UUID | None:
    """The unique partition GUID of the first partition of ``type_uuid`` in a GPT image, if any."""
    try:
        with open(path, "rb") as f:
            for sector in (512, 4096):
                f.seek(sector)
                header = f.read(92)
                if len(header) < 92 or header[:8] != b"EFI PART":
                    continue
                entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
                if not 128 <= entry_size <= 4096 or count > 1024:
                    return None
                f.seek(entries_lba * sector)
                table = f.read(count * entry_size)
                for i in range(count):
                    entry = table[i * entry_size:(i + 1) * entry_size]
                    if len(entry) < 32:
                        break
                    if uuid.UUID(bytes_le=entry[:16]) == type_uuid:
                        return uuid.UUID(bytes_le=entry[16:32])
                return None
    except OSError:
        return None
    return None


def root_cmdline_word(image: Path) -> str:
    """``root=PARTUUID=…`` (or ``mount.usr=PARTUUID=…``) for booting a plain kernel with an image."""
    root = find_partition(image, ROOT_X86_64)
    if root is not None:
        return f"root=PARTUUID={root}"
    usr = find_partition(image, USR_X86_64)
    if usr is not None:
        return f"mount.usr=PARTUUID={usr}"
    raise ConfigError("image", str(image), "no root (or /usr) partition found in its GPT; pass root= yourself")
