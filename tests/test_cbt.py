"""Changed block tracking through the installed scripts, on the real cluster: bitmaps
checked bit by bit after writes at known offsets, resizes and reverts between
snapshots, data_destroy and the space it frees, and the lineage kept or refused."""

import base64
import json
import threading

import pytest
import rbd

from xcp_rbd import cbt, gc
from xcp_rbd.attached import open_sr
from xcp_rbd.xapi import PluginError

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 64 * KiB
OBJECT = 4 * MiB


def changed(xapi, sr, key, key2, offset=0, length=-1):
    """(bitmap length in bytes, set of the block numbers whose bit is set)."""
    result = xapi.volume("Volume.list_changed_blocks", sr=sr, key=key, key2=key2,
                         offset=offset, length=length)
    assert result["granularity"] == BLOCK
    bitmap = base64.b64decode(result["bitmap"])
    # bit n is block n, most significant bit of each byte first (bitstring.BitArray)
    return len(bitmap), {n for n in range(8 * len(bitmap)) if bitmap[n // 8] & (0x80 >> n % 8)}


def snapshot(xapi, sr_uuid, disk):
    """Volume.snapshot alone: no test here looks at the keys XAPI sets after it."""
    return xapi.vdi_snapshot(sr_uuid, disk["key"], xapi_keys=False)


def blocks(offset, length):
    return set(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))


def write(image_io, disk, writes):
    """Write (offset, length) extents; return the blocks they touch."""
    touched = set()
    for offset, length in writes:
        image_io.write(disk, offset, b"w" * length)
        touched |= blocks(offset, length)
    return touched


def filled_disk(xapi, sr_uuid, sr, image_io, size):
    """A CBT-enabled disk whose every RBD object holds data: RBD's diff is then exact
    to the byte (a write that grows an object reports from the object's old end)."""
    disk = xapi.vdi_create(sr_uuid, size, name="cbt disk")
    xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])
    image_io.write(disk, 0, b"f" * size)
    return disk


def data_destroy(xapi, sr, key):
    """XAPI's VDI.data_destroy: the plugin call, then the type it records."""
    xapi.volume("Volume.data_destroy", sr=sr, key=key)
    xapi.volume("Volume.set", sr=sr, key=key, k="vdi-type", v="cbt_metadata")


def rbd_snapshots(sr, volume):
    image = volume["uri"][0].split("?")[0].rsplit("/", 1)[1]
    with open_sr(sr) as attached:
        with attached.image(image, read_only=True) as opened:
            return {s["name"] for s in opened.list_snaps()
                    if s["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_USER}


def refused(call, *args, **kwargs):
    with pytest.raises(PluginError) as error:
        call(*args, **kwargs)
    return error.value.params


def test_feature_and_cbt_enabled_in_stat_and_ls(xapi, sr_uuid, sr):
    assert "VDI_CONFIG_CBT" in xapi.volume("Plugin.Query")["features"]
    disk = xapi.vdi_create(sr_uuid, 8 * MiB)
    assert disk["cbt_enabled"] is False
    xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])
    xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])  # idempotent
    assert xapi.volume("Volume.stat", sr=sr, key=disk["key"])["cbt_enabled"] is True
    snap = snapshot(xapi, sr_uuid, disk)
    assert snap["cbt_enabled"] is True  # taken while CBT was on: XAPI needs it there
    assert refused(xapi.volume, "Volume.enable_cbt", sr=sr, key=snap["key"])[0] == \
        "Not_supported"
    xapi.volume("Volume.disable_cbt", sr=sr, key=disk["key"])
    listed = {v["key"]: v for v in xapi.sr_scan(sr_uuid)}
    assert listed[disk["key"]]["cbt_enabled"] is False
    assert listed[snap["key"]]["cbt_enabled"] is True
    later = snapshot(xapi, sr_uuid, disk)
    assert later["cbt_enabled"] is False


