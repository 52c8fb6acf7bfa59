"""Volume.* commands: VDIs as RBD images, snapshots and clones.

Data model (records: see records):
- a writable volume is an RBD image (named by the key it was created for);
- a snapshot volume is an RBD user snapshot of its disk's image, named by its key;
- a clone is an RBD clone v2 of a snapshot (no protection, no copy).

Every change to an image and to the records that point at it is made under
that image's cluster lock, so concurrent scripts on any host see one order.
Ceph objects are created before the record that makes them visible, and records
are removed before the objects: a crash leaves the old state, the new one, or
an unreferenced image or snapshot that the collector (gc) removes.
Nothing here copies data or costs time that grows with the data written.
"""

import json
import time

import rbd

from xcp_rbd import bounds, cbt, errors, flatten, gc, metadata, revert
from xcp_rbd.attached import USAGE_REFRESH, open_sr
from xcp_rbd.records import (KEYS, USAGE, VolumeRecord, key_prefix, owner, usage_field,
                             volume_field, volumes)

FEATURES = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
            | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF
            | rbd.RBD_FEATURE_DEEP_FLATTEN)
SECTOR = 512
CREATE_LOCK_LEASE = 15  # a killed create blocks the collector this long at most
TAG_RETRY = 5.0  # seconds a new image's first open is tried again (see _tag_image)


def _volumes_with_keys(entries):
    """Index entries -> {key: (record, keys, cached usage)} for every volume."""
    custom = {}
    usage = {}
    for field, value in entries.items():
        if field.startswith(KEYS):
            key = owner(field)
            custom.setdefault(key, {})[field[len(key_prefix(key)):]] = value
        elif field.startswith(USAGE):
            usage[owner(field)] = json.loads(value)
    return {key: (record, custom.get(key, {}), usage.get(key, {}))
            for key, record in volumes(entries).items()}


def _read_with_keys(attached, key):
    """(record, keys, cached usage) of volume `key`, in one read."""
    entries = attached.index.read_keys([volume_field(key), usage_field(key)], key_prefix(key))
    found = _volumes_with_keys(entries).get(key)
    if found is None:
        raise errors.VolumeDoesNotExist(key)
    return found


def view(attached, key, record, keys, usage):
    """The IDL volume of a record."""
    return {
        "key": key, "uuid": record.uuid, "name": record.name,
        "description": record.description, "read_write": record.read_write,
        "sharable": record.sharable, "virtual_size": record.size,
        "physical_utilisation": usage,
        "uri": [attached.location.volume_uri(record.image, record.snap, record.data_destroyed)],
        "keys": keys, "cbt_enabled": record.cbt,
    }


def views(attached, entries):
    return [view(attached, key, record, keys, usage.get("bytes", 0))
            for key, (record, keys, usage) in sorted(_volumes_with_keys(entries).items())]


def _tag_image(attached, name):
    """Give the new image `name` the SR's back-pointer. A new clone's open reads its
    ancestors, and fails with ENOENT when an ancestor's background flatten ends
    meanwhile (that ancestor's parent snapshot goes; seen with Nautilus' librbd, in
    a chain of clones): it is opened again once the flatten is over."""
    retry = bounds.Retry(TAG_RETRY)
    while True:
        try:
            with attached.image(name) as image:
                image.metadata_set(metadata.META_SR, attached.location.sr_uuid)
            return
        except rbd.ImageNotFound:
            if not retry.again():
                raise errors.Busy(
                    "the new image %s could not be opened for %d s (a background flatten "
                    "of one of its ancestors did not end): try again" % (name, TAG_RETRY))


