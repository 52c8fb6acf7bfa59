"""Changed block tracking: Volume.enable_cbt, disable_cbt, list_changed_blocks and
data_destroy, for backup tools (Xen Orchestra) that copy only what changed.

RBD already knows what changed between two snapshots of an image (diff-iterate,
answered from the object map where fast-diff is on), so CBT keeps no log of its
own: the changed blocks of two snapshots of one image are RBD's diff, rounded
to XAPI's 64 KiB blocks. RBD's diff is byte-exact inside data an object
already had; a write that grows an object (its first write, or one past its
end, and a clone's copy-up) reports everything from the object's old end, at
most the rest of that 4 MiB object, and a revert (rollback) reports every
object it rewrote. Nothing written is ever missed.

The one thing RBD cannot do is diff from a snapshot it no longer has, which is
what data_destroy asks for. So a data-destroyed snapshot keeps its RBD snapshot
until a later snapshot of the disk exists, then its changes up to the next
snapshot that still has its data are stored in its record and its RBD snapshot
is removed; if none can follow any more (CBT disabled, disk destroyed), it is
removed at once. Fields of volume records (records.VolumeRecord) this module sets:
  cbt             a disk: CBT enabled; a snapshot: taken while it was (both are
                  reported as cbt_enabled)
  data_destroyed  a snapshot whose data XAPI destroyed: it may not be read again
  snap_id         its RBD snapshot id: its place among the image's snapshots
                  once that snapshot is gone
  changed         once its RBD snapshot is removed: {"to": the key of the next
                  snapshot that still had its data, "bitmap": the blocks written
                  from this snapshot to that one (zlib, base64)}; "to" is null when
                  no snapshot can follow any more (CBT disabled, disk destroyed).
list_changed_blocks(A, B) is then the union of the stored changes from A along
"to" and RBD's diff from the first snapshot reached that still has its data.

Everything happens under the image's lock, the record before the RBD snapshot
is removed: a crash leaves a stored record whose snapshot still exists, which
the next call on that image removes. list_changed_blocks reads without the
lock (a diff can take seconds) and starts again if a snapshot it was reading
is removed meanwhile: the records it then reads carry the stored changes.
"""

import base64
import zlib

import rbd

from xcp_rbd import bounds, ceph_client, errors, gc, log, protocol
from xcp_rbd.attached import open_sr
from xcp_rbd.records import VOLUME, volumes

GRANULARITY = 64 << 10  # XAPI's CBT block ("Compare two VDIs in 64k block increments")
# The bitmap is built 64 GiB of disk at a time: one byte per block in memory (1 MiB),
# whatever the size of the disk.
_CHUNK = 1 << 36
# Changed objects closer than this are diffed in one call: listing a few unchanged
# objects costs less than a call (measured: ~0.1 ms an object, ~0.5 ms a call).
_MERGE_GAP = 4 << 22
_ATTEMPTS = 3
# bit order within a byte reversed: XAPI wants block 8j at the MSB of byte j
_REVERSED = bytes(int("{:08b}".format(i)[::-1], 2) for i in range(256))
_USER = rbd.RBD_SNAP_NAMESPACE_TYPE_USER
_HEAD = float("inf")  # a writable volume comes after all its snapshots


def enable_cbt(dbg, sr, key):
    _set_cbt(sr, key, True)


def disable_cbt(dbg, sr, key):
    _set_cbt(sr, key, False)


def _set_cbt(sr, key, enabled):
    with open_sr(sr) as attached:
        record = attached.volume_record(key)
        if not record.read_write:
            raise errors.NotSupported("volume %s is a snapshot: CBT is enabled on its disk, "
                "and snapshots taken while it is have it too" % key)
        with attached.image_lock(record.image):
            if attached.update_volume(key, lambda current: current.replace(cbt=enabled)) \
                    is None:
                raise errors.VolumeDoesNotExist(key)
            if not enabled:
                # A new backup set starts with a full backup (XAPI's rule): no
                # snapshot will be compared with a later one any more.
                release_destroyed(attached, record.image)


