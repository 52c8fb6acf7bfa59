"""The SR index on a real cluster: bounded reads, atomic bucketed writes; and the
unit layer's fake (fake_rados.py) answering as this cluster does."""

import collections
import errno
import threading

import pytest
import rados

import fake_rados
from xcp_rbd import errors
from xcp_rbd.location import SrLocation
from xcp_rbd.metadata import BUCKETS, Omap, SrIndex, bucket_of, dumps, new_key, now

MiB = 1 << 20


class CountingIoctx(object):
    """A real ioctx that counts the read operations sent to the OSDs."""

    def __init__(self, ioctx):
        self.ioctx = ioctx
        self.reads = 0

    def operate_read_op(self, op, name):
        self.reads += 1
        return self.ioctx.operate_read_op(op, name)

    def __getattr__(self, name):
        return getattr(self.ioctx, name)


@pytest.fixture
def handle(cluster):
    handle = rados.Rados(conffile=cluster.conf, rados_id="admin",
                         conf={"keyring": cluster.admin_keyring})
    handle.connect()
    yield handle
    handle.shutdown()


@pytest.fixture
def ioctx(handle, cluster):
    ioctx = handle.open_ioctx(cluster.pool)
    yield ioctx
    ioctx.close()


@pytest.fixture
def index(ioctx):
    """A fresh index, whose reads are counted (index.omap.ioctx.reads)."""
    index = SrIndex(CountingIoctx(ioctx), new_key())
    index.create({"sr": "{}"})
    yield index
    index.remove()


def test_the_whole_index_is_one_read_however_many_volumes(ioctx, index):
    expected = {"sr": "{}", "gc.stats": "{}"}
    volumes = []
    for n in range(3000):
        key = new_key()
        volumes.append(key)
        expected["v." + key] = '{"n": %d}' % n
        expected["k.%s.vdi-type" % key] = "user"
        expected["k.%s.odd \"name\"\n" % key] = "value\twith\nspecials"
        expected["u." + key] = str(n)
        expected["j.image-%d" % n] = "{}"
    items = sorted(expected.items())
    for first in range(0, len(items), 2000):
        index.write(dict(items[first:first + 2000]))

    counting = index.omap.ioctx
    counting.reads = 0
    assert index.read() == expected
    assert counting.reads == 1
    assert index.read(prefix="u.") == {k: v for k, v in expected.items()
                                       if k.startswith("u.")}
    assert counting.reads == 2
    key = volumes[1234]
    assert index.read_keys(["v." + key, "u." + key], prefix="k.%s." % key) == {
        k: v for k, v in expected.items() if key in k}
    assert counting.reads == 3
    # what the OSDs hold: never more omap values than buckets
    assert len(Omap(ioctx, index.omap.name).read()) <= BUCKETS


