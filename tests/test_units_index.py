"""The SR index without a cluster (metadata.SrIndex and Omap on fake_rados.py), on
both compare-and-set paths: scripts racing on one index, a vanishing index, the
bucket layout, paged listings. That the real OSDs agree is tests/test_metadata.py's."""

import errno
import json

import pytest
import rados

from fake_rados import OMAP_PAGE, writes_to
from xcp_rbd import errors
from xcp_rbd.metadata import (ALL_BUCKETS, BUCKETS, Conflict, Omap, SrIndex, bucket_of,
                              dumps, new_key)


def script(cluster, sr_uuid):
    """The SR's index as a script on a host of its own opens it."""
    ioctx = cluster.connect().open_ioctx("rbd")
    ioctx.set_namespace("sr-namespace")
    return SrIndex(ioctx, sr_uuid)


@pytest.fixture
def scripts(cas_cluster):
    """Two scripts (on two hosts) on the index of a new SR."""
    sr_uuid = new_key()
    first, second = script(cas_cluster, sr_uuid), script(cas_cluster, sr_uuid)
    first.create({"sr": "{}"})
    return first, second


def writes_of(index):
    return writes_to(index.omap.name, by=index.omap.ioctx)


def keys_in_one_bucket(count):
    first = new_key()
    keys = [first]
    while len(keys) < count:
        key = new_key()
        if bucket_of(key) == bucket_of(first):
            keys.append(key)
    return keys


def keys_in_other_buckets(count):
    keys = {}
    while len(keys) < count:
        key = new_key()
        keys.setdefault(bucket_of(key), key)
    return list(keys.values())


@pytest.mark.parametrize("racers", [keys_in_one_bucket, keys_in_other_buckets])
def test_changes_racing_between_a_read_and_its_write_are_all_kept(cas_cluster, scripts,
                                                                  racers):
    mine, *theirs = racers(4)
    index, other = scripts
    for key in theirs:  # each lands between one of our reads and its write
        cas_cluster.before(lambda key=key: other.write({"v." + key: "{}"}),
                           when=writes_of(index))
    mine_fields = {"v." + mine: "{}", "k.%s.vdi-type" % mine: "user"}
    index.write(mine_fields)
    assert index.read() == dict({"sr": "{}"}, **mine_fields,
                                **{"v." + key: "{}" for key in theirs})


def test_an_update_applies_to_the_record_another_script_just_changed(cas_cluster, scripts):
    index, other = scripts
    index.write({"v.disk": dumps({"name": "disk"})})
    cas_cluster.before(lambda: other.update("v.disk", lambda r: dict(r, size=1)),
                       when=writes_of(index))
    assert index.update("v.disk", lambda r: dict(r, name="renamed")) == {
        "name": "renamed", "size": 1}
    assert json.loads(other.read_keys(["v.disk"])["v.disk"]) == {"name": "renamed", "size": 1}
    assert index.update("v.gone", lambda r: dict(r, size=2)) is None


def test_a_lock_taken_between_a_read_and_its_write_loses_no_update(cas_cluster, scripts):
    """(On the version path, the lock's write makes the update retry.)"""
    index, other = scripts
    cas_cluster.before(lambda: other.lock("img.disk").try_acquire(), when=writes_of(index))
    index.write({"u.disk": "1"})
    assert index.read(prefix="u.") == {"u.disk": "1"}
    assert other.lock("img.disk").is_held()


def test_an_index_that_changes_constantly_gives_busy_at_the_deadline(cas_cluster, scripts):
    index, other = scripts
    mine, theirs = keys_in_one_bucket(2)
    written = []

    def change_it():
        written.append(str(len(written)))
        other.write({"u." + theirs: written[-1]})
    cas_cluster.before(change_it, when=writes_of(index), times=None)
    with pytest.raises(errors.StorageError) as busy:
        index.write({"u." + mine: "1"})  # (its retries sleep on the test's clock)
    assert busy.value.params[0] == "Busy"
    assert len(written) > 1 and index.read(prefix="u.") == {"u." + theirs: written[-1]}


def test_a_removed_index_is_never_made_again_by_a_write(scripts):
    index, other = scripts
    other.remove()
    with pytest.raises(errors.StorageError) as gone:
        index.write({"u.x": "1"})
    assert gone.value.params[0] == "SR_does_not_exist"
    assert index.read() == {}
    with pytest.raises(rados.ObjectNotFound):
        index.omap.ioctx.stat(index.omap.name)


def test_an_index_removed_between_a_read_and_its_write_is_not_made_again(cas_cluster,
                                                                          scripts):
    index, other = scripts
    cas_cluster.before(other.remove, when=writes_of(index))
    with pytest.raises(errors.StorageError) as gone:
        index.write({"u.x": "1"})
    assert gone.value.params[0] == "SR_does_not_exist"
    with pytest.raises(rados.ObjectNotFound):
        index.omap.ioctx.stat(index.omap.name)


def test_creating_an_index_that_exists_changes_nothing(scripts):
    index, other = scripts
    with pytest.raises(rados.ObjectExists):
        other.create({"sr": '{"name":"another"}'})
    assert index.read() == {"sr": "{}"}


