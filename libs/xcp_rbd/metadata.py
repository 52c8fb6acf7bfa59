"""SR metadata on the cluster: one RADOS object per SR whose omap is the index.

Object `xcp_rbd.sr.<sr uuid>` (in the SR's namespace) holds:
  sr             {"uuid", "name", "description", "namespace_owned", ...}
  v.<key>        a volume record: {"uuid", "name", "description", "image",
                 "snap" (null for a writable volume), "read_write", "sharable",
                 "size", "created"}
  k.<key>.<k>    the value of key <k> set with Volume.set
  u.<key>        cached usage {"bytes", "at"} (see volume usage)
and anything else a module documents where it owns it (the collector's jobs).
Object `xcp_rbd.srs` in the pool's default namespace maps every SR uuid of the
pool to its namespace, for SR.probe.

Every change is one atomic omap write; a read-modify-write of a record is
guarded by an omap compare, so concurrent scripts on any host never lose an
update. Operations on one RBD image are serialised by a cluster-side lock
(cls_lock, with a lease so that a killed script cannot block it for long).
`SR.ls` is a single omap read whatever the number of volumes.
"""

import binascii
import json
import os
import time

import rados

from xcp_rbd import log, protocol

REGISTRY = "xcp_rbd.srs"
INDEX_PREFIX = "xcp_rbd.sr."
SR_RECORD = "sr"
META_SR = "xcp_rbd.sr"  # image-meta back-pointer: the SR an image belongs to
LOCK_LEASE = 60  # seconds a lock outlives a killed holder
_OMAP_PAGE = 100000
_ECANCELED = 125
_LOCK_RENEW = 1  # LIBRADOS_LOCK_FLAG_RENEW, not exported by the Python binding


def index_object(sr_uuid):
    return INDEX_PREFIX + sr_uuid


def volume_field(key):
    return "v." + key


def key_prefix(key):
    return "k.%s." % key


def usage_field(key):
    return "u." + key


def dumps(record):
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


class Conflict(Exception):
    """An omap compare failed: someone changed the record meanwhile."""


class Index(object):
    """The omap of one object, read and written atomically."""

    def __init__(self, ioctx, name):
        self.ioctx = ioctx
        self.name = name

    def read(self, prefix=""):
        """Every omap entry (under prefix) as a dict of str -> str.

        OSDs cap a listing reply at osd_max_omap_entries_per_request (1024 by
        default) without saying so: only an empty page means the end, and a
        listing of N entries costs N/1024 + 1 round trips. (Splitting the key
        space into many listings of one read op was measured 3 times slower with
        2 000 volumes: each listing runs past its slice.)"""
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

    def read_keys(self, fields, prefix=None):
        """The given fields, and every entry under prefix if one is given, in one
        round trip. (No prefix means no listing: librados would take "" for "all".)"""
        with rados.ReadOpCtx() as op:
            by_keys, _ = self.ioctx.get_omap_vals_by_keys(op, tuple(fields))
            by_prefix = ()
            if prefix:
                by_prefix, _ = self.ioctx.get_omap_vals(op, "", prefix, _OMAP_PAGE)
            try:
                self.ioctx.operate_read_op(op, self.name)
            except rados.ObjectNotFound:
                return {}
            entries = {k: (v or b"").decode("utf-8") for k, v in by_keys}
            entries.update((k, (v or b"").decode("utf-8")) for k, v in by_prefix)
        return entries

    def write(self, set_values=None, remove=(), remove_prefixes=(), expect=None):
        """One atomic update. `expect` maps fields to the value they must still
        have (raise Conflict otherwise)."""
        with rados.WriteOpCtx() as op:
            for field, value in (expect or {}).items():
                op.omap_cmp(field, value, rados.LIBRADOS_CMPXATTR_OP_EQ)
            if set_values:
                items = sorted(set_values.items())
                self.ioctx.set_omap(op, tuple(k for k, _ in items),
                                    tuple(v.encode("utf-8") for _, v in items))
            if remove:
                self.ioctx.remove_omap_keys(op, tuple(remove))
            for prefix in remove_prefixes:
                # every key starting with prefix: [prefix, prefix with its last byte + 1)
                self.ioctx.remove_omap_range2(op, prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))
            try:
                self.ioctx.operate_write_op(op, self.name)
            except rados.OSError as exc:
                if getattr(exc, "errno", None) == _ECANCELED:
                    raise Conflict(self.name)
                raise

    def update(self, field, change, deadline=10.0):
        """Read-modify-write the JSON record `field` with change(record) -> record.

        Returns the new record, or None if the field does not exist."""
        stop = time.time() + deadline
        while True:
            old = self.read_keys([field]).get(field)
            if old is None:
                return None
            record = change(json.loads(old))
            try:
                self.write({field: dumps(record)}, expect={field: old})
                return record
            except Conflict:
                if time.time() > stop:
                    raise protocol.failure(
                        "Busy", "%s changed constantly for %d s: try again" % (field, deadline))
                time.sleep(jitter(0.005, 0.05))

    def lock(self, name, what=None, wait=20.0, lease=LOCK_LEASE):
        return ClusterLock(self.ioctx, self.name, name, what or name, wait, lease)

    def remove(self):
        try:
            self.ioctx.remove_object(self.name)
        except rados.ObjectNotFound:
            pass


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
            self.ioctx.lock_exclusive(self.obj, self.name, self.cookie,
                                      desc=self.cookie, duration=self.lease)
            return True
        except (rados.ObjectBusy, rados.ObjectExists):
            return False

    def renew(self):
        self.ioctx.lock_exclusive(self.obj, self.name, self.cookie, desc=self.cookie,
                                  duration=self.lease, flags=_LOCK_RENEW)

    def __enter__(self):
        stop = time.time() + self.wait
        delay = 0.005
        while not self.try_acquire():
            if time.time() > stop:
                raise protocol.failure(
                    "Busy", "%s is busy with another operation (from any host) for "
                    "more than %d s: try again" % (self.what, self.wait))
            time.sleep(jitter(delay / 2, delay))
            delay = min(delay * 2, 0.2)
        return self

    def release(self):
        try:
            self.ioctx.unlock(self.obj, self.name, self.cookie)
        except (rados.ObjectNotFound, rados.Error) as exc:
            log.warning("releasing lock %s on %s: %s", self.name, self.obj, exc)

    def __exit__(self, *exc):
        self.release()


def new_key():
    """A fresh UUID4 string. (Not the uuid module: its imports cost every call.)"""
    data = bytearray(os.urandom(16))
    data[6] = (data[6] & 0x0F) | 0x40  # version 4
    data[8] = (data[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = binascii.hexlify(bytes(data)).decode("ascii")
    return "-".join((text[:8], text[8:12], text[12:16], text[16:20], text[20:]))


def jitter(low, high):
    """A random pause length in [low, high], to spread retries of racing scripts."""
    return low + (high - low) * (int(binascii.hexlify(os.urandom(2)), 16) / 65535.0)


def now():
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())
