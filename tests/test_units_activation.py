"""The activation record without a cluster (datapath/activation.py on fake_rados.py),
on both compare-and-set paths: who may activate a volume, when a dead holder is
taken over and fenced, what deactivation drops, hosts racing on the record.

librbd stays out: `Disk` stands in for rbd.Image (the image's id, and the clients
that watch it, which the tests set: a data process that opened the image watches
it until it dies). That a real open adds that watch and that Ceph drops a dead
client's is tests/test_datapath.py's, on a real cluster with simulated hosts."""

import errno
import itertools
import json

import pytest
import rados
import rbd

from fake_rados import writes_to
from xcp_rbd import errors
from xcp_rbd.cluster import ClusterConfig, Connection
from xcp_rbd.datapath.activation import FIELD, ActivationLock
from xcp_rbd.errors import ActivatedOnAnotherHost
from xcp_rbd.location import VolumeLocation
from xcp_rbd.metadata import Omap, dumps

WHERE = VolumeLocation.parse("rbd+tapdisk://rbd/sr-namespace/disk")
HEADER = "rbd_header.1a2b3c"
# Some of librbd's own values in the header's omap: binary, never to be touched.
LIBRBD_VALUES = {"features": b"=\x00\x00\x00\x00\x00\x00\x00", "order": b"\x16",
                 "size": b"\x00\x00\x00@\x00\x00\x00\x00"}


class Disk(object):
    """The image `disk` as rbd.Image(ioctx, name, read_only=True) opens it."""

    def __init__(self):
        self.watchers = set()  # client addresses

    def __call__(self, ioctx, name, read_only=False):
        if name != WHERE.image:
            raise rbd.ImageNotFound("no image %s" % name)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def id(self):
        return HEADER[len("rbd_header."):]

    def watchers_list(self):
        return [{"addr": address} for address in sorted(self.watchers)]


def header_ioctx(cluster):
    ioctx = cluster.connect().open_ioctx("rbd")
    ioctx.set_namespace(WHERE.namespace)
    return ioctx


@pytest.fixture
def disk(cas_cluster, monkeypatch):
    """The image, its header object made as librbd makes it."""
    disk = Disk()
    monkeypatch.setattr(rbd, "Image", disk)
    with rados.WriteOpCtx() as op:
        ioctx = header_ioctx(cas_cluster)
        ioctx.set_omap(op, tuple(LIBRBD_VALUES), tuple(LIBRBD_VALUES.values()))
        ioctx.operate_write_op(op, HEADER)
    return disk


class Host(object):
    """A host of the pool: its identity, and the activation calls it makes."""

    def __init__(self, cluster, uuid):
        self.cluster = cluster
        self.me = {"host": uuid, "hostname": uuid + ".example"}
        self.connection = Connection(ClusterConfig())
        self.connection.rados = cluster.connect()

    def lock(self):
        return ActivationLock(self.connection, WHERE)

    def activate(self, disk):
        """What Datapath.activate does: claim, start the data process (a new
        client that watches the image), record it; returns that client."""
        with self.lock() as lock:
            lock.acquire(self.me)
            before = lock.watchers()
            data_process = self.cluster.connect()
            disk.watchers.add(data_process.address)
            assert lock.record_clients(self.me, before) == [data_process.address]
        return data_process

    def deactivate(self, fence=()):
        with self.lock() as lock:
            lock.release(self.me, fence)


@pytest.fixture
def host1(cas_cluster):
    return Host(cas_cluster, "host-1")


@pytest.fixture
def host2(cas_cluster):
    return Host(cas_cluster, "host-2")


def record(host):
    with host.lock() as lock:
        return lock.holder()[0]


def can_write(client):
    """Whether `client` can still write to the pool (a blocklisted one cannot)."""
    ioctx = client.open_ioctx("rbd")
    try:
        Omap(ioctx, "probe").write({"written": "yes"})
        return True
    except rados.OSError as exc:
        assert exc.errno == errno.ESHUTDOWN
        return False


def header_values(cluster):
    """librbd's values in the header's omap."""
    with rados.ReadOpCtx() as op:
        ioctx = header_ioctx(cluster)
        values, _ = ioctx.get_omap_vals_by_keys(op, tuple(LIBRBD_VALUES))
        ioctx.operate_read_op(op, HEADER)
        return dict(values)


def test_activating_records_the_host_and_its_data_process(cas_cluster, disk, host1):
    data_process = host1.activate(disk)
    holder = record(host1)
    assert holder["host"] == "host-1" and holder["hostname"] == "host-1.example"
    assert holder["clients"] == [data_process.address] and holder["since"]
    assert header_values(cas_cluster) == LIBRBD_VALUES


