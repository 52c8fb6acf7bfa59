"""`Sr`: an attached SR as every SR, Volume and collector call sees it.

Names: in the modules of command handlers (sr, volume, cbt, revert), `sr` is
always the SMAPIv3 `sr` string a handler gets, and the open Sr is `attached`; the
modules below them that never see the string (gc, flatten, health) call the open
Sr `sr`."""

import contextlib
import json
import time

import rbd

from xcp_rbd import bounds, cluster, errors, location, metadata
from xcp_rbd.metadata import SrIndex
from xcp_rbd.records import SR_RECORD, VolumeRecord, usage_field, volume_field


USAGE_REFRESH = 600  # seconds after which a cached usage is measured again


class Sr(object):
    """An SR on a connected cluster: its location, ioctx and index."""

    def __init__(self, where, connection, ioctx):
        self.location = where
        self.connection = connection
        self.ioctx = ioctx
        self.index = SrIndex(ioctx, where.sr_uuid)
        self.rbd = rbd.RBD()
        self._owns_namespace = None

    def record(self):
        """The SR record, or a clear error if the SR does not exist."""
        value = self.index.read_keys([SR_RECORD]).get(SR_RECORD)
        if value is None:
            raise errors.SrDoesNotExist(self.describe())
        return json.loads(value)

    def volume_record(self, key):
        """The VolumeRecord of volume `key` (VolumeDoesNotExist if there is none)."""
        value = self.index.read_keys([volume_field(key)]).get(volume_field(key))
        if value is None:
            raise errors.VolumeDoesNotExist(key)
        return VolumeRecord.load(key, value)

    def update_volume(self, key, change):
        """Replace volume `key`'s record with change(record), atomically; returns
        the new record, or None if there is none."""
        def apply(entries):
            field = volume_field(key)
            if field not in entries:
                return None
            record = change(VolumeRecord.load(key, entries[field]))
            entries[field] = record.dumps()
            return record
        return self.index.change([volume_field(key)], apply)

    def describe(self):
        return "SR %s in %s" % (self.location.sr_uuid, self.location.describe())

    def image_lock(self, name, lease=metadata.LOCK_LEASE):
        """The lock under which image `name` and the records on it change."""
        return self.index.lock("img." + name, what="disk image %s" % name, lease=lease,
                               wait=bounds.wait(self.location.cluster.timeout))

    def image(self, name, snapshot=None, read_only=False):
        return rbd.Image(self.ioctx, name, snapshot=snapshot, read_only=read_only)

    def allocated_bytes(self, name, snap=None):
        """Bytes image `name` (at snapshot `snap`) really has on the cluster, from
        its object map (fast-diff): object granularity, a few ms whatever the size."""
        total = [0]

        def count(offset, length, exists):
            if exists:
                total[0] += length
        with self.image(name, snapshot=snap, read_only=True) as image:
            image.diff_iterate(0, image.size(), None, count, include_parent=False,
                               whole_object=True)
        return total[0]

    def cache_usage(self, key, usage, cached=None):
        """Remember a volume's usage for SR.ls, with when it was measured."""
        if cached is None or cached.get("bytes") != usage or \
                time.time() - cached.get("at", 0) > USAGE_REFRESH:
            self.index.write({usage_field(key): metadata.dumps(
                {"bytes": usage, "at": int(time.time())})})

    def owns_namespace(self):
        """Whether the SR made its namespace for itself: then all in it is the SR's."""
        if self._owns_namespace is None:
            self._owns_namespace = bool(self.record().get("namespace_owned"))
        return self._owns_namespace

    def owns(self, image):
        """Whether an open image belongs to this SR: everything in a namespace the SR
        made for itself does; elsewhere only what carries the SR's back-pointer."""
        if self.owns_namespace():
            return True
        try:
            return image.metadata_get(metadata.META_SR) == self.location.sr_uuid
        except KeyError:
            return False

    def remains(self):
        """What of this SR is still in its namespace: in a namespace of its own,
        every directory and trash entry, openable or not (removing the namespace
        needs none left); elsewhere the images and trash entries that carry the
        SR's back-pointer."""
        if self.owns_namespace():
            names = [entry["name"] for entry in self.rbd.list2(self.ioctx)]
            trash = self.rbd.trash_list(self.ioctx)
        else:
            names = self.images()
            trash = [entry for entry in self.rbd.trash_list(self.ioctx)
                     if self.owns_trashed(entry["id"])]
        return names + ["%s (in the trash)" % entry["name"] for entry in trash]

    def owns_trashed(self, image_id):
        """Whether trash entry `image_id` is an image of this SR (see owns)."""
        if self.owns_namespace():
            return True  # without opening it: it may have no header left
        try:
            with rbd.Image(self.ioctx, image_id=image_id, read_only=True) as image:
                return self.owns(image)
        except rbd.ImageNotFound:
            return False

    def images(self):
        """Names of the RBD images of this SR's namespace that belong to it."""
        names = []
        for entry in self.rbd.list2(self.ioctx):
            try:
                with self.image(entry["name"], read_only=True) as image:
                    if self.owns(image):
                        names.append(entry["name"])
            except rbd.ImageNotFound:
                continue
        return names


@contextlib.contextmanager
def open_sr(sr):
    """Sr for the `sr` string of an attached SR."""
    where = location.SrLocation.parse(sr)
    with cluster.Connection(where.cluster) as connection:
        ioctx = connection.open_pool(where.pool, where.namespace)
        try:
            yield Sr(where, connection, ioctx)
        finally:
            ioctx.close()