def create(dbg, sr, name, description, size, sharable):
    if size < 0:
        raise errors.VdiInvalidSize("a disk cannot have %d bytes" % size)
    size = -(-size // SECTOR) * SECTOR
    with open_sr(sr) as attached:
        attached.record()
        key = metadata.new_key()
        record = VolumeRecord.new(key, {"name": name, "description": description,
                                        "sharable": sharable}, key, None, size)
        with attached.image_lock(key, lease=CREATE_LOCK_LEASE):
            attached.rbd.create(attached.ioctx, key, size, old_format=False,
                                features=FEATURES)
            _tag_image(attached, key)
            attached.index.write({volume_field(key): record.dumps()})
        return view(attached, key, record, {}, 0)


def snapshot(dbg, sr, key):
    with open_sr(sr) as attached:
        record = attached.volume_record(key)
        if not record.read_write:
            raise errors.NotSupported("volume %s is a snapshot: snapshot its disk instead" % key)
        new = metadata.new_key()
        with attached.image_lock(record.image):
            flatten.wait_for_flatten(attached, record.image)
            with _open(attached, key, record.image) as image:
                image.create_snap(new)
                size = image.size()
            snap_record = VolumeRecord.new(new, record, record.image, new, size,
                                           cbt=record.cbt)
            attached.index.write({volume_field(new): snap_record.dumps()})
            cbt.after_snapshot(attached, record)
        return view(attached, new, snap_record, {}, 0)


def _open(attached, key, image, snapshot=None, read_only=False):
    try:
        return attached.image(image, snapshot=snapshot, read_only=read_only)
    except rbd.ImageNotFound:
        raise errors.VolumeDoesNotExist(key)


TMP_SNAP_PREFIX = "xcp_rbd.clone."


def clone(dbg, sr, key):
    with open_sr(sr) as attached:
        record = attached.volume_record(key)
        cbt.check_readable(key, record)
        new = metadata.new_key()
        with attached.image_lock(record.image):
            flatten.wait_for_flatten(attached, record.image)
            adopted = None if record.read_write else revert.adopt(attached, key, record, new)
            clone_record = adopted or _clone_image(attached, key, record, new)
        if clone_record.depth > attached.location.max_chain_depth:
            gc.start(attached)
        return view(attached, new, clone_record, {}, 0)


def _clone_image(attached, key, record, new):
    """An RBD clone v2 of volume `key` for the new volume `new`; returns its record.
    The caller holds the lock of the volume's image."""
    if not record.read_write:
        parent_snap = record.snap
    else:
        # A clone needs a snapshot: a temporary one, removed at once (clone v2
        # keeps it in the trash namespace for as long as the clone needs it).
        parent_snap = TMP_SNAP_PREFIX + new
        with _open(attached, key, record.image) as image:
            image.create_snap(parent_snap)
    with attached.image_lock(new, lease=CREATE_LOCK_LEASE):
        attached.rbd.clone(attached.ioctx, record.image, parent_snap,
                           attached.ioctx, new, features=FEATURES)
        _tag_image(attached, new)
        depth = flatten.chain_depth(attached, new)
        clone_record = VolumeRecord.new(new, record, new, None, record.size, depth=depth)
        changes = {volume_field(new): clone_record.dumps()}
        if depth > attached.location.max_chain_depth:
            changes.update(flatten.job(new, depth))
        attached.index.write(changes)
    if record.read_write:
        with attached.image(record.image) as image:
            image.remove_snap(parent_snap)
    return clone_record


def destroy(dbg, sr, key):
    """Succeeds on a disk with snapshots, a snapshot with clones, and a key
    already destroyed; what Ceph cannot delete yet is left to the collector."""
    with open_sr(sr) as attached:
        try:
            record = attached.volume_record(key)
        except errors.VolumeDoesNotExist:
            return None
        with attached.image_lock(record.image):
            cbt.before_destroy(attached, key, record)
            attached.index.write(
                remove=[volume_field(key), usage_field(key)],
                remove_prefixes=[key_prefix(key)])
            if record.read_write:
                gc.release_image(attached, record.image)
            else:
                gc.release_snapshot(attached, record.image, record.snap)
        gc.start(attached)
    return None


def _change_record(sr, key, **changes):
    with open_sr(sr) as attached:
        if attached.update_volume(key, lambda record: record.replace(**changes)) is None:
            raise errors.VolumeDoesNotExist(key)


def set_name(dbg, sr, key, new_name):
    _change_record(sr, key, name=new_name)


def set_description(dbg, sr, key, new_description):
    _change_record(sr, key, description=new_description)


def _write_keys(sr, key, set_values=None, remove=()):
    """Change keys of an existing volume (atomically checked to exist)."""
    def change(entries):
        if volume_field(key) not in entries:
            raise errors.VolumeDoesNotExist(key)
        for field in remove:
            entries.pop(field, None)
        entries.update(set_values or {})
    with open_sr(sr) as attached:
        attached.index.change([volume_field(key)], change)


def set_key(dbg, sr, key, k, v):
    return _write_keys(sr, key, set_values={key_prefix(key) + k: v})


def unset_key(dbg, sr, key, k):
    return _write_keys(sr, key, remove=[key_prefix(key) + k])


def resize(dbg, sr, key, new_size):
    with open_sr(sr) as attached:
        record = attached.volume_record(key)
        if not record.read_write:
            raise errors.NotSupported("volume %s is a snapshot: a snapshot cannot be "
                                      "resized, its disk can" % key)
        new_size = -(-new_size // SECTOR) * SECTOR
        if new_size < record.size:
            raise errors.VdiInvalidSize(
                "shrinking not allowed: volume %s has %d bytes, asked for %d"
                % (key, record.size, new_size))
        with attached.image_lock(record.image):
            with _open(attached, key, record.image) as image:
                image.resize(new_size)
            attached.update_volume(key, lambda current: current.replace(size=new_size))


def stat(dbg, sr, key):
    """The volume as the index has it, with the usage measured last (one read of
    one bucket: XAPI runs this before every datapath call, inside a migration's
    downtime too). A usage missing or older than USAGE_REFRESH starts the
    collector, which measures it in the background."""
    with open_sr(sr) as attached:
        record, keys, cached = _read_with_keys(attached, key)
        if record.data_freed:
            usage = 0
        else:
            usage = cached.get("bytes", 0)
            if time.time() - cached.get("at", 0) > USAGE_REFRESH:
                gc.start(attached)
        return view(attached, key, record, keys, usage)