def test_a_holder_whose_data_process_watches_is_never_taken_over(disk, host1, host2):
    host1.activate(disk)
    with pytest.raises(ActivatedOnAnotherHost) as refused:
        host2.activate(disk)
    assert refused.value.params[:2] == ["Activated_on_another_host", "host-1"]
    assert record(host1)["host"] == "host-1"


def test_a_host_is_refused_while_its_own_earlier_data_process_still_watches(disk, host1):
    host1.activate(disk)
    with pytest.raises(ActivatedOnAnotherHost) as refused:
        host1.activate(disk)
    assert refused.value.params[:2] == ["Activated_on_another_host", "host-1"]


def test_a_dead_holder_is_fenced_then_taken_over(cas_cluster, disk, host1, host2):
    dead = host1.activate(disk)
    disk.watchers.discard(dead.address)  # Ceph dropped the dead client's watch
    assert can_write(dead)
    taker = host2.activate(disk)
    assert record(host2)["host"] == "host-2"
    assert record(host2)["clients"] == [taker.address]
    assert not can_write(dead)  # should it wake up
    assert can_write(taker)


def test_a_holder_that_died_before_recording_its_clients_blocks_any_watched_image(
        cas_cluster, disk, host1, host2):
    with host1.lock() as lock:
        lock.acquire(host1.me)  # and host-1 died there
    someone = cas_cluster.connect()
    disk.watchers.add(someone.address)  # whose? host-1's data process, maybe
    with pytest.raises(ActivatedOnAnotherHost):
        host2.activate(disk)
    disk.watchers.discard(someone.address)
    host2.activate(disk)
    assert record(host2)["host"] == "host-2"
    assert can_write(someone)  # nothing recorded, nothing fenced


def test_deactivating_drops_the_record_and_fences_a_dead_data_process(cas_cluster, disk,
                                                                       host1, host2):
    dead = host1.activate(disk)
    disk.watchers.discard(dead.address)
    host1.deactivate(fence=[dead.address])
    assert record(host1) is None
    assert not can_write(dead)
    assert header_values(cas_cluster) == LIBRBD_VALUES
    host2.activate(disk)
    assert record(host2)["host"] == "host-2"


def test_deactivating_leaves_the_record_of_the_host_that_took_over(disk, host1, host2):
    dead = host1.activate(disk)
    disk.watchers.discard(dead.address)
    host2.activate(disk)
    host1.deactivate()
    assert record(host1)["host"] == "host-2"
    host1.deactivate()  # again, and with no record: nothing to do
    assert record(host1)["host"] == "host-2"


def test_an_activation_taken_over_before_it_recorded_its_clients_is_lost(
        disk, host1, host2):
    with host1.lock() as lock:
        lock.acquire(host1.me)
        before = lock.watchers()
        host2.activate(disk)  # host-1 stalled: its record looked dead
        with pytest.raises(errors.StorageError) as lost:
            lock.record_clients(host1.me, before)
    assert lost.value.params[0] == "Activation_lost"
    assert record(host1)["host"] == "host-2"


def test_of_two_hosts_activating_at_once_one_wins(cas_cluster, disk, host1, host2):
    winner = {}
    cas_cluster.before(lambda: winner.update(client=host2.activate(disk)),
                       when=writes_to(HEADER))
    with pytest.raises(ActivatedOnAnotherHost) as refused:
        host1.activate(disk)
    assert refused.value.params[1] == "host-2"
    assert record(host1)["clients"] == [winner["client"].address]


def test_a_record_that_changes_constantly_gives_busy(cas_cluster, disk, host1):
    other = header_ioctx(cas_cluster)
    stamps = itertools.count()
    cas_cluster.before(
        lambda: Omap(other, HEADER).write({FIELD: dumps(
            {"host": "host-2", "since": next(stamps), "clients": []})}),
        when=writes_to(HEADER), times=None)
    with pytest.raises(errors.StorageError) as busy:
        host1.activate(disk)
    assert busy.value.params[0] == "Busy"
    assert json.loads(Omap(other, HEADER).read_keys([FIELD])[FIELD])["host"] == "host-2"


def test_an_image_that_does_not_exist_is_named(disk, host1):
    gone = VolumeLocation.parse("rbd+tapdisk://rbd/sr-namespace/gone")
    with pytest.raises(errors.StorageError) as error:
        with ActivationLock(host1.connection, gone):
            pass
    assert error.value.params[0] == "Volume_does_not_exist"
