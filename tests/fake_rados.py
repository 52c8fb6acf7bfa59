"""An in-memory RADOS for the unit layer: the part of librados that the library
uses (metadata's Omap, SrIndex and ClusterLock, ceph_client's guarded reads and
writes, the datapath's activation record), behaving as the OSD does.

Modelled on ceph-csi's fake (internal/util/reftracker/radoswrapper/fakerados.go):
objects with an omap, xattrs and a version; operations built on op objects and
applied all or nothing. What it keeps of the OSD, because the library relies on it:

- Versions: every write takes the next number of one counter, as a PG's writes do
  (a removed and remade object never gets an old version back; an absent one is
  at 0); `get_last_version` is the version its ioctx's last operation saw.
- Compare-and-set: `omap_cmp` (an absent key compares as empty) fails with
  ECANCELED, `assert_version` with ERANGE (the object is newer) or EOVERFLOW
  (older). A write op's steps apply in order, on the object as the earlier ones
  left it.
- Omap listings stop at `omap_page` entries a reply (osd_max_omap_entries_per_request)
  without saying so; reads by key are not capped.
- cls_lock: exclusive locks held by (client, cookie) with a lease, renewal (flag 1),
  expired lockers dropped when the lock is next changed, and the `lock.<name>`
  xattr that holds lock_info_t byte for byte as cls_lock encodes it (which
  ClusterLock.is_held parses); unlock leaves it, with no locker.
- Errors are the binding's own classes, picked by errno as its make_ex does; the
  argument types the older (Nautilus) binding insists on are insisted on.

The binding's op objects are C types whose steps no Python code can read back, so
`install` puts FakeReadOp and FakeWriteOp in place of rados.ReadOpCtx and
rados.WriteOpCtx for the test. It also gives the test the clock (FakeClock as
time.time and time.sleep: leases expire and retries run out at once) and picks
ceph_client's compare-and-set path, so that both bindings' paths run on either.

For tests: several clients (`connect`: each its own entity and address), faults
(`fail`: the next operations that match a predicate fail with an errno; `before`:
a hook runs first, e.g. a concurrent change between a guarded read and its write),
the monitors' blocklist, and the operations served per object. Single-threaded:
tests interleave clients with hooks, not threads.
"""

import collections
import errno
import os
import socket
import struct
import time

import rados

from xcp_rbd import ceph_client

OMAP_PAGE = 1024  # osd_max_omap_entries_per_request, by default
LOCK_RENEW = 1  # LIBRADOS_LOCK_FLAG_RENEW
_CMP_EQ = 1  # LIBRADOS_CMPXATTR_OP_EQ, which only bindings with omap_cmp export
_CLIENT_ENTITY = 8  # CEPH_ENTITY_TYPE_CLIENT
# entity_addr_t::TYPE_LEGACY: what a Pacific OSD writes for a client (whose own
# address, as Rados.get_addrs gives it, is TYPE_ANY): test_metadata.py compares.
_ADDRESS_OF_A_CLIENT = 1
_EXCLUSIVE_LOCK = 1  # ClsLockType LOCK_EXCLUSIVE

# The binding's make_ex: errno -> exception class (the last three: Pacific's only).
_EXCEPTIONS = {
    errno.EPERM: rados.PermissionError,
    errno.ENOENT: rados.ObjectNotFound,
    errno.EIO: rados.IOError,
    errno.ENOSPC: rados.NoSpace,
    errno.EEXIST: rados.ObjectExists,
    errno.EBUSY: rados.ObjectBusy,
    errno.ENODATA: rados.NoData,
    errno.EINTR: rados.InterruptedOrTimeoutError,
    errno.ETIMEDOUT: rados.TimedOut,
    errno.EACCES: rados.PermissionDeniedError,
    errno.EINVAL: rados.InvalidArgumentError,
    errno.EINPROGRESS: getattr(rados, "InProgress", rados.OSError),
    errno.EISCONN: getattr(rados, "IsConnected", rados.OSError),
    errno.ENOTCONN: getattr(rados, "NotConnected", rados.OSError),
}


