# SPDX-License-Identifier: LGPL-2.1-or-later
"""Disk images: GPT root lookup, drive arguments, growing, image option validation."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.options import parse_vmspawn_args
from vmspawnd.plan import plan_launch
from vmspawnd.qemu.disks import ROOT_X86_64, USR_X86_64, drive_args, drive_serial, find_partition, grow_image
from vmspawnd.values import DiskType, Drive, ImageFormat


def make_gpt(path: Path, partitions: list[tuple[uuid.UUID, uuid.UUID]], size: int = 1 << 20) -> None:
    """A minimal GPT disk: protective MBR area, header at LBA 1, entries at LBA 2."""
    data = bytearray(size)
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<QII", header, 72, 2, 128, 128)
    data[512:604] = header
    for i, (type_uuid, part_uuid) in enumerate(partitions):
        off = 1024 + i * 128
        data[off:off + 16] = type_uuid.bytes_le
        data[off + 16:off + 32] = part_uuid.bytes_le
    path.write_bytes(bytes(data))


def test_root_partition_is_found_in_the_gpt(tmp_path):
    img, root = tmp_path / "disk.raw", uuid.uuid4()
    make_gpt(img, [(uuid.uuid4(), uuid.uuid4()), (ROOT_X86_64, root)])
    assert find_partition(img, ROOT_X86_64) == root
    assert find_partition(img, USR_X86_64) is None
    (tmp_path / "plain").write_bytes(b"\0" * 4096)
    assert find_partition(tmp_path / "plain", ROOT_X86_64) is None


def test_root_and_extra_drive_arguments(tmp_path):
    root, extra = tmp_path / "root,1.raw", tmp_path / "data.qcow2"
    root.write_bytes(b"\0" * 512)
    extra.write_bytes(b"\0" * 512)
    args = drive_args(Drive(root), (Drive(extra, ImageFormat.QCOW2),), discard=True, ephemeral=False)
    assert f"if=none,id=vmspawn,file={tmp_path}/root,,1.raw,format=raw,discard=on,snapshot=off" in args
    assert "virtio-blk-pci,drive=vmspawn,bootindex=1,serial=root,,1.raw" in args
    assert (f"driver=qcow2,cache.direct=off,cache.no-flush=on,file.driver=file,file.filename={extra},"
            "node-name=vmspawn_extra_0") in args
    eph = drive_args(Drive(root, disk_type=DiskType.VIRTIO_SCSI), (), discard=False, ephemeral=True)
    assert "virtio-scsi-pci,id=vmspawn_scsi" in eph
    assert any("snapshot=on" in a and "discard=off" in a for a in eph)
    assert any(a.startswith("scsi-hd,drive=vmspawn,bus=vmspawn_scsi.0") for a in eph)


def test_long_serials_are_hashed():
    assert drive_serial(Path("/x/short.raw"), DiskType.VIRTIO_BLK) == "short.raw"
    long = drive_serial(Path("/x/" + "a" * 40), DiskType.VIRTIO_BLK)
    assert len(long) == 20 and all(c in "0123456789abcdef" for c in long)


def test_grow_image_never_shrinks(tmp_path):
    img = tmp_path / "g.raw"
    img.write_bytes(b"\0" * 10000)
    assert grow_image(img, 20000)
    assert img.stat().st_size == 20480
    assert not grow_image(img, 4096)
    assert img.stat().st_size == 20480


def test_image_options(tmp_path):
    img = tmp_path / "foo.raw"
    img.write_bytes(b"\0" * 4096)
    c = parse_vmspawn_args([f"--image={img}", "--image-disk-type=nvme", f"--extra-drive=qcow2:{img}"])
    assert c.name == "foo" and c.image == Drive(img, ImageFormat.RAW, DiskType.NVME)
    assert c.extra_drives == (Drive(img, ImageFormat.QCOW2, DiskType.NVME),)
    eph = parse_vmspawn_args([f"--image={img}", "-x"])
    assert eph.name.startswith("foo-") and len(eph.name) == len("foo-") + 16


@pytest.mark.parametrize("args,field", [
    (["--image=/nonexistent.raw"], "image"),
    (["--image={tmp}"], "image"),  # a directory is not an image
    (["--image={img}", "-x", "--extra-drive={img}"], "extra-drive"),
    (["--image={img}", "--image-format=qcow2", "--grow-image=1G"], "grow-image"),
    (["--image={img}", "--image-format=vmdk"], "image-format"),
    (["--image-format=qcow2", "-M", "x"], "image-format"),
    (["--image={img}", "--discard-disk=maybe"], "discard-disk"),
])
def test_bad_image_options(tmp_path, args, field):
    img = tmp_path / "foo.raw"
    img.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError) as e:
        plan_launch(parse_vmspawn_args([a.format(tmp=tmp_path, img=img) for a in args]))
    assert e.value.field == field