def data_destroy(dbg, sr, key):
    with open_sr(sr) as attached:
        record = attached.volume_record(key)
        if record.read_write:
            raise errors.NotSupported("volume %s is a disk: only a snapshot's data can be "
                "destroyed" % key)
        name = record.image
        with attached.image_lock(name):
            if not record.data_destroyed:
                try:
                    with attached.image(name, read_only=True) as image:
                        snap_id = ceph_client.snap_id(image, record.snap)
                except rbd.ImageNotFound:
                    raise errors.VolumeDoesNotExist(key)
                if attached.update_volume(key, lambda current: current.replace(
                        data_destroyed=True, snap_id=snap_id)) is None:
                    raise errors.VolumeDoesNotExist(key)
            release_destroyed(attached, name)


def list_changed_blocks(dbg, sr, key, key2, offset, length):
    """Bit n: the 64 KiB block at offset + n * 64 KiB was written from key to key2.

    length -1 is up to the end of the larger volume; offset is a multiple of
    64 KiB (the bitmap's blocks are the disk's, as the stored changes are)."""
    if offset < 0 or offset % GRANULARITY or length < -1:
        raise errors.InvalidParameters(
            "offset must be a multiple of %d and length -1 (to the "
            "end) or positive, not offset %d length %d" % (GRANULARITY, offset, length))
    with open_sr(sr) as attached:
        for attempt in range(_ATTEMPTS):
            try:
                bits, count = _compare(attached, key, key2, offset, length)
                break
            except rbd.ImageNotFound:
                if attempt == _ATTEMPTS - 1:
                    raise errors.Busy(
                        "a snapshot of %s or %s was missing or removed %d times "
                        "while it was read: try again" % (key, key2, _ATTEMPTS))
    return {"granularity": GRANULARITY,
            "bitmap": base64.b64encode(_encode(bits, count)).decode("ascii")}


def after_snapshot(attached, disk):
    """Volume.snapshot took a snapshot of `disk` (the caller holds its image's lock):
    the data-destroyed snapshots before it can go. Only a disk with CBT on has
    such snapshots waiting, so the others pay nothing."""
    if disk.cbt:
        release_destroyed(attached, disk.image)


def release_destroyed(attached, name, ending=None):
    """Free what data-destroyed snapshots of image `name` no longer need (the caller
    holds the image's lock): each one that a later snapshot follows gets its
    changes up to the next snapshot with data stored, then loses its RBD snapshot.
    `ending`: no snapshot can follow any more, so those without one lose theirs
    too; by default, when the image has no disk with CBT on (none would be
    compared with a later one: XAPI starts a new backup set with a full copy)."""
    records = _volumes(attached, name)
    if ending is None:
        ending = not any(record.cbt for record in records.values() if record.read_write)
    records = {key: record for key, record in records.items() if not record.read_write}
    if not any(record.data_destroyed for record in records.values()):
        return
    ids = _snap_ids(attached, name)
    with_data = sorted((ids[record.snap], key) for key, record in records.items()
                       if record.snap in ids and not record.data_freed)
    for snap_id, key in with_data:
        record = records[key]
        if not record.data_destroyed:
            continue
        later = [other for other_id, other in with_data if other_id > snap_id]
        if later:
            changed = {"to": later[0],
                       "bitmap": _store(_interval(attached, name, record, records[later[0]]))}
        elif ending:
            changed = {"to": None}
        else:
            continue
        attached.update_volume(key, lambda current: current.replace(changed=changed))
        records[key] = record.replace(changed=changed)
    for key, record in sorted(records.items()):
        if record.data_freed and record.snap in ids:
            gc.release_snapshot(attached, name, record.snap)
            attached.cache_usage(key, 0)


