"""The library's pure parts, without a cluster: the time bounds of a call, the
location strings XAPI keeps for us, metadata's keys and encodings, and the IDL's
checks of what goes in and out of a call."""

import json
import re
import uuid

import pytest

from xcp_rbd import bounds, errors, idl, protocol
from xcp_rbd.cluster import ClusterConfig
from xcp_rbd.location import SrLocation, VolumeLocation
from xcp_rbd.bounds import jitter
from xcp_rbd.metadata import dumps, new_key
from xcp_rbd.records import VolumeRecord


def test_a_call_is_bounded_by_three_timeouts_and_a_margin():
    assert bounds.call(5) == 3 * 5 + bounds.MARGIN
    assert bounds.call(10) == 35


@pytest.mark.parametrize("remaining, expected", [
    (None, bounds.LOCK_WAIT),  # no watchdog: a tool or a test in-process
    (bounds.call(5), 10),  # a fresh call at timeout 5
    (100, bounds.LOCK_WAIT),
    (12, 2),
    (3, 0.0),  # never negative
])
def test_a_wait_leaves_the_call_a_timeout_and_a_margin(monkeypatch, remaining, expected):
    monkeypatch.setattr(protocol, "watchdog_remaining", lambda: remaining)
    assert bounds.wait(5) == expected


def cluster_config():
    return ClusterConfig(conf="/etc/ceph/other.conf", cluster="backup", user="xcp",
                         keyring="/etc/ceph/xcp.keyring", mon_host="10.0.0.1:3300",
                         timeout=5)


def test_an_sr_string_reads_back_as_it_was_written():
    written = SrLocation("rbd pool", "a namespace/with?odd&chars", new_key(), cluster_config(),
                         datapath="qemu", max_chain_depth=3)
    read = SrLocation.parse(str(written))
    assert (read.pool, read.namespace, read.sr_uuid, read.datapath, read.max_chain_depth) == (
        written.pool, written.namespace, written.sr_uuid, "qemu", 3)
    assert vars(read.cluster) == vars(written.cluster)
    assert str(read) == str(written)


def test_an_sr_string_says_only_what_differs_from_the_defaults():
    sr_uuid = new_key()
    assert str(SrLocation("rbd", "", sr_uuid, ClusterConfig())) == "rbd://rbd//" + sr_uuid
    assert SrLocation.parse("rbd://rbd//" + sr_uuid).namespace == ""


@pytest.mark.parametrize("text", [
    "rbd+tapdisk://rbd/ns/uuid", "rbd://rbd/ns", "rbd://rbd/ns/uuid/more", "rbd:///ns/uuid",
    "rbd://rbd/ns/", "not a uri"])
def test_a_string_that_is_not_an_sr_of_ours_is_refused(text):
    with pytest.raises(errors.StorageError) as refused:
        SrLocation.parse(text)
    assert refused.value.params[0] == "Invalid_parameters"


@pytest.mark.parametrize("query", [
    "datapath=nbd", "max_chain_depth=0", "max_chain_depth=15", "max_chain_depth=two",
    "timeout=0", "timeout=soon"])
def test_bad_settings_in_an_sr_string_are_named(query):
    with pytest.raises(errors.StorageError) as refused:
        SrLocation.parse("rbd://rbd/ns/%s?%s" % (new_key(), query))
    assert refused.value.params[0] == "Invalid_configuration"
    assert query.partition("=")[0] in refused.value.params[1]


def test_a_volume_uri_reads_back_as_the_sr_wrote_it():
    sr = SrLocation("rbd", "ns", new_key(), cluster_config(), datapath="qemu")
    volume = VolumeLocation.parse(sr.volume_uri("image", snap="snap-1", data_destroyed=True))
    assert (volume.pool, volume.namespace, volume.image, volume.snap, volume.backend,
            volume.data_destroyed) == ("rbd", "ns", "image", "snap-1", "qemu", True)
    assert vars(volume.cluster) == vars(sr.cluster)
    assert (volume.spec, volume.export) == ("rbd/ns/image@snap-1", "image@snap-1")
    plain = VolumeLocation.parse(SrLocation("rbd", "", new_key(), ClusterConfig())
                                 .volume_uri("image"))
    assert (plain.snap, plain.backend, plain.data_destroyed) == (None, "rbd-nbd", False)
    assert (plain.spec, plain.export) == ("rbd/image", "image")


def test_a_volume_uri_with_an_unknown_backend_is_refused():
    with pytest.raises(errors.StorageError) as refused:
        VolumeLocation.parse("rbd+tapdisk://rbd/ns/image?backend=iscsi")
    assert refused.value.params[0] == "Invalid_parameters"


def test_device_config_users_are_named_without_their_client_prefix():
    config = ClusterConfig.from_mapping({"user": "client.xcp", "timeout": "7", "unknown": "x"})
    assert (config.user, config.timeout) == ("xcp", 7)
    assert config.to_mapping() == {"user": "xcp", "timeout": "7"}