def test_bitmap_bit_by_bit(xapi, sr_uuid, sr, image_io):
    size = 16 * MiB + 32 * KiB  # 257 blocks, the last one partial
    disk = filled_disk(xapi, sr_uuid, sr, image_io, size)
    first = snapshot(xapi, sr_uuid, disk)
    expected = write(image_io, disk, [
        (0, 1),                          # block 0
        (BLOCK - 1, 2),                  # straddles blocks 0 and 1
        (5 * BLOCK + 100, BLOCK),        # straddles 5 and 6
        (10 * BLOCK, BLOCK),             # exactly block 10
        (OBJECT - 10, 20),               # straddles an RBD object edge: 63 and 64
        (3 * OBJECT + 7 * BLOCK, 3 * BLOCK + 1),  # 199..202
        (size - 10, 10),                 # the final partial block, 256
    ])
    assert expected == {0, 1, 5, 6, 10, 63, 64, 199, 200, 201, 202, 256}
    second = snapshot(xapi, sr_uuid, disk)
    assert changed(xapi, sr, first["key"], second["key"]) == (33, expected)
    after = write(image_io, disk, [(100 * BLOCK + 5, 1)])
    assert changed(xapi, sr, first["key"], disk["key"]) == (33, expected | after)
    assert changed(xapi, sr, second["key"], disk["key"]) == (33, after)
    assert changed(xapi, sr, second["key"], second["key"]) == (33, set())
    # a window: bit n is block offset / 64 KiB + n; the final partial block counts
    assert changed(xapi, sr, first["key"], second["key"], OBJECT, 2 * BLOCK) == (1, {0})
    assert changed(xapi, sr, first["key"], second["key"], 256 * BLOCK) == (1, {0})
    assert changed(xapi, sr, first["key"], second["key"], 5 * BLOCK, BLOCK + 1) == \
        (1, {0, 1})
    assert changed(xapi, sr, first["key"], second["key"], 2 * size, -1) == (0, set())
    assert refused(changed, xapi, sr, first["key"], second["key"], 100)[0] == \
        "Invalid_parameters"
    assert refused(changed, xapi, sr, second["key"], first["key"])[0] == \
        "Invalid_parameters"  # older to newer only


def test_a_write_that_grows_an_object_reports_from_its_old_end(xapi, sr_uuid, sr, image_io):
    """On a thin disk, a write that grows an object that existed reports everything
    from the object's old end (RBD's own diff: at most the rest of the 4 MiB object);
    a write to an object that did not exist reports exactly what it wrote. Nothing
    written is ever missed."""
    disk = xapi.vdi_create(sr_uuid, 16 * MiB)
    xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])
    image_io.write(disk, 0, b"x" * BLOCK)
    before = snapshot(xapi, sr_uuid, disk)
    written = write(image_io, disk, [(OBJECT + 2 * MiB, 4 * KiB), (3 * BLOCK, 10)])
    after = snapshot(xapi, sr_uuid, disk)
    _, reported = changed(xapi, sr, before["key"], after["key"])
    assert written <= reported
    assert reported == blocks(OBJECT + 2 * MiB, 4 * KiB) | blocks(BLOCK, 2 * BLOCK + 10)


def test_bitmaps_are_exact_on_a_never_written_thin_disk(xapi, sr_uuid, sr, image_io):
    """First writes to a thin disk (objects that did not exist at the older snapshot),
    at the end of objects, across block and object edges, and in the live disk."""
    disk = xapi.vdi_create(sr_uuid, 32 * MiB)
    xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])
    empty = snapshot(xapi, sr_uuid, disk)
    written = write(image_io, disk, [
        (OBJECT - 4 * KiB, 4 * KiB),            # the end of object 0: block 63
        (OBJECT + 5 * BLOCK + 100, BLOCK),      # object 1: blocks 69 and 70
        (3 * OBJECT - 10, 20),                  # across objects 2 and 3: 191 and 192
        (2 * OBJECT + 30 * BLOCK, 1),           # object 2 again: 158
    ])
    assert written == {63, 69, 70, 191, 192, 158}
    first = snapshot(xapi, sr_uuid, disk)
    assert changed(xapi, sr, empty["key"], first["key"])[1] == written
    later = write(image_io, disk, [(21 * MiB + 7 * BLOCK, 3)])   # object 5: block 343
    assert later == {343}
    assert changed(xapi, sr, empty["key"], disk["key"])[1] == written | later
    assert changed(xapi, sr, first["key"], disk["key"])[1] == later
    # a window of the bitmap, from the middle of an object
    assert changed(xapi, sr, empty["key"], first["key"], OBJECT + 4 * BLOCK, 4 * BLOCK) \
        == (1, {1, 2})


def test_the_zero_chunk_checksum_is_crc32c_of_64_kib_of_zeros():
    from xcp_rbd.object_checksums import CHUNK, ZERO_CHUNK_CRC32C
    from xcp_rbd.cbt import GRANULARITY
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    crc = 0xFFFFFFFF
    for byte in bytes(CHUNK):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    assert crc == ZERO_CHUNK_CRC32C and CHUNK == GRANULARITY


