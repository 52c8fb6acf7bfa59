"""SR metadata on the cluster: one RADOS object per SR whose omap is the index.

The index of SR <uuid> (object `xcp_rbd.sr.<uuid>` in the SR's namespace) holds
fields (`<kind>.<owner>[.<more>]`: what they are and who writes them: records).
The fields are stored in at most BUCKETS omap values (see SrIndex), so that
`SR.ls` is one round trip whatever the number of volumes.
Object `xcp_rbd.srs` in the pool's default namespace maps every SR uuid of the
pool to its namespace, for SR.probe (a plain omap: see Omap).

Every change is one atomic omap write guarded by a compare-and-set on what it
read (ceph_client.OmapGuard), so concurrent scripts on any host never lose an update. Operations on one RBD image are
serialised by a cluster-side lock (cls_lock, with a lease so that a killed
script cannot block it for long).
"""

import binascii
import json
import os
import struct
import time

import rados

from xcp_rbd import bounds, ceph_client, errors, log

REGISTRY = "xcp_rbd.srs"
INDEX_PREFIX = "xcp_rbd.sr."
META_SR = "xcp_rbd.sr"  # image-meta back-pointer: the SR an image belongs to
LOCK_LEASE = 60  # seconds a lock outlives a killed holder
_OMAP_PAGE = 100000
BUCKETS = 256  # at most this many omap values per SR index, well under a reply's cap
_LOCK_RENEW = 1  # LIBRADOS_LOCK_FLAG_RENEW, not exported by the Python binding


def index_object(sr_uuid):
    return INDEX_PREFIX + sr_uuid


def dumps(record):
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


class Conflict(Exception):
    """An omap compare failed: someone changed the entry meanwhile."""


class Omap(object):
    """The omap of one object, read and written atomically, values as text."""

    def __init__(self, ioctx, name):
        self.ioctx = ioctx
        self.name = name

    def read(self, prefix=""):
        """Every omap entry (under prefix) as a dict of str -> str.

        OSDs cap a listing reply at osd_max_omap_entries_per_request (1024 by
        default) without saying so: only an empty page means the end, and a
        listing of N entries costs N/1024 + 1 round trips. Fine for small maps
        (the registry); the SR index (SrIndex) never lists."""
        entries = {}
        start = ""
        while True:
            with rados.ReadOpCtx() as op:
                values, _ = self.ioctx.get_omap_vals(op, start, prefix, _OMAP_PAGE)
                try:
                    self.ioctx.operate_read_op(op, self.name)
                except rados.ObjectNotFound:
                    return entries
                page = [(k, (v or b"").decode("utf-8")) for k, v in values]
            if not page:
                return entries
            entries.update(page)
            start = page[-1][0]

    def read_keys(self, keys):
        """The given keys that exist, in one round trip (reads by key are not capped)."""
        return self.read_for_update(keys)[0]

    def read_for_update(self, keys):
        """(the given keys that exist, the guard under which a write may change
        them: see write), in one round trip."""
        keys = tuple(keys)
        with rados.ReadOpCtx() as op:
            values, _ = self.ioctx.get_omap_vals_by_keys(op, keys)
            return ceph_client.read_guarded(
                self.ioctx, self.name, op, keys,
                lambda: {k: (v or b"").decode("utf-8") for k, v in values})

    def write(self, set_values=None, remove=(), guard=None, create=False):
        """One atomic update. With `guard` (from read_for_update), only if the keys
        read are unchanged (raise Conflict otherwise; rados.ObjectNotFound if the
        object is gone). Without `create`, an object that does not exist is made
        by an unguarded write."""
        with rados.WriteOpCtx() as op:
            if create:
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            if guard is not None:
                guard.apply(op)
            if set_values:
                items = sorted(set_values.items())
                self.ioctx.set_omap(op, tuple(k for k, _ in items),
                                    tuple(v.encode("utf-8") for _, v in items))
            if remove:
                self.ioctx.remove_omap_keys(op, tuple(remove))
            if not ceph_client.operate_guarded(self.ioctx, self.name, op):
                raise Conflict(self.name)

    def lock(self, name, what=None, wait=20.0, lease=LOCK_LEASE):
        return ClusterLock(self.ioctx, self.name, name, what or name, wait, lease)

    def remove(self):
        try:
            self.ioctx.remove_object(self.name)
        except rados.ObjectNotFound:
            pass