def test_new_keys_are_distinct_version_4_uuids():
    keys = {new_key() for _ in range(1000)}
    assert len(keys) == 1000
    version_4 = re.compile(
        r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    for key in keys:
        assert version_4.match(key) and uuid.UUID(key).version == 4


def test_jitter_stays_within_its_bounds():
    pauses = [jitter(0.002, 0.02) for _ in range(1000)]
    assert all(0.002 <= pause <= 0.02 for pause in pauses)
    assert len(set(pauses)) > 1
    assert jitter(0.5, 0.5) == 0.5


def test_records_are_encoded_one_way_only():
    record = {"size": 1, "name": "disque \"é\"\n", "snap": None, "keys": ["b", "a"]}
    assert dumps(record) == dumps(dict(reversed(list(record.items()))))
    assert " " not in dumps({"a": 1, "b": [1, 2]})
    assert json.loads(dumps(record)) == record


CREATE = idl.METHODS["volume.create"]
ARGS = {"dbg": "test", "sr": "rbd://rbd/ns/x", "name": "disk", "description": "",
        "size": 1 << 30, "sharable": False}


def test_a_calls_parameters_are_checked_and_passed_on():
    assert CREATE.check_args(dict(ARGS, extra="ignored")) == ARGS


@pytest.mark.parametrize("change, message", [
    ({"size": True}, "parameter 'size' must be an integer, got True"),
    ({"sharable": 0}, "parameter 'sharable' must be true or false, got 0"),
    ({"name": None}, "parameter 'name' must be a string, got nothing"),
    ({"size": None}, "parameter 'size' must be an integer, got nothing"),
])
def test_parameters_of_the_wrong_type_are_named(change, message):
    with pytest.raises(idl.IdlError) as refused:
        CREATE.check_args(dict(ARGS, **change))
    assert str(refused.value) == message


def test_a_missing_parameter_is_named_with_its_type():
    with pytest.raises(idl.IdlError) as refused:
        CREATE.check_args({k: v for k, v in ARGS.items() if k != "size"})
    assert str(refused.value) == "parameter 'size' (an integer) is missing"
    with pytest.raises(idl.IdlError):
        CREATE.check_args(["not", "an", "object"])


def volume(**change):
    return dict({"key": "k", "name": "n", "description": "", "read_write": True,
                 "sharable": False, "virtual_size": 1, "physical_utilisation": 0,
                 "uri": ["rbd+tapdisk://rbd/ns/k"], "keys": {"vdi-type": "user"}}, **change)


@pytest.mark.parametrize("result, where", [
    ([volume(), volume(uri=["a", 1])], "the result of SR.ls[1].uri[1]"),
    ([volume(keys={"a": 1})], "the result of SR.ls[0].keys.a"),
    ([volume(cbt_enabled="yes")], "the result of SR.ls[0].cbt_enabled"),
    ([{k: v for k, v in volume().items() if k != "uri"}], "the result of SR.ls[0].uri"),
])
def test_a_wrong_result_is_named_where_it_is_wrong(result, where):
    with pytest.raises(idl.IdlError) as refused:
        idl.METHODS["sr.ls"].check_result(result)
    assert str(refused.value).startswith(where + " ")


def test_results_of_every_shape_pass_when_right():
    idl.METHODS["sr.ls"].check_result([volume(), volume(cbt_enabled=True, uuid="u")])
    idl.METHODS["volume.list_changed_blocks"].check_result(
        {"granularity": 65536, "bitmap": "AAE="})
    idl.METHODS["datapath.attach"].check_result(
        {"implementations": [["XenDisk", {"params": "p", "extra": {}, "backend_type": "vbd3"}],
                             ["Nbd", {"uri": "nbd:unix:/s:exportname=x"}]]})
    idl.METHODS["sr.detach"].check_result(None)


@pytest.mark.parametrize("method, result", [
    ("volume.list_changed_blocks", {"granularity": 65536, "bitmap": "not base64!"}),
    ("datapath.attach", {"implementations": [["Floppy", {}]]}),
    ("sr.detach", {}),
    ("data.stat", {"failed": False, "complete": True, "progress": 1}),
])
def test_results_of_the_wrong_shape_are_refused(method, result):
    with pytest.raises(idl.IdlError):
        idl.METHODS[method].check_result(result)


def test_failures_reach_xapi_as_the_protocol_says():
    wrong = protocol.error_document(idl.IdlError("parameter 'size'", "an integer", "big"))
    assert (wrong["code"], wrong["params"]) == (
        "SR_BACKEND_FAILURE", ["Invalid_parameters", "parameter 'size' must be an integer, "
                               "got 'big'"])
    ours = protocol.error_document(errors.VolumeDoesNotExist("k"))
    assert ours["params"] == ["Volume_does_not_exist", "k"]
    missing = protocol.error_document(ImportError("No module named 'rados'", name="rados"))
    assert missing["params"][0] == "Missing_dependency" and "python3-rados" in \
        missing["params"][1]


STORED = ('{"created":"20261201T00:00:00Z","description":"d","image":"img","name":"n",'
          '"sharable":false,"size":4096,"snap":null,"uuid":"k"}')


def test_a_volume_record_reads_back_as_it_was_stored():
    record = VolumeRecord.load("k", STORED)
    assert (record.image, record.snap, record.size, record.read_write) == ("img", None, 4096, True)
    assert record.dumps() == STORED  # fields at their default are not stored
    changed = record.replace(cbt=True, depth=3)
    assert VolumeRecord.load("k", changed.dumps()).values() == changed.values()


@pytest.mark.parametrize("text", [
    STORED.replace('"size":4096', '"size":true'),           # a bool is not a size
    STORED.replace('"snap":null', '"snap":1'),              # wrong type
    STORED.replace('"uuid":"k"', '"uuid":"k","later":1'),   # a field this version lacks
    STORED.replace('"image":"img",', ''),                   # a field missing
    '[]', 'not json'])
def test_a_volume_record_this_version_does_not_know_is_refused_in_words(text):
    with pytest.raises(errors.VolumeRecordInvalid) as refused:
        VolumeRecord.load("k", text)
    assert refused.value.params[0] == "Volume_record_invalid" and "volume k" in refused.value.params[1]