def test_changes_to_one_bucket_from_many_threads_are_all_kept(index):
    bucket = bucket_of("v.x")
    keys = [k for k in (new_key() for _ in range(20000)) if bucket_of(k) == bucket]
    keys = keys[:40]
    assert len(keys) == 40 and all(bucket_of("u." + k) == bucket for k in keys)

    def worker(mine):
        for key in mine:
            index.write({"v." + key: "{}", "k.%s.vdi-type" % key: "user"})
            index.update("v." + key, lambda record: dict(record, updated=True))
    threads = [threading.Thread(target=worker, args=(keys[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = index.read()
    assert {f for f in entries if f.startswith("v.")} == {"v." + k for k in keys}
    assert all(entries["v." + k] == '{"updated":true}' for k in keys)
    assert len([f for f in entries if f.startswith("k.")]) == 40

    gone = keys[0]
    index.write(remove=["v." + gone], remove_prefixes=["k.%s." % gone])
    assert [f for f in index.read() if gone in f] == []
    assert len(index.read()) == 1 + 2 * 39


def test_a_write_never_recreates_a_removed_index(ioctx, index):
    index.remove()
    with pytest.raises(errors.StorageError) as failure:
        index.write({"u.x": "1"})
    assert failure.value.params[0] == "SR_does_not_exist"
    assert index.read() == {}
    assert Omap(ioctx, index.omap.name).read() == {}


def test_sr_ls_is_one_round_trip_to_the_index(cluster, xapi, device_config, tmp_path, ioctx):
    """Counted on the wire: the installed SR.ls script, with the Ceph client logging
    every message it sends, with 5 and with 3 000 volumes (past a listing's cap)."""
    client_log = tmp_path / "client.log"
    conf = tmp_path / "ceph.conf"
    with open(cluster.conf) as stream:
        conf.write_text(stream.read() + "\n[client]\nlog file = %s\ndebug ms = 1\n"
                        % client_log)
    sr_uuid = xapi.sr_create(dict(device_config, conf=str(conf)), name="counted")
    try:
        sr = xapi.sr(sr_uuid)
        ioctx.set_namespace(SrLocation.parse(sr).namespace)
        index = SrIndex(ioctx, sr_uuid)
        total = 0
        for count in (5, 2995):
            records = {}
            for n in range(count):
                key = new_key()
                records["v." + key] = dumps({
                    "uuid": key, "name": "v%d" % n, "description": "", "image": key,
                    "snap": None, "sharable": False, "size": MiB, "created": now()})
                records["k.%s.vdi-type" % key] = "user"
            index.write(records)
            total += count
            client_log.write_text("")
            listed = xapi.volume("SR.ls", sr=sr)
            with open(str(client_log)) as stream:
                sent = [line for line in stream
                        if " --> " in line and "osd_op(" in line and sr_uuid in line]
            assert len(listed) == total
            assert len(sent) == 1, sent
    finally:
        xapi.sr_destroy(sr_uuid)


# What the unit layer relies on, as cases run on this cluster and on the fake: each
# case(ioctx, ops, object name) returns what it saw, or raises the binding's error.
Ops = collections.namedtuple("Ops", "read write")


def put(io, ops, obj, values, guard=lambda op: None):
    with ops.write() as op:
        guard(op)
        io.set_omap(op, tuple(values), tuple(v.encode("utf-8") for v in values.values()))
        io.operate_write_op(op, obj)
    return io.get_last_version()


def by_keys(io, ops, obj, keys):
    """({key: value} of the keys that exist, the version read)."""
    with ops.read() as op:
        values, _ = io.get_omap_vals_by_keys(op, tuple(keys))
        io.operate_read_op(op, obj)
        return dict(values), io.get_last_version()


def listing(io, ops, obj, start, prefix):
    with ops.read() as op:
        values, _ = io.get_omap_vals(op, start, prefix, 100000)
        io.operate_read_op(op, obj)
        return [key for key, _ in values]


def lock(io, obj, cookie, **options):
    io.lock_exclusive(obj, "l", cookie, desc="the lock of " + cookie, **options)


def stale_version(io, ops, obj):
    version = put(io, ops, obj, {"a": "1"})
    put(io, ops, obj, {"a": "2"})
    put(io, ops, obj, {"a": "3"}, guard=lambda op: op.assert_version(version))


def version_of_a_removed_object(io, ops, obj):
    version = put(io, ops, obj, {"a": "1"})
    io.remove_object(obj)
    try:
        put(io, ops, obj, {"a": "2"}, guard=lambda op: op.assert_version(version))
    except rados.OSError as exc:  # ERANGE or EOVERFLOW: both are a conflict to ceph_client
        assert exc.errno in (errno.ERANGE, errno.EOVERFLOW)
    return by_keys(io, ops, obj, ["a"])


def versions(io, ops, obj):
    """Whether a read sees the version of the last write, and a lock makes a new one."""
    written = put(io, ops, obj, {"a": "1"})
    read = by_keys(io, ops, obj, ["a"])[1]
    lock(io, obj, "c1")
    return read == written, by_keys(io, ops, obj, ["a"])[1] > written


def lock_twice(second_cookie, flags=0):
    def case(io, ops, obj):
        lock(io, obj, "c1", duration=60)
        lock(io, obj, second_cookie, duration=60, flags=flags)
    return case


def unlocked_xattr(io, ops, obj):
    lock(io, obj, "c1", duration=60)
    io.unlock(obj, "l", "c1")
    return io.get_xattr(obj, "lock.l")


def held_xattr(io, ops, obj):
    lock(io, obj, "c1")  # no lease: the one part that differs is the clock
    return io.get_xattr(obj, "lock.l")


def omap_cmp(key, value):
    return lambda op: op.omap_cmp(key, value, rados.LIBRADOS_CMPXATTR_OP_EQ)


def compared_to(key, value):
    def case(io, ops, obj):
        put(io, ops, obj, {"a": "1"})
        put(io, ops, obj, {"b": "2"}, guard=omap_cmp(key, value))
        return by_keys(io, ops, obj, ["a", "b"])[0]
    return case


def capped_listing(io, ops, obj):
    put(io, ops, obj, {"k%04d" % n: "v" for n in range(fake_rados.OMAP_PAGE + 100)})
    return len(listing(io, ops, obj, "", "")), len(by_keys(
        io, ops, obj, ["k%04d" % n for n in range(fake_rados.OMAP_PAGE + 100)])[0])


def exclusive_create(io, ops, obj):
    put(io, ops, obj, {"a": "1"})
    put(io, ops, obj, {"a": "2"}, guard=lambda op: op.new(rados.LIBRADOS_CREATE_EXCLUSIVE))


def removed_keys_of_nothing(io, ops, obj):
    with ops.write() as op:
        io.remove_omap_keys(op, ("a",))
        io.operate_write_op(op, obj)


def absent_xattr(io, ops, obj):
    put(io, ops, obj, {"a": "1"})
    return io.get_xattr(obj, "lock.l")


def removed_absent_xattr(io, ops, obj):
    put(io, ops, obj, {"a": "1"})
    return io.rm_xattr(obj, "nothing")


def bounded_listings(io, ops, obj):
    put(io, ops, obj, {"a1": "", "a2": "", "b1": ""})
    return listing(io, ops, obj, "a1", "a"), listing(io, ops, obj, "", "b")


def lock_on_no_object(io, ops, obj):
    lock(io, obj, "c1")
    return io.stat(obj)[0]


def unlock_not_held(io, ops, obj):
    put(io, ops, obj, {"a": "1"})
    io.unlock(obj, "l", "c1")


CASES = {
    "a read of no object": lambda io, ops, obj: by_keys(io, ops, obj, ["a"]),
    "an absent xattr": absent_xattr,
    "a removed absent xattr": removed_absent_xattr,
    "listings from a key, under a prefix": bounded_listings,
    "a listing past the cap, and reads by key": capped_listing,
    "omap keys removed from no object": removed_keys_of_nothing,
    "an exclusive create of an object that exists": exclusive_create,
    "a stale version": stale_version,
    "the version of a removed object": version_of_a_removed_object,
    "versions of reads, writes and locks": versions,
    "a lock of another cookie": lock_twice("c2"),
    "a lock of the same cookie": lock_twice("c1"),
    "a lock renewed": lock_twice("c1", fake_rados.LOCK_RENEW),
    "a lock on no object": lock_on_no_object,
    "an unlock of a lock not held": unlock_not_held,
    "a lock's xattr once unlocked": unlocked_xattr,
    "a lock's xattr while held": held_xattr,
}
OMAP_CMP_CASES = {
    "an omap compare that fails": compared_to("a", "2"),
    "an omap compare that holds": compared_to("a", "1"),
    "an omap compare of an absent key with empty": compared_to("c", ""),
    "an omap compare on no object": lambda io, ops, obj: put(io, ops, obj, {"a": "1"},
                                                             guard=omap_cmp("a", "1")),
}
without_omap_cmp = pytest.mark.skipif(not hasattr(rados.WriteOp, "omap_cmp"),
                                      reason="this binding has no omap_cmp")


def outcome(case, io, ops, obj):
    try:
        return "returns", case(io, ops, obj)
    except rados.Error as exc:
        return type(exc).__name__, exc.errno


@pytest.mark.parametrize("name", list(CASES) + [
    pytest.param(name, marks=without_omap_cmp) for name in OMAP_CMP_CASES])
def test_the_unit_layers_fake_answers_as_the_cluster_does(cluster, handle, ioctx, name):
    """What each case returns or raises, on this cluster and on fake_rados.py's,
    whose client is this one (its id and address, which a lock's xattr holds)."""
    case = dict(CASES, **OMAP_CMP_CASES)[name]
    obj = "xcp_rbd.contract." + new_key()
    try:
        real = outcome(case, ioctx, Ops(rados.ReadOpCtx, rados.WriteOpCtx), obj)
    finally:
        try:
            ioctx.remove_object(obj)
        except rados.ObjectNotFound:
            pass
    client = fake_rados.FakeCluster(pools=[cluster.pool]).connect(
        address=handle.get_addrs(), instance_id=handle.get_instance_id())
    fake_ops = Ops(fake_rados.FakeReadOp, fake_rados.FakeWriteOpWithOmapCmp
                   if hasattr(rados.WriteOp, "omap_cmp") else fake_rados.FakeWriteOp)
    assert outcome(case, client.open_ioctx(cluster.pool), fake_ops, obj) == real, (
        "client.%d at %s" % (handle.get_instance_id(), handle.get_addrs()))