def bucket_of(field):
    """The omap key of the bucket holding index field `field`.

    A field is `<kind>.<owner>[.<more>]` (or a bare name): fields are hashed by
    owner, so that a volume's record, keys and usage share one bucket."""
    kind, _, rest = field.partition(".")
    owner = rest.partition(".")[0] if rest else kind
    return "b.%02x" % (binascii.crc32(owner.encode("utf-8")) % BUCKETS)


ALL_BUCKETS = tuple("b.%02x" % n for n in range(BUCKETS))


class SrIndex(object):
    """An SR's index: fields (see the module's docstring) kept in BUCKETS omap
    values, each a JSON object of the fields that hash to it.

    Reading the whole index is one read by key of at most BUCKETS values: one
    round trip however many volumes (a listing would be capped at 1024 entries
    per reply). A change is a read-modify-write of the buckets it touches, guarded
    by an omap compare on each, and retried when another script changed one of
    them meanwhile: atomic across buckets, and concurrent changes to different
    volumes never lose each other's updates."""

    def __init__(self, ioctx, sr_uuid):
        self.omap = Omap(ioctx, index_object(sr_uuid))

    def _read_buckets(self, buckets):
        """({bucket: raw value}, {field: value}, guard) of the given buckets."""
        raw, guard = self.omap.read_for_update(buckets)
        entries = {}
        for value in raw.values():
            entries.update(json.loads(value))
        return raw, entries, guard

    @staticmethod
    def _buckets(fields, prefixes=()):
        """The buckets holding `fields` and every field under `prefixes`: a prefix
        that names its owner entirely (`k.<key>.`) lies in one bucket, any other
        (`v.`) in all of them."""
        if any(not prefix.partition(".")[2].count(".") for prefix in prefixes):
            return ALL_BUCKETS
        return sorted(set(bucket_of(f) for f in fields) |
                      set(bucket_of(p) for p in prefixes))

    def read(self, prefix=""):
        """Every field (under prefix) as a dict of str -> str, in one round trip."""
        entries = self._read_buckets(self._buckets((), (prefix,)))[1]
        return {f: v for f, v in entries.items() if f.startswith(prefix)}

    def read_keys(self, fields, prefix=None):
        """The given fields, and every field under prefix if one is given, in one
        round trip."""
        entries = self._read_buckets(self._buckets(fields, (prefix,) if prefix else ()))[1]
        wanted = set(fields)
        return {f: v for f, v in entries.items()
                if f in wanted or (prefix and f.startswith(prefix))}

    def change(self, fields, change, prefixes=()):
        """Apply change(entries) -> result to the fields of the buckets holding
        `fields` and `prefixes` (a dict it edits in place), atomically; returns
        the result. It may run more than once (if another script raced it)."""
        buckets = self._buckets(fields, prefixes)
        retry = bounds.Retry(bounds.CHANGE_RETRY)
        while True:
            raw, entries, guard = self._read_buckets(buckets)
            result = change(entries)
            grouped = {bucket: {} for bucket in buckets}
            for field, value in entries.items():
                # (a KeyError here: change() set a field in a bucket it did not name)
                grouped[bucket_of(field)][field] = value
            new = {b: dumps(v) for b, v in grouped.items() if v}
            if new == raw:
                return result
            try:
                self.omap.write({b: v for b, v in new.items() if raw.get(b) != v},
                                remove=[b for b in raw if b not in new],
                                guard=guard)
                return result
            except Conflict:
                if not retry.again():
                    raise errors.Busy("the SR index %s changed constantly for %d s: try again"
                        % (self.omap.name, retry.seconds))
            except rados.ObjectNotFound:
                raise errors.SrDoesNotExist("the index %s of this SR is gone (was the SR "
                                            "destroyed?)" % self.omap.name)

    def write(self, set_values=None, remove=(), remove_prefixes=()):
        """Set and remove fields, and every field under remove_prefixes, atomically."""
        set_values = set_values or {}

        def change(entries):
            for field in [f for f in entries if f.startswith(tuple(remove_prefixes))]:
                del entries[field]
            for field in remove:
                entries.pop(field, None)
            entries.update(set_values)
        self.change(list(set_values) + list(remove), change, remove_prefixes)

    def update(self, field, change):
        """Read-modify-write the JSON record `field` with change(record) -> record.

        Returns the new record, or None if the field does not exist."""
        def apply(entries):
            if field not in entries:
                return None
            record = change(json.loads(entries[field]))
            entries[field] = dumps(record)
            return record
        return self.change([field], apply)

    def create(self, set_values):
        """Make the index of a new SR with its first fields."""
        grouped = {}
        for field, value in set_values.items():
            grouped.setdefault(bucket_of(field), {})[field] = value
        self.omap.write({b: dumps(v) for b, v in grouped.items()}, create=True)

    def lock(self, name, what=None, wait=20.0, lease=LOCK_LEASE):
        return self.omap.lock(name, what, wait, lease)

    def lock_names(self):
        """The names of the locks whose xattrs the index object carries."""
        try:
            return [name[len("lock."):] for name, _ in
                    self.omap.ioctx.get_xattrs(self.omap.name) if name.startswith("lock.")]
        except rados.ObjectNotFound:
            return []

    def remove(self):
        self.omap.remove()