def before_destroy(attached, key, record):
    """Volume.destroy is about to remove volume `key` (the caller holds its image's
    lock). A disk: no snapshot can follow its data-destroyed ones any more. A
    snapshot that stored changes lead to: carry them on to the snapshot after it,
    so that older snapshots can still be compared with later ones."""
    name = record.image
    if record.read_write:
        release_destroyed(attached, name, ending=True)
        return
    records = _volumes(attached, name)
    record = records.get(key, record)  # as it is now, under the lock
    before = [other for other, r in sorted(records.items())
              if r.data_freed and r.changed["to"] == key]
    if not before:
        return
    if record.data_freed:
        through = record.changed["to"]
        bits = _bitmap_of(record.changed)
    else:
        ids = _snap_ids(attached, name)
        later = sorted((ids[r.snap], other) for other, r in records.items()
                       if r.snap in ids and not r.data_freed
                       and ids[r.snap] > ids.get(record.snap, _HEAD))
        if not later:
            return  # nothing follows yet: what came before ends here (said when asked)
        through = later[0][1]
        bits = _interval(attached, name, record, records[through])
    for other in before:
        attached.update_volume(other, lambda current: current.replace(changed={
            "to": through, "bitmap": _store(_bitmap_of(current.changed) | bits)}))


def check_readable(key, record):
    """Refuse to clone a snapshot whose data was destroyed."""
    if record.data_destroyed:
        raise errors.VolumeDataDestroyed("the data of snapshot %s was destroyed (data_destroy): "
            "only its changed-block tracking metadata is left" % key)


