"""Cluster locks without a cluster (metadata.ClusterLock on fake_rados.py's cls_lock):
exclusion, leases that free a killed holder's lock, renewal, release and forgetting,
waiting, and is_held as read from the lock's own xattr. The test's clock moves only
when told to (or slept on), so no test waits for a lease."""

import errno

import pytest
import rados

from fake_rados import writes_to
from xcp_rbd import errors
from xcp_rbd.metadata import LOCK_LEASE, SrIndex, new_key

LOCK = "img.disk"


@pytest.fixture
def hosts(fake_cluster):
    """One SR's index as two hosts see it, each a client of its own."""
    sr_uuid = new_key()
    first, second = (SrIndex(fake_cluster.connect().open_ioctx("rbd"), sr_uuid)
                     for _ in range(2))
    first.create({"sr": "{}"})
    return first, second


def test_a_lock_excludes_every_other_holder(hosts):
    first, second = hosts
    assert first.lock(LOCK).try_acquire()
    assert not second.lock(LOCK).try_acquire()
    assert not first.lock(LOCK).try_acquire()  # the same client, another operation
    assert second.lock("img.other").try_acquire()
    assert second.lock(LOCK).is_held()


def test_a_holder_cannot_take_its_lock_twice(hosts):
    first, _ = hosts
    lock = first.lock(LOCK)
    assert lock.try_acquire()
    assert not lock.try_acquire()
    assert lock.is_held()


def test_a_killed_holders_lock_is_free_once_its_lease_runs_out(fake_cluster, hosts):
    first, second = hosts
    killed = first.lock(LOCK)
    assert killed.try_acquire()
    fake_cluster.clock.advance(LOCK_LEASE - 1)
    assert not second.lock(LOCK).try_acquire()
    fake_cluster.clock.advance(2)
    assert not killed.is_held()  # read as is: the expired locker is still listed
    taker = second.lock(LOCK)
    assert taker.try_acquire()
    killed.release()  # too late: it is the taker's now, and stays so
    assert killed.is_held() and not first.lock(LOCK).try_acquire()


def test_renewing_extends_the_lease(fake_cluster, hosts):
    first, second = hosts
    lock = first.lock(LOCK)
    assert lock.try_acquire()
    fake_cluster.clock.advance(LOCK_LEASE - 10)
    lock.renew()
    fake_cluster.clock.advance(LOCK_LEASE - 10)
    assert not second.lock(LOCK).try_acquire()
    fake_cluster.clock.advance(11)
    assert second.lock(LOCK).try_acquire()


def test_renewing_a_lapsed_lock_takes_it_again_unless_another_did(fake_cluster, hosts):
    first, second = hosts
    lapsed, taken = first.lock(LOCK), first.lock("img.other")
    assert lapsed.try_acquire() and taken.try_acquire()
    fake_cluster.clock.advance(LOCK_LEASE + 1)
    assert second.lock("img.other").try_acquire()
    lapsed.renew()
    with pytest.raises(rados.ObjectBusy):
        taken.renew()
    assert not second.lock(LOCK).try_acquire()


def test_a_released_lock_is_free_and_its_xattr_stays(hosts):
    first, second = hosts
    with first.lock(LOCK) as lock:
        assert lock.is_held()
    assert not lock.is_held()
    assert second.lock(LOCK).try_acquire()
    assert first.lock_names() == [LOCK]


def test_forgetting_a_lock_removes_its_xattr(hosts):
    first, second = hosts
    with first.lock(LOCK):
        pass
    lock = second.lock(LOCK, wait=0)
    assert lock.try_acquire()
    lock.forget()
    assert first.lock_names() == []
    assert not lock.is_held()
    assert first.lock(LOCK).try_acquire()


def test_is_held_on_locks_never_taken_and_objects_that_do_not_exist(fake_cluster, hosts):
    first, _ = hosts
    assert not first.lock(LOCK).is_held()
    missing = SrIndex(fake_cluster.connect().open_ioctx("rbd"), new_key())
    assert not missing.lock(LOCK).is_held()
    assert missing.lock_names() == []


def test_a_lock_without_a_lease_is_held_until_released(fake_cluster, hosts):
    first, second = hosts
    lock = first.lock(LOCK, lease=0)
    assert lock.try_acquire()
    fake_cluster.clock.advance(100 * LOCK_LEASE)
    assert second.lock(LOCK).is_held()
    lock.release()
    assert not second.lock(LOCK).is_held()


def test_waiting_for_a_held_lock_ends_in_busy(fake_cluster, hosts):
    first, second = hosts
    assert first.lock(LOCK).try_acquire()
    start = fake_cluster.clock.time()
    with pytest.raises(errors.StorageError) as busy:
        with second.lock(LOCK, what="disk image disk", wait=5):
            pass
    assert busy.value.params[0] == "Busy" and "disk image disk" in busy.value.params[1]
    assert fake_cluster.clock.time() - start >= 5


def test_a_waiter_gets_the_lock_when_the_holders_lease_runs_out(fake_cluster, hosts):
    first, second = hosts
    assert first.lock(LOCK, lease=3).try_acquire()  # and its holder is killed
    with second.lock(LOCK, wait=20):
        assert not first.lock(LOCK).try_acquire()


def test_a_lock_call_that_times_out_is_an_error_not_busy(fake_cluster, hosts):
    first, _ = hosts
    fake_cluster.fail(errno.ETIMEDOUT, when=writes_to(first.omap.name))
    with pytest.raises(rados.TimedOut):
        first.lock(LOCK).try_acquire()


def test_a_release_that_fails_leaves_the_lock_to_its_lease(fake_cluster, hosts):
    first, second = hosts
    lock = first.lock(LOCK)
    assert lock.try_acquire()
    fake_cluster.fail(errno.ETIMEDOUT, when=writes_to(first.omap.name))
    lock.release()  # logged, not raised: the operation it ended is done
    assert not second.lock(LOCK).try_acquire()
    fake_cluster.clock.advance(LOCK_LEASE + 1)
    assert second.lock(LOCK).try_acquire()