class ClusterLock(object):
    """An exclusive cls_lock on an object, held for one operation, from any host.

    The lease (LOCK_LEASE) bounds how long a killed holder blocks others."""

    def __init__(self, ioctx, obj, name, what, wait, lease):
        self.ioctx = ioctx
        self.obj = obj
        self.name = name
        self.what = what
        self.wait = wait
        self.lease = lease
        self.cookie = "%s:%d:%s" % (os.uname()[1], os.getpid(), new_key()[:8])

    def try_acquire(self):
        try:
            with ceph_client.serialised():
                self.ioctx.lock_exclusive(self.obj, self.name, self.cookie,
                                          desc=self.cookie, duration=self.lease)
            return True
        except (rados.ObjectBusy, rados.ObjectExists):
            return False

    def renew(self):
        with ceph_client.serialised():
            self.ioctx.lock_exclusive(self.obj, self.name, self.cookie, desc=self.cookie,
                                      duration=self.lease, flags=_LOCK_RENEW)

    def __enter__(self):
        retry = bounds.Retry(self.wait)
        while not self.try_acquire():
            if not retry.again():
                raise errors.Busy("%s is busy with another operation (from any host) for "
                    "more than %d s: try again" % (self.what, self.wait))
        return self

    def is_held(self):
        """Whether anyone holds the lock now, read without writing: the lock's
        xattr (cls_lock's lock_info_t) lists its lockers, each with an expiry."""
        try:
            info = self.ioctx.get_xattr(self.obj, "lock." + self.name)
        except (rados.ObjectNotFound, rados.NoData):
            return False
        # lock_info_t: header (6 bytes), u32 locker count, then the first locker's
        # locker_id_t (header, entity_name_t of 9 bytes, u32-sized cookie) and
        # locker_info_t (header, utime_t expiry: u32 seconds, u32 nanoseconds).
        if len(info) < 10 or struct.unpack_from("<I", info, 6)[0] == 0:
            return False
        cookie_length = struct.unpack_from("<I", info, 10 + 6 + 9)[0]
        expiry = struct.unpack_from("<I", info, 10 + 6 + 9 + 4 + cookie_length + 6)[0]
        return expiry == 0 or expiry > time.time()

    def release(self):
        try:
            with ceph_client.serialised():
                self.ioctx.unlock(self.obj, self.name, self.cookie)
        except (rados.ObjectNotFound, rados.Error) as exc:
            log.warning("releasing lock %s on %s: %s", self.name, self.obj, exc)

    def forget(self):
        """Release a lock just acquired by removing its xattr, which cls_lock's
        unlock keeps for good (empty): the collector's clean-up of unused ones.
        Safe only right after try_acquire: held exclusively, with a fresh lease,
        nobody else can hold it in between."""
        try:
            with ceph_client.serialised():
                self.ioctx.rm_xattr(self.obj, "lock." + self.name)
        except (rados.ObjectNotFound, rados.Error) as exc:
            log.warning("removing lock %s on %s: %s", self.name, self.obj, exc)

    def __exit__(self, *exc):
        self.release()


def new_key():
    """A fresh UUID4 string. (Not the uuid module: its imports cost every call.)"""
    data = bytearray(os.urandom(16))
    data[6] = (data[6] & 0x0F) | 0x40  # version 4
    data[8] = (data[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = binascii.hexlify(bytes(data)).decode("ascii")
    return "-".join((text[:8], text[8:12], text[12:16], text[16:20], text[20:]))


def now():
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())