def rados_error(err, message):
    """The exception the binding raises where librados returns -err."""
    return _EXCEPTIONS.get(err, rados.OSError)(message, errno=err)


class _Refused(Exception):
    """An OSD's answer -errno to one step; the ioctx turns it into the binding's error."""

    def __init__(self, err):
        super(_Refused, self).__init__(err)
        self.errno = err


def install(monkeypatch, omap_cmp=None):
    """A FakeCluster in the cluster's place for one test: its op classes as the
    binding's, its clock as time.time and time.sleep; ceph_client compares by
    omap_cmp or by version as `omap_cmp` says (None: as this binding does)."""
    if omap_cmp is None:
        omap_cmp = ceph_client._HAS_OMAP_CMP
    monkeypatch.setattr(ceph_client, "_HAS_OMAP_CMP", omap_cmp)
    monkeypatch.setattr(rados, "ReadOpCtx", FakeReadOp)
    monkeypatch.setattr(rados, "WriteOpCtx",
                        FakeWriteOpWithOmapCmp if omap_cmp else FakeWriteOp)
    if omap_cmp:  # on a binding without omap_cmp, as one with it would have
        monkeypatch.setattr(rados, "LIBRADOS_CMPXATTR_OP_EQ", _CMP_EQ, raising=False)
    cluster = FakeCluster()
    monkeypatch.setattr(time, "time", cluster.clock.time)
    monkeypatch.setattr(time, "sleep", cluster.clock.sleep)
    return cluster


