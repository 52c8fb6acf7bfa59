"""Native revert (Volume.revert, xapi 26.16 and later): the disk keeps its key, keys
and CBT, takes the snapshot's content in place, and keeps every snapshot."""

import base64

import pytest
import rbd

from xcp_rbd.location import VolumeLocation
from xcp_rbd.xapi import PluginError

MiB = 1 << 20
BLOCK = 64 * 1024
SIZE = 16 * MiB


def changed_blocks(xapi, sr, key, key2):
    result = xapi.volume("Volume.list_changed_blocks", sr=sr, key=key, key2=key2,
                         offset=0, length=-1)
    bitmap = base64.b64decode(result["bitmap"])
    return {n for n in range(8 * len(bitmap)) if bitmap[n // 8] & (0x80 >> n % 8)}


def differing_blocks(image_io, volume, other):
    a, b = image_io.read(volume, 0, SIZE), image_io.read(other, 0, SIZE)
    return {n for n in range(SIZE // BLOCK)
            if a[n * BLOCK:(n + 1) * BLOCK] != b[n * BLOCK:(n + 1) * BLOCK]}


def test_native_revert_keeps_the_disk_its_snapshots_and_cbt(xapi, sr_uuid, sr, image_io):
    disk = xapi.vdi_create(sr_uuid, SIZE, name="vm disk")
    xapi.volume("Volume.set", sr=sr, key=disk["key"], k="owner", v="web01")
    xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])
    image_io.write(disk, 0, b"A" * BLOCK)
    older = xapi.vdi_snapshot(sr_uuid, disk["key"])
    image_io.write(disk, 5 * MiB, b"B" * BLOCK)
    newer = xapi.vdi_snapshot(sr_uuid, disk["key"])
    image_io.write(disk, 9 * MiB, b"C" * BLOCK)

    reverted = xapi.snapshot_revert(sr_uuid, older["key"], disk["key"], native=True)
    assert reverted["key"] == disk["key"] and reverted["uuid"] == disk["uuid"]
    assert reverted["keys"]["owner"] == "web01" and reverted["cbt_enabled"]
    assert reverted["uri"] == disk["uri"]
    assert image_io.read(disk, 0, BLOCK) == b"A" * BLOCK
    assert image_io.read(disk, 5 * MiB, BLOCK) == bytes(BLOCK)
    assert image_io.read(disk, 9 * MiB, BLOCK) == bytes(BLOCK)
    listed = {v["key"]: v for v in xapi.sr_scan(sr_uuid)}
    assert set(listed) == {disk["key"], older["key"], newer["key"]}
    assert image_io.read(newer, 5 * MiB, BLOCK) == b"B" * BLOCK
    assert listed[older["key"]]["keys"]["snapshot_of"] == disk["key"]

    # The next backup: from the older snapshot to a new one, every changed block.
    image_io.write(disk, 13 * MiB, b"D" * BLOCK)
    latest = xapi.vdi_snapshot(sr_uuid, disk["key"], xapi_keys=False)
    reported = changed_blocks(xapi, sr, older["key"], latest["key"])
    assert differing_blocks(image_io, older, latest) == {13 * MiB // BLOCK}
    assert {13 * MiB // BLOCK} <= reported


def test_native_revert_refuses_an_open_disk_and_changes_nothing(
        xapi, sr_uuid, sr, image_io):
    disk = xapi.vdi_create(sr_uuid, SIZE)
    snap = xapi.vdi_snapshot(sr_uuid, disk["key"], xapi_keys=False)
    image_io.write(disk, 0, b"live")
    where = VolumeLocation.parse(disk["uri"][0])
    ioctx = image_io.handle.open_ioctx(where.pool)
    ioctx.set_namespace(where.namespace)
    try:
        with rbd.Image(ioctx, where.image):   # a VM that still has it open
            with pytest.raises(PluginError) as refused:
                xapi.snapshot_revert(sr_uuid, snap["key"], disk["key"], native=True)
    finally:
        ioctx.close()
    assert refused.value.params[0] == "Volume_in_use"
    assert image_io.read(disk, 0, 4) == b"live"
    with pytest.raises(PluginError) as wrong:
        xapi.volume("Volume.revert", sr=sr, snapshot=disk["key"], key=snap["key"])
    assert wrong.value.params[0] == "Not_supported"


def test_native_revert_is_declared(xapi):
    assert "VDI_REVERT" in xapi.volume("Plugin.Query")["features"]