def test_a_write_that_times_out_is_an_error_and_not_applied(cas_cluster, scripts):
    index, _ = scripts
    cas_cluster.fail(errno.ETIMEDOUT, when=writes_of(index))
    with pytest.raises(rados.TimedOut):
        index.write({"u.x": "1"})
    assert index.read() == {"sr": "{}"}


def test_removing_a_prefix_removes_one_volumes_keys_only(scripts):
    index, _ = scripts
    mine, theirs = keys_in_one_bucket(2)
    fields = {}
    for key in (mine, theirs):
        fields.update({"v." + key: "{}", "k.%s.a" % key: "1", "k.%s.b\n\"c\"" % key: "\t2"})
    index.write(fields)
    index.write(remove=["v." + mine], remove_prefixes=["k.%s." % mine])
    kept = {field: value for field, value in fields.items() if theirs in field}
    assert index.read() == dict({"sr": "{}"}, **kept)


def test_a_change_that_changes_nothing_writes_nothing(cas_cluster, scripts):
    index, _ = scripts
    index.write({"v.disk": "{}"})
    written = index.omap.ioctx.stat(index.omap.name)[1]
    cas_cluster.clock.advance(10)
    index.write({"v.disk": "{}"}, remove=["v.never-was"])
    assert index.update("v.disk", lambda record: record) == {}
    assert index.omap.ioctx.stat(index.omap.name)[1] == written


def test_a_change_outside_the_buckets_it_named_writes_nothing(scripts):
    index, _ = scripts
    first, second = keys_in_other_buckets(2)
    with pytest.raises(KeyError):
        index.change(["v." + first], lambda entries: entries.update({"v." + second: "{}"}))
    assert index.read() == {"sr": "{}"}


def test_the_whole_index_is_one_read_and_at_most_one_value_a_bucket(cas_cluster, scripts):
    index, _ = scripts
    fields = {"sr": "{}"}
    for n in range(1500):
        key = new_key()
        fields.update({"v." + key: '{"n":%d}' % n, "k.%s.vdi-type" % key: "user",
                       "u." + key: str(n)})
    index.write(fields)
    served = cas_cluster.served
    before = served[index.omap.name]
    assert index.read() == fields
    assert index.read(prefix="u.") == {f: v for f, v in fields.items() if f.startswith("u.")}
    assert index.read_keys(["v." + key, "u." + key], prefix="k.%s." % key) == {
        f: v for f, v in fields.items() if key in f}
    assert served[index.omap.name] - before == 3
    assert len(Omap(index.omap.ioctx, index.omap.name).read()) <= BUCKETS


def test_a_volumes_fields_share_its_bucket():
    key = new_key()
    assert bucket_of("v." + key) == bucket_of("k.%s.vdi-type" % key) == \
        bucket_of("k.%s.odd.name" % key) == bucket_of("u." + key)
    assert bucket_of("sr") == bucket_of("gc.sr")  # a bare name is its own owner
    assert len(set(ALL_BUCKETS)) == BUCKETS
    assert {bucket_of("v.volume-%d" % n) for n in range(4000)} == set(ALL_BUCKETS)


def test_a_change_names_the_buckets_of_its_fields_and_prefixes():
    key, other = keys_in_other_buckets(2)
    assert SrIndex._buckets(["v." + key, "u." + key]) == [bucket_of(key)]
    assert SrIndex._buckets(["v." + key], ["k.%s." % other]) == sorted(
        {bucket_of(key), bucket_of(other)})
    assert SrIndex._buckets((), ["v."]) == ALL_BUCKETS  # any volume's: all of them
    assert SrIndex._buckets((), [""]) == ALL_BUCKETS


@pytest.fixture
def registry(cas_cluster):
    return Omap(cas_cluster.connect().open_ioctx("rbd"), "xcp_rbd.srs")


@pytest.mark.parametrize("cap, count", [
    (OMAP_PAGE, 2 * OMAP_PAGE), (OMAP_PAGE, 2 * OMAP_PAGE + 5), (7, 30)])
def test_a_listing_goes_on_past_the_osds_cap_until_an_empty_page(cas_cluster, registry, cap,
                                                                 count):
    cas_cluster.omap_page = cap  # (osd_max_omap_entries_per_request, as configured)
    entries = {"sr-%05d" % n: "namespace-%d" % n for n in range(count)}
    registry.write(dict(entries, other="x"))
    assert registry.read(prefix="sr-") == entries
    assert registry.read() == dict(entries, other="x")


def test_a_missing_omap_reads_as_empty_and_a_plain_write_makes_it(registry):
    assert registry.read() == {} and registry.read_keys(["a"]) == {}
    registry.write({"a": "1"})
    assert registry.read_keys(["a", "b"]) == {"a": "1"}


def test_a_guarded_write_refuses_what_changed_since_its_read(cas_cluster, registry):
    registry.write({"a": "1", "b": "2"})
    other = Omap(cas_cluster.connect().open_ioctx("rbd"), registry.name)
    _, guard = registry.read_for_update(["a"])
    other.write({"a": "changed"})
    with pytest.raises(Conflict):
        registry.write({"b": "3"}, guard=guard)
    assert registry.read() == {"a": "changed", "b": "2"}


def test_a_guarded_write_never_makes_what_did_not_exist_at_its_read(registry):
    _, guard = registry.read_for_update(["a"])
    with pytest.raises(rados.ObjectNotFound):
        registry.write({"a": "1"}, guard=guard)
    assert registry.read() == {}
