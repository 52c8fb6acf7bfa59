"""The SR index on a real cluster: bounded reads, atomic bucketed writes."""

import threading

import pytest
import rados

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
def ioctx(cluster):
    handle = rados.Rados(conffile=cluster.conf, rados_id="admin",
                         conf={"keyring": cluster.admin_keyring})
    handle.connect()
    ioctx = handle.open_ioctx(cluster.pool)
    yield ioctx
    ioctx.close()
    handle.shutdown()


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