def test_resize_between_snapshots(xapi, sr_uuid, sr, image_io):
    disk = filled_disk(xapi, sr_uuid, sr, image_io, 8 * MiB)
    small = snapshot(xapi, sr_uuid, disk)
    xapi.vdi_resize(sr_uuid, disk["key"], 20 * MiB)
    # the grown area counts where written (here at RBD object starts, so exactly)
    written = write(image_io, disk, [(5 * BLOCK, 1), (2 * OBJECT, 10),
                                     (3 * OBJECT, BLOCK + 1)])
    assert written == {5, 128, 192, 193}
    big = snapshot(xapi, sr_uuid, disk)
    assert changed(xapi, sr, small["key"], big["key"]) == (40, written)  # 20 MiB
    # a revert shrinks the disk back: blocks past its end are not in the target. (The
    # rollback rewrites the disk's objects, and RBD's diff reports them all: the
    # first backup after a revert copies the whole disk.)
    disk = xapi.snapshot_revert(sr_uuid, small["key"], disk["key"])
    reverted = snapshot(xapi, sr_uuid, disk)
    length, back = changed(xapi, sr, big["key"], reverted["key"])
    assert length == 40 and 5 in back and max(back) < 128
    # grown again: what the big snapshot had there is gone (reads zeros), so it counts
    xapi.vdi_resize(sr_uuid, disk["key"], 20 * MiB)
    regrown = snapshot(xapi, sr_uuid, disk)
    length, again = changed(xapi, sr, big["key"], regrown["key"])
    assert length == 40 and again - back == {128, 192, 193}
    # the same once the big snapshot's data is destroyed (stored, then carried on)
    data_destroy(xapi, sr, big["key"])
    assert big["key"] not in rbd_snapshots(sr, disk)
    assert changed(xapi, sr, big["key"], regrown["key"]) == (40, again)


def test_data_destroy_keeps_answering_and_frees_the_snapshot(xapi, sr_uuid, sr, image_io):
    """Xen Orchestra's cycle: snapshot, list changes from the previous one, copy them,
    data_destroy the new one, destroy the previous one."""
    disk = filled_disk(xapi, sr_uuid, sr, image_io, 16 * MiB)
    first = snapshot(xapi, sr_uuid, disk)
    a = write(image_io, disk, [(3 * BLOCK + 1, BLOCK)])
    data_destroy(xapi, sr, first["key"])
    # no later snapshot yet: its RBD snapshot stays, RBD answers
    assert first["key"] in rbd_snapshots(sr, disk)
    assert changed(xapi, sr, first["key"], disk["key"]) == (32, a)
    second = snapshot(xapi, sr_uuid, disk)
    # the next snapshot exists: the changes are stored, the RBD snapshot is gone
    assert first["key"] not in rbd_snapshots(sr, disk)
    stat = xapi.volume("Volume.stat", sr=sr, key=first["key"])
    assert stat["physical_utilisation"] == 0
    assert stat["keys"]["vdi-type"] == "cbt_metadata"
    from xcp_rbd.location import VolumeLocation
    assert VolumeLocation.parse(stat["uri"][0]).data_destroyed
    assert first["key"] in {v["key"] for v in xapi.sr_scan(sr_uuid)}
    assert changed(xapi, sr, first["key"], second["key"]) == (32, a)
    b = write(image_io, disk, [(OBJECT - 1, 2), (12 * MiB, 1)])
    assert changed(xapi, sr, first["key"], disk["key"]) == (32, a | b)
    data_destroy(xapi, sr, second["key"])
    third = snapshot(xapi, sr_uuid, disk)
    assert second["key"] not in rbd_snapshots(sr, disk)
    assert changed(xapi, sr, second["key"], third["key"]) == (32, b)
    assert changed(xapi, sr, first["key"], third["key"]) == (32, a | b)
    assert changed(xapi, sr, first["key"], second["key"]) == (32, a)
    xapi.vdi_destroy(sr_uuid, first["key"])
    assert changed(xapi, sr, second["key"], disk["key"]) == (32, b)
    # its data is gone: no clone of it (XAPI refuses to plug it, the uri says so too)
    assert refused(xapi.vdi_clone, sr_uuid, second["key"])[0] == "Volume_data_destroyed"
    assert rbd_snapshots(sr, disk) == {third["key"]}


def test_destroying_the_snapshot_stored_changes_lead_to(xapi, sr_uuid, sr, image_io):
    disk = filled_disk(xapi, sr_uuid, sr, image_io, 8 * MiB)
    first = snapshot(xapi, sr_uuid, disk)
    a = write(image_io, disk, [(BLOCK, 1)])
    middle = snapshot(xapi, sr_uuid, disk)
    data_destroy(xapi, sr, first["key"])  # stored up to `middle`
    b = write(image_io, disk, [(7 * MiB, 1)])
    last = snapshot(xapi, sr_uuid, disk)
    xapi.vdi_destroy(sr_uuid, middle["key"])  # carried on to `last`
    assert changed(xapi, sr, first["key"], last["key"]) == (16, a | b)
    c = write(image_io, disk, [(2 * MiB, 1)])
    assert changed(xapi, sr, first["key"], disk["key"]) == (16, a | b | c)
    # a stored one destroyed in the middle of a chain of them: carried on too
    data_destroy(xapi, sr, last["key"])
    newest = snapshot(xapi, sr_uuid, disk)
    xapi.vdi_destroy(sr_uuid, last["key"])
    assert changed(xapi, sr, first["key"], newest["key"]) == (16, a | b | c)
    # the snapshot after it destroyed before any later one: no longer known, said so
    xapi.vdi_destroy(sr_uuid, newest["key"])
    assert refused(changed, xapi, sr, first["key"], disk["key"])[0] == "VDI_NO_CBT_METADATA"


