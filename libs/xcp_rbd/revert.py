"""Reverting a disk to one of its snapshots, both ways xapi asks for it.

- Native (`Volume.revert`, xapi 26.16 and later, feature VDI_REVERT): the disk
  keeps its key, keys and CBT and takes the snapshot's content in place: an RBD
  rollback of its own image to that snapshot. Every snapshot of the disk is kept.
  Older xapi builds drop the unknown feature name when they read Plugin.Query
  (xen-api `ocaml/xapi/smint.ml` `Feature.string_int64_of_string_opt`: "unknown
  feature", never stored), so declaring it harms no 8.3 build.
- By adoption (every 8.3 xapi): xapi destroys the disk, then clones the snapshot;
  the clone adopts the destroyed disk's image (see `adopt`), so no chain grows.

A rollback is one RADOS op per object present, OSD-side (no data crosses the
network), never run while the image is open (a VM's writes would mix with it) or
while it is being flattened (see flatten.wait_for_flatten).
"""

from xcp_rbd import cbt, errors, flatten, log
from xcp_rbd.attached import open_sr
from xcp_rbd.records import (VOLUME, VolumeRecord, key_prefix, references, usage_field,
                             volume_field)

ROLLBACK_OPS = 64


def revert(dbg, sr, snapshot, key):
    """Volume.revert: volume `key` takes the content of its snapshot `snapshot`."""
    with open_sr(sr) as attached:
        name = attached.volume_record(key).image
        with attached.image_lock(name):
            snap = attached.volume_record(snapshot)   # as they are under the lock
            disk = attached.volume_record(key)
            _check(snapshot, snap, key, disk)
            flatten.wait_for_flatten(attached, name)
            if _watchers(attached, name):
                raise errors.VolumeInUse(
                    "disk %s is open (a running VM, or a host that did not deactivate it: "
                    "watchers %s): shut the VM down, then revert"
                    % (key, ", ".join(_watchers(attached, name))))
            size = _rollback(attached, name, snap.snap)
            attached.index.write({volume_field(key): disk.replace(size=size).dumps()},
                                 remove=[usage_field(key)])  # measured anew
        log.info("reverted volume %s to its snapshot %s in place", key, snapshot)


def _check(snapshot, snap, key, disk):
    if snap.read_write:
        raise errors.NotSupported("volume %s is a disk, not a snapshot: "
                               "only a snapshot can be reverted to" % snapshot)
    if not disk.read_write:
        raise errors.NotSupported("volume %s is a snapshot: only a disk can "
                               "be reverted" % key)
    cbt.check_readable(snapshot, snap)
    if snap.image != disk.image:
        raise errors.NotSupported("snapshot %s is not a snapshot of disk %s's own RBD image (%s, "
            "not %s: the disk was made by a clone-based revert): revert it the clone-based "
            "way (xcp-rbd-xapi snapshot-revert)" % (snapshot, key, snap.image, disk.image))


def _watchers(attached, name):
    with attached.image(name, read_only=True) as image:  # a read-only open adds no watcher
        return sorted(watcher["addr"] for watcher in image.watchers_list())


def _rollback(attached, name, snap):
    """Roll image `name` back to snapshot `snap`; returns its size (the snapshot's)."""
    # One RADOS op per object present; let librbd keep more of them in flight than
    # its default of 10: this runs inside xapi's revert, and each op is small.
    attached.connection.rados.conf_set("rbd_concurrent_management_ops", str(ROLLBACK_OPS))
    with attached.image(name) as image:
        image.rollback_to_snap(snap)
        return image.size()


def adopt(attached, key, record, new):
    """Clone of snapshot `key` of a zombie image: the image itself becomes the clone.

    The destroyed disk's image is rolled back to the snapshot and re-keyed to
    the new volume; the other snapshots of the image now belong to it. No
    chain grows, snapshot history is kept, and the cost is one rollback.
    Returns the new record, or None where adopting is not safe. The caller
    holds the image's lock."""
    live, snapshots = references(attached.index.read(prefix=VOLUME))
    name = record.image
    if name in live or _watchers(attached, name):
        return None  # a disk has it, or it is open somewhere (a stale VM)
    size = _rollback(attached, name, record.snap)
    adopted = VolumeRecord.new(new, record, name, None, size, cbt=record.cbt)
    # XAPI re-points the siblings' snapshot_of to the new disk in its own DB only:
    # do it here too, or the next scan would drop the lineage.
    lineage = {key_prefix(snap) + "snapshot_of": new for snap in snapshots.get(name, ())}
    lineage[volume_field(new)] = adopted.dumps()
    attached.index.write(lineage)
    log.info("adopted image %s (snapshot %s) as volume %s", name, key, new)
    return adopted