def _compare(attached, key, key2, start, length):
    """(bits, count): the changed blocks from key to key2 in the window starting at
    byte `start`, as an int whose bit n is the window's block n."""
    every = volumes(attached.index.read(prefix=VOLUME))
    for k in (key, key2):
        if k not in every:
            raise errors.VolumeDoesNotExist(k)
    source, target = every[key], every[key2]
    name = source.image
    if target.image != name:
        raise errors.UnrelatedVolumes("%s and %s are not snapshots of one RBD "
            "image (a clone of a snapshot whose disk still existed): their changed blocks "
            "cannot be listed exactly, take a full backup" % (key, key2))
    size = max(source.size, target.size)
    end = size if length == -1 else min(size, start + length)
    count = max(0, -(-(end - start) // GRANULARITY))
    if key == key2 or count == 0:
        return 0, count
    records = {k: record for k, record in every.items() if record.image == name}
    ids = _snap_ids(attached, name)
    target_at = _position(key2, target, ids)
    if _position(key, source, ids) > target_at:
        raise errors.InvalidParameters(
            "%s is older than %s: list the blocks changed from the "
            "older volume to the newer one" % (key2, key))
    bits = 0
    current = key
    while records[current].data_freed:
        bits |= _bitmap_of(records[current].changed)
        following = records[current].changed["to"]
        if following == key2:
            return _window(bits, start, count, target.size), count
        if following not in records:
            raise errors.NoCbtMetadata(
                "the changes after snapshot %s are no longer known "
                "(CBT was disabled, or its disk or the snapshot after it destroyed, before "
                "a later snapshot was taken): take a full backup" % current)
        if _position(following, records[following], ids) > target_at:
            raise errors.NoCbtMetadata(
                "the data of %s was destroyed and the changes "
                "around it are only known from %s to %s" % (key2, current, following))
        current = following
    if target.data_freed:
        raise errors.NoCbtMetadata("the data of %s was destroyed: compare %s with a later "
            "snapshot" % (key2, key))
    bits |= _rbd_changed(attached, name, records[current].snap, target, start,
                         min(end, target.size))
    return _window(bits, start, count, target.size), count


def _window(bits, start, count, target_size):
    """The window's blocks, none past the end of the target (a disk that shrank by a
    revert): blocks it does not have cannot be read from it."""
    first = start // GRANULARITY
    inside = min(count, max(0, -(-target_size // GRANULARITY) - first))
    return (bits >> first) & ((1 << inside) - 1)


def _interval(attached, name, source, target):
    """What to store for snapshot `source` before its RBD snapshot goes: the blocks
    RBD reports changed up to `target`, and those `source` had data in past the end
    of `target` (a revert shrank the disk: if it grows back, they read as zeros,
    which RBD's diff from `source` would report)."""
    bits = _rbd_changed(attached, name, source.snap, target, 0, target.size)
    if source.size > target.size:
        bits |= _rbd_changed(attached, name, None, source, target.size, source.size)
    return bits


def _rbd_changed(attached, name, from_snap, target, start, end):
    """RBD's changed blocks in bytes [start, end) of image `name`, from snapshot
    from_snap (None: from nothing, what has data) to `target` (a record: the
    snapshot it names, or the head), as an int whose bit n is the disk's block n."""
    bits = 0
    with attached.image(name, snapshot=target.snap, read_only=True) as image:
        trusted = _object_map_limit(image, from_snap, target.snap)
        info = image.stat()
        object_size = info["obj_size"]
        ends = {}  # object number -> where RBD's last extent in it ends, in the object
        for chunk in range(start - start % GRANULARITY, end, _CHUNK):
            stop = min(end, chunk + _CHUNK)
            marks = bytearray(-(-(stop - chunk) // (8 * GRANULARITY)) * 8)

            def mark(offset, length, exists):
                first = max(0, (offset - chunk) // GRANULARITY)
                last = min(len(marks), -(-(offset + length - chunk) // GRANULARITY))
                marks[first:last] = b"\x01" * (last - first)
                number = (offset + length - 1) // object_size
                ends[number] = max(ends.get(number, 0), offset + length - number * object_size)
            for run_start, run_end in _runs(image, from_snap, max(chunk, start), stop,
                                            trusted):
                # include_parent (the default) only matters from nothing: a clone has
                # its parent's data. From a snapshot librbd compares the image's own
                # objects: a clone's parent cannot change between two of its snapshots.
                image.diff_iterate(run_start, run_end - run_start, from_snap, mark)
            bits |= _pack(marks) << (chunk // GRANULARITY)
            protocol.arm_watchdog(bounds.call(attached.location.cluster.timeout),
                                  "%s did not answer a diff" % attached.location.cluster.describe())
        return _without_unwritten(attached, name, image, info, from_snap, target.snap, bits,
                                  ends, start, min(end, trusted))


def _without_unwritten(attached, name, image, info, from_snap, to_snap, bits, ends, start, end):
    """`bits` without the blocks of [start, end) that RBD reports only because their
    object is new: RBD reports an object that did not exist at from_snap from its
    start to its end (`ends`: where its reported extents end, its size then), so a
    thin disk's first write at the end of an object marks all of it. Where the
    object was zeros at from_snap for sure (absent, in an image without a parent),
    its blocks that read as zeros now did not change: the OSDs tell by checksums
    (object_checksums), no data is read. On any failure, `bits` as it is (a larger
    bitmap is never wrong, only slower to back up)."""
    if end <= start or not ends or _has_parent(image):
        return bits
    per_object = info["obj_size"] // GRANULARITY
    existed = set()
    if from_snap is not None:
        with attached.image(name, snapshot=from_snap, read_only=True) as before:
            if _has_parent(before):
                return bits
            ceph_client.object_diff(before, 0, before.size(), None, lambda offset, length,
                                    exists: exists and existed.add(offset // info["obj_size"]))
    new = {"%s.%016x" % (info["block_name_prefix"], number): number
           for number in ends if number not in existed
           and start < (number + 1) * info["obj_size"] and number * info["obj_size"] < end}
    if not new:
        return bits
    from xcp_rbd import object_checksums  # ctypes: only diffs with new objects pay
    where = attached.location
    try:
        with object_checksums.ObjectChecksums(where.cluster, where.pool,
                                              where.namespace) as checksums:
            zeros = checksums.zero_chunks(
                {object_name: ends[number] - ends[number] % GRANULARITY
                 for object_name, number in new.items()},
                ceph_client.snap_id(image, to_snap) if to_snap is not None else None)
    except object_checksums.ChecksumError as exc:
        log.warning("changed blocks of %s: the OSDs' checksums failed (%s): reporting "
                    "new objects whole", name, exc)
        return bits
    for object_name, chunks in zeros.items():
        for chunk in chunks:
            block = new[object_name] * per_object + chunk
            if start <= block * GRANULARITY < end:
                bits &= ~(1 << block)
    return bits


def _has_parent(image):
    try:
        image.parent_id()
        return True
    except rbd.ImageNotFound:
        return False


def _object_map_limit(image, from_snap, to_snap):
    """Up to which byte the object map's diff can be trusted: 0 without a valid
    fast-diff map, and not past the size of a snapshot taken between the two
    (Pacific's object-map diff misses objects that a smaller snapshot in between
    cut off and that the disk then grew over again; the byte diff does not)."""
    if not image.features() & rbd.RBD_FEATURE_FAST_DIFF or \
            image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID:
        return 0
    snaps = list(image.list_snaps())  # every namespace: a clone's trashed ones count
    ids = {snap["name"]: snap["id"] for snap in snaps
           if snap.get("namespace", _USER) == _USER}
    if from_snap is not None and from_snap not in ids:
        raise rbd.ImageNotFound("snapshot %s was removed" % from_snap)
    first, last = ids.get(from_snap, -1), ids.get(to_snap, _HEAD)
    return min([snap["size"] for snap in snaps if first < snap["id"] < last],
               default=_HEAD)


def _runs(image, from_snap, start, end, trusted):
    """Where the object map says objects changed (no object is read), as merged byte
    ranges, and all of [start, end) past `trusted`."""
    runs = []

    def add(offset, length, exists):
        if runs and offset - runs[-1][1] <= _MERGE_GAP:
            runs[-1][1] = offset + length
        else:
            runs.append([offset, offset + length])
    if trusted > start:
        ceph_client.object_diff(image, start, min(end, trusted) - start, from_snap, add)
    if end > trusted:
        runs.append([max(start, trusted), end])
    return runs


def _pack(marks):
    """An int with bit n set where marks[n] is 1 (len(marks) a multiple of 8)."""
    bits = 0
    for k in range(8):  # byte j of marks[k::8] is block 8j + k
        bits |= int.from_bytes(marks[k::8], "little") << k
    return bits


def _encode(bits, count):
    """XAPI's bitmap: `count` blocks, block n in byte n // 8, most significant bit first."""
    return bits.to_bytes((count + 7) // 8, "little").translate(_REVERSED)


def _store(bits):
    data = _encode(bits, bits.bit_length())
    return base64.b64encode(zlib.compress(data)).decode("ascii")


def _bitmap_of(changed):
    if not changed.get("bitmap"):
        return 0
    data = zlib.decompress(base64.b64decode(changed["bitmap"]))
    return int.from_bytes(data.translate(_REVERSED), "little")


def _volumes(attached, name):
    """{key: record} of the volumes of image `name`: its snapshots and its disk."""
    return {key: record for key, record in volumes(attached.index.read(prefix=VOLUME)).items()
            if record.image == name}


def _snap_ids(attached, name):
    """{name: id} of the user snapshots of image `name` ({} once the image is gone)."""
    try:
        with attached.image(name, read_only=True) as image:
            return {snap["name"]: snap["id"] for snap in image.list_snaps()
                    if snap.get("namespace", _USER) == _USER}
    except rbd.ImageNotFound:
        return {}


def _position(key, record, ids):
    """Where a volume is in its image's history: its RBD snapshot id (kept in the
    record once the snapshot is gone); the head after every snapshot."""
    if record.read_write:
        return _HEAD
    if record.snap in ids:
        return ids[record.snap]
    if record.snap_id is not None and record.data_freed:
        return record.snap_id
    raise rbd.ImageNotFound("snapshot %s is being removed" % key)