class FakeClock(object):
    """The time of the cluster and of every host: it moves when slept on or told to.
    It starts on a date (cls_lock's expiries are u32 seconds since the epoch)."""

    def __init__(self, now=1.7e9):
        self.now = now

    def time(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds

    sleep = advance  # what time.sleep becomes


# What a rule's predicate sees of a call: the ioctx method, its object, the FakeIoctx
# that made it, and whether it writes.
Call = collections.namedtuple("Call", "method oid ioctx writes")


def any_call(call):
    return True


def writes_to(oid, by=None):
    """A predicate of calls: a write to object `oid` (a write op, a lock call, a
    removal...), from ioctx `by` if given."""
    return lambda call: call.writes and call.oid == oid and (by is None or call.ioctx is by)


class _Rule(object):
    def __init__(self, when, times, action):
        self.when = when
        self.times = times
        self.action = action


class FakeCluster(object):
    """The OSDs and monitors: every pool's objects, the clock, the blocklist."""

    def __init__(self, pools=("rbd",), omap_page=OMAP_PAGE):
        self.clock = FakeClock()
        self.pools = set(pools)
        self.omap_page = omap_page
        self.objects = {}  # (pool, namespace, oid) -> FakeObject
        self.blocklist = set()  # client addresses
        self.served = collections.Counter()  # oid -> operations served on it
        self._last_version = 0
        self._clients = 0
        self._rules = []
        self._in_hook = False

    def connect(self, address=None, instance_id=None):
        """A new client (rados.Rados, connected): client.<instance_id> at `address`."""
        self._clients += 1
        return FakeRados(self, instance_id or 4100 + self._clients,
                         address or "127.0.0.1:0/%d" % (3000000 + self._clients))

    def fail(self, err, when=any_call, times=1):
        """The next `times` calls that match when(call) (times=None: all of them)
        fail with errno `err`, not applied."""
        def refuse(call):
            raise rados_error(err, "%s(%s): injected: %s" % (call.method, call.oid,
                                                              os.strerror(err)))
        self._rules.append(_Rule(when, times, refuse))

    def before(self, hook, when=any_call, times=1):
        """hook() runs before each of the next `times` calls that match when(call)
        (times=None: every one). The hook's own calls meet no rule."""
        self._rules.append(_Rule(when, times, lambda call: hook()))

    def _apply_rules(self, call):
        if self._in_hook:
            return
        for rule in [r for r in self._rules if r.when(call)]:
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    self._rules.remove(rule)
            self._in_hook = True
            try:
                rule.action(call)
            finally:
                self._in_hook = False

    def serve(self, ioctx, method, oid, writes, apply):
        """One call, all or nothing: apply(a copy of the object, or None if there is
        none) -> (result, the object as it is to be, or None for none)."""
        self._apply_rules(Call(method, oid, ioctx, writes))
        if ioctx.rados.address in self.blocklist:
            raise rados_error(errno.ESHUTDOWN, "%s(%s): client %s is blocklisted"
                              % (method, oid, ioctx.rados.address))
        self.served[oid] += 1
        key = (ioctx.pool, ioctx.namespace, oid)
        current = self.objects.get(key)
        try:
            result, new = apply(current.copy() if current else None)
        except _Refused as refused:
            raise rados_error(refused.errno, "%s(%s): %s" % (method, oid,
                                                             os.strerror(refused.errno)))
        if writes:
            self._store(key, new)
        ioctx.last_version = new.version if new else 0
        return result

    def _store(self, key, new):
        if new is None:
            self.objects.pop(key, None)
            return
        self._last_version += 1
        new.version = self._last_version
        new.mtime = self.clock.time()
        self.objects[key] = new


class FakeObject(object):
    def __init__(self):
        self.omap = {}  # str -> bytes
        self.xattrs = {}  # str -> bytes, or a LockXattr for cls_lock's
        self.version = 0
        self.mtime = 0.0

    def copy(self):
        """A copy to change (its values are never changed in place)."""
        other = FakeObject()
        other.omap = dict(self.omap)
        other.xattrs = dict(self.xattrs)
        other.version = self.version
        other.mtime = self.mtime
        return other


def _existing(obj):
    if obj is None:
        raise _Refused(errno.ENOENT)
    return obj


class FakeRados(object):
    """A connected client (rados.Rados): its ioctxs, its blocklisting."""

    def __init__(self, cluster, instance_id, address):
        self.cluster = cluster
        self.instance_id = instance_id
        self.address = address

    def open_ioctx(self, pool):
        if pool not in self.cluster.pools:
            raise rados_error(errno.ENOENT, "error opening pool '%s'" % pool)
        return FakeIoctx(self, pool)

    def _blocklist_add(self, client_address, expire_seconds=0):
        self.cluster.blocklist.add(client_address)

    # by the name this binding gives it (ceph_client.blocklist looks for either)
    if hasattr(rados.Rados, "blocklist_add"):
        blocklist_add = _blocklist_add
    else:
        blacklist_add = _blocklist_add


class _Op(object):
    """An op object: the steps that ioctx calls add to it, run when it is operated."""

    def __init__(self):
        self.steps = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeReadOp(_Op):
    """rados.ReadOpCtx."""


class FakeWriteOp(_Op):
    """rados.WriteOpCtx of a binding without omap_cmp (Nautilus, Octopus)."""

    def new(self, exclusive=None):
        def create(obj):
            if obj is not None and exclusive == rados.LIBRADOS_CREATE_EXCLUSIVE:
                raise _Refused(errno.EEXIST)
            return obj or FakeObject()
        self.steps.append(create)

    def assert_version(self, version):
        def compare(obj):
            current = obj.version if obj else 0
            if version < current:
                raise _Refused(errno.ERANGE)
            if version > current:
                raise _Refused(errno.EOVERFLOW)
            return obj
        self.steps.append(compare)


class FakeWriteOpWithOmapCmp(FakeWriteOp):
    """rados.WriteOpCtx of a binding with omap_cmp (16.2.11 and later)."""

    def omap_cmp(self, key, val, cmp_op=_CMP_EQ):
        if cmp_op != _CMP_EQ:
            raise NotImplementedError("the fake compares for equality only")

        def compare(obj):
            if _existing(obj).omap.get(key, b"") != val.encode("utf-8"):
                raise _Refused(errno.ECANCELED)
            return obj
        self.steps.append(compare)


class _OmapReply(object):
    """What an omap read step gives back (the binding's OmapIterator): its
    (key, value) pairs, once its op has been operated."""

    def __init__(self):
        self._pairs = None

    def fill(self, pairs):
        self._pairs = iter(pairs)

    def __iter__(self):
        return self

    def __next__(self):
        if self._pairs is None:
            raise RuntimeError("an omap reply read before its op was operated")
        return next(self._pairs)


def _require_tuple(value, name):
    """The older binding takes only tuples here (`@requires(('keys', tuple))`)."""
    if not isinstance(value, tuple):
        raise TypeError("%s must be tuple" % name)


class FakeIoctx(object):
    """rados.Ioctx: one client's handle on one pool and namespace."""

    def __init__(self, client, pool):
        self.rados = client
        self.pool = pool
        self.namespace = ""
        self.last_version = 0

    def set_namespace(self, namespace):
        self.namespace = namespace

    def get_namespace(self):
        return self.namespace

    def close(self):
        pass

    def get_last_version(self):
        return self.last_version

    def _read(self, method, oid, apply):
        return self.rados.cluster.serve(self, method, oid, False, apply)

    def _write(self, method, oid, apply):
        return self.rados.cluster.serve(self, method, oid, True, apply)

    # The steps of op objects

    def get_omap_vals(self, read_op, start_after, filter_prefix, max_return):
        reply = _OmapReply()
        limit = min(max_return, self.rados.cluster.omap_page)

        def page(obj):
            keys = sorted(k for k in obj.omap
                          if k > start_after and k.startswith(filter_prefix))
            reply.fill([(k, obj.omap[k]) for k in keys[:limit]])
        read_op.steps.append(page)
        return reply, 0

    def get_omap_vals_by_keys(self, read_op, keys):
        _require_tuple(keys, "keys")
        reply = _OmapReply()
        read_op.steps.append(lambda obj: reply.fill(
            [(k, obj.omap[k]) for k in sorted(set(keys)) if k in obj.omap]))
        return reply, 0

    def set_omap(self, write_op, keys, values):
        _require_tuple(keys, "keys")
        _require_tuple(values, "values")
        if not all(isinstance(v, bytes) for v in values):
            raise TypeError("values must be bytes")

        def put(obj):
            obj = obj or FakeObject()
            obj.omap.update(zip(keys, values))
            return obj
        write_op.steps.append(put)

    def remove_omap_keys(self, write_op, keys):
        _require_tuple(keys, "keys")

        def remove(obj):
            _existing(obj)
            for key in keys:
                obj.omap.pop(key, None)
            return obj
        write_op.steps.append(remove)

    def operate_read_op(self, read_op, oid, flag=0):
        def run(obj):
            _existing(obj)
            for step in read_op.steps:
                step(obj)
            return None, obj
        self._read("operate_read_op", oid, run)

    def operate_write_op(self, write_op, oid, mtime=0, flags=0):
        def run(obj):
            for step in write_op.steps:
                obj = step(obj)
            return None, obj
        self._write("operate_write_op", oid, run)

    # Whole-object calls

    def stat(self, key):
        def size_and_mtime(obj):
            return (0, time.localtime(_existing(obj).mtime)), obj
        return self._read("stat", key, size_and_mtime)

    def remove_object(self, key):
        def remove(obj):
            _existing(obj)
            return True, None
        return self._write("remove_object", key, remove)

    def get_xattr(self, key, xattr_name):
        def value(obj):
            found = _existing(obj).xattrs.get(xattr_name)
            if found is None:
                raise _Refused(errno.ENODATA)
            return bytes(found), obj
        return self._read("get_xattr", key, value)

    def get_xattrs(self, oid):
        def pairs(obj):
            return iter(sorted((n, bytes(v)) for n, v in _existing(obj).xattrs.items())), obj
        return self._read("get_xattrs", oid, pairs)

    def rm_xattr(self, key, xattr_name):
        def remove(obj):  # an absent xattr is no error
            _existing(obj).xattrs.pop(xattr_name, None)
            return True, obj
        return self._write("rm_xattr", key, remove)

    # cls_lock's lock and unlock, as rados_lock_exclusive and rados_unlock call them

    def lock_exclusive(self, key, name, cookie, desc="", duration=None, flags=0):
        locker = (self.rados.instance_id, cookie)

        def lock(obj):
            obj = obj or FakeObject()
            lockers = _live_lockers(obj, name, self.rados.cluster.clock.time())
            if locker in lockers and not flags & LOCK_RENEW:
                raise _Refused(errno.EEXIST)
            lockers.pop(locker, None)
            if lockers:
                raise _Refused(errno.EBUSY)
            expiry = self.rados.cluster.clock.time() + duration if duration else 0
            lockers[locker] = (expiry, self.rados.address, desc)
            obj.xattrs["lock." + name] = LockXattr(lockers)
            return None, obj
        self._write("lock_exclusive", key, lock)

    def unlock(self, key, name, cookie):
        locker = (self.rados.instance_id, cookie)

        def unlock(obj):
            lockers = _live_lockers(_existing(obj), name, self.rados.cluster.clock.time())
            if lockers.pop(locker, None) is None:
                raise _Refused(errno.ENOENT)
            obj.xattrs["lock." + name] = LockXattr(lockers)
            return None, obj
        self._write("unlock", key, unlock)


def _live_lockers(obj, name, now):
    """cls_lock's read_lock: the lockers of lock `name` whose lease has not run out."""
    xattr = obj.xattrs.get("lock." + name)
    if xattr is None:
        return {}
    if not isinstance(xattr, LockXattr):
        raise _Refused(errno.EIO)  # cls_lock could not decode it
    return {locker: info for locker, info in xattr.lockers.items()
            if not info[0] or info[0] >= now}


class LockXattr(object):
    """The `lock.<name>` xattr, kept decoded: {(client instance id, cookie):
    (expiry or 0, address, description)}. bytes() gives it as cls_lock writes it."""

    def __init__(self, lockers):
        self.lockers = lockers

    def __bytes__(self):
        """lock_info_t, encoded for a client with Nautilus' features (MSG_ADDR2)."""
        body = struct.pack("<I", len(self.lockers))
        for (client, cookie), (expiry, address, description) in sorted(self.lockers.items()):
            body += _versioned(struct.pack("<BQ", _CLIENT_ENTITY, client) + _string(cookie))
            body += _versioned(_utime(expiry) + _entity_addr(address) + _string(description))
        return _versioned(body + struct.pack("<B", _EXCLUSIVE_LOCK) + _string(""))


def _versioned(payload):
    """ENCODE_START(1, 1) ... ENCODE_FINISH: version, compat version, length."""
    return struct.pack("<BBI", 1, 1, len(payload)) + payload


def _string(text):
    data = text.encode("utf-8")
    return struct.pack("<I", len(data)) + data


def _utime(seconds):
    """utime_t: u32 seconds, u32 nanoseconds."""
    whole = int(seconds)
    return struct.pack("<II", whole, int((seconds - whole) * 1e9))


def _entity_addr(address):
    """entity_addr_t of a client at "<IPv4>:<port>/<nonce>": a marker, then type,
    nonce and the sockaddr_in (family in little endian, port in network order)."""
    host_port, nonce = address.rsplit("/", 1)
    host, port = host_port.rsplit(":", 1)
    sockaddr = (struct.pack("<H", socket.AF_INET) + struct.pack(">H", int(port)) +
                socket.inet_aton(host) + bytes(8))
    return b"\x01" + _versioned(struct.pack("<III", _ADDRESS_OF_A_CLIENT, int(nonce),
                                            len(sockaddr)) + sockaddr)