def test_disable_cbt_and_disk_destroy_free_waiting_snapshots(xapi, sr_uuid, sr, image_io):
    for end in ("disable", "destroy"):
        disk = filled_disk(xapi, sr_uuid, sr, image_io, 8 * MiB)
        snap = snapshot(xapi, sr_uuid, disk)
        data_destroy(xapi, sr, snap["key"])
        assert snap["key"] in rbd_snapshots(sr, disk)
        if end == "disable":
            xapi.volume("Volume.disable_cbt", sr=sr, key=disk["key"])
            assert snap["key"] not in rbd_snapshots(sr, disk)
            assert refused(changed, xapi, sr, snap["key"], disk["key"])[0] == \
                "VDI_NO_CBT_METADATA"
            # without CBT on the disk nothing waits for a later snapshot
            other = snapshot(xapi, sr_uuid, disk)
            data_destroy(xapi, sr, other["key"])
            assert other["key"] not in rbd_snapshots(sr, disk)
        else:
            xapi.vdi_destroy(sr_uuid, disk["key"])
            with open_sr(sr) as attached:
                gc.collect(attached, wait=120)
                assert disk["key"] not in attached.images()  # nothing left of its data
        assert xapi.volume("Volume.stat", sr=sr, key=snap["key"])["physical_utilisation"] == 0
        xapi.vdi_destroy(sr_uuid, snap["key"])


def test_clone_lineage_is_refused_clearly(xapi, sr_uuid, sr, image_io):
    disk = filled_disk(xapi, sr_uuid, sr, image_io, 8 * MiB)
    snap = snapshot(xapi, sr_uuid, disk)
    clone = xapi.vdi_clone(sr_uuid, snap["key"])  # its disk lives: a v2 clone
    assert refused(changed, xapi, sr, snap["key"], clone["key"])[0] == \
        "Source and target VDI are unrelated"


def test_crash_before_the_snapshot_is_removed(xapi, sr_uuid, sr, image_io, monkeypatch):
    """Killed between storing the changes and removing the RBD snapshot: the answer
    is the same, and the next call on the disk removes the snapshot."""
    disk = filled_disk(xapi, sr_uuid, sr, image_io, 8 * MiB)
    first = snapshot(xapi, sr_uuid, disk)
    a = write(image_io, disk, [(BLOCK, 1)])
    second = snapshot(xapi, sr_uuid, disk)

    def killed(*args):
        raise SystemExit("killed")
    monkeypatch.setattr(gc, "release_snapshot", killed)
    with pytest.raises(SystemExit):
        cbt.data_destroy("test", sr, first["key"])
    monkeypatch.undo()
    with open_sr(sr) as attached:
        record = json.loads(attached.index.read(prefix="v.")["v." + first["key"]])
    assert record["changed"]["to"] == second["key"]
    assert first["key"] in rbd_snapshots(sr, disk)
    assert changed(xapi, sr, first["key"], second["key"]) == (16, a)
    snapshot(xapi, sr_uuid, disk)
    assert first["key"] not in rbd_snapshots(sr, disk)
    assert changed(xapi, sr, first["key"], second["key"]) == (16, a)


def test_answers_stay_right_while_snapshots_come_and_go(xapi, sr_uuid, sr, image_io):
    """list_changed_blocks reads without the disk's lock: snapshots stored and removed
    meanwhile must not change its answer."""
    disk = filled_disk(xapi, sr_uuid, sr, image_io, 8 * MiB)
    base = snapshot(xapi, sr_uuid, disk)
    a = write(image_io, disk, [(BLOCK, 1), (6 * MiB, BLOCK)])
    data_destroy(xapi, sr, base["key"])
    answers, errors = [], []
    done = threading.Event()

    def backups():
        try:
            previous = snapshot(xapi, sr_uuid, disk)
            for _ in range(6):
                data_destroy(xapi, sr, previous["key"])
                newer = snapshot(xapi, sr_uuid, disk)
                xapi.vdi_destroy(sr_uuid, previous["key"])
                previous = newer
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=backups)
    thread.start()
    while not done.is_set():
        answers.append(changed(xapi, sr, base["key"], disk["key"]))
    thread.join()
    assert not errors
    assert answers and all(answer == (16, a) for answer in answers)
