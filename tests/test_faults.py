"""Every fault an operator meets, named: a cluster of its own made to fail in each
way (manager stopped, monitor stopped, OSD stopped, pool full) while XAPI's
calls run, all at once as XAPI runs them. Each answers inside its bound
(bounds.call of the SR's timeout) with success or an error that names the
cause; once the fault is lifted, SR.ls agrees with Ceph after a collection,
every call that failed succeeds when retried, and no volume lost a byte.

At timeout 5 here; at the default (10) with `scripts/test --long`."""

import json
import os
import threading
import time

import pytest

from conftest import ImageIO, run_script
from hosts import until
from xcp_rbd import bounds
from xcp_rbd.attached import open_sr
from xcp_rbd.gc import collect
from xcp_rbd.location import SrLocation, VolumeLocation

SLACK = 5  # ten scripts starting at once on two cores


def set_quota(cluster, max_bytes):
    cluster.ceph("osd", "pool", "set-quota", cluster.pool, "max_bytes", str(max_bytes))


def pool_full(cluster):
    set_quota(cluster, 1)
    until("the pool to be full", lambda: "POOL_FULL" in json.dumps(
        cluster.ceph("health", "detail", "--format=json")))


def pool_emptied(cluster):
    set_quota(cluster, 0)
    until("the pool not to be full", lambda: "POOL_FULL" not in json.dumps(
        cluster.ceph("health", "detail", "--format=json")))


# fault -> (cause it, lift it, words of which an error must say one)
FAULTS = {
    "manager stopped": (lambda c: c.stop_mgr(), lambda c: c.start_mgr(), ["manager"]),
    "monitor stopped": (lambda c: c.stop_mon(), lambda c: c.start_mon(),
                        ["cannot connect", "did not answer"]),
    "OSD stopped": (lambda c: c.stop_osd(), lambda c: c.start_osd(), ["did not answer"]),
    "pool full": (pool_full, pool_emptied, ["is full"]),
}
# What reads alone answers on a full pool (a VM's start needs Volume.stat).
READS = {"SR.stat", "SR.ls", "Volume.stat", "Plugin.diagnostics"}


@pytest.fixture(params=[5, pytest.param(10, marks=pytest.mark.long)],
                ids=["timeout 5", "default timeout"])
def faulty_sr(request, xapi, fragile_cluster):
    config = {"pool": fragile_cluster.pool, "conf": fragile_cluster.conf,
              "user": fragile_cluster.user, "keyring": fragile_cluster.keyring,
              "timeout": str(request.param)}
    sr_uuid = xapi.sr_create(config, name="faulty")
    yield sr_uuid, request.param
    xapi.sr_destroy(sr_uuid)


def calls(xapi, sr_uuid, disk, scratch):
    sr = xapi.sr(sr_uuid)
    config = xapi._state()["device_config"][sr_uuid]  # as SR.create completed it
    return {
        "SR.stat": {"sr": sr}, "SR.ls": {"sr": sr}, "SR.attach": {"configuration": config},
        "Volume.stat": {"sr": sr, "key": disk},
        "Volume.create": {"sr": sr, "name": "new", "description": "", "size": 4 << 20,
                          "sharable": False},
        "Volume.snapshot": {"sr": sr, "key": disk},
        "Volume.clone": {"sr": sr, "key": disk},
        "Volume.destroy": {"sr": sr, "key": scratch},
        "Volume.set": {"sr": sr, "key": disk, "k": "fault", "v": "yes"},
        "Plugin.diagnostics": {},
    }


def run_all(plugin_root, commands):
    """Every call at once; {command: (status, output, seconds)}."""
    results = {}

    def run(command, params):
        started = time.time()
        status, out, _ = run_script(plugin_root, command, json.dumps(dict(params, dbg="f")))
        results[command] = (status, out, time.time() - started)
    threads = [threading.Thread(target=run, args=item) for item in commands.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_call_answers_a_fault_in_its_bound_and_names_it(
        xapi, plugin_root, fragile_cluster, faulty_sr, fault):
    sr_uuid, timeout = faulty_sr
    cause, lift, words = FAULTS[fault]
    disk = xapi.vdi_create(sr_uuid, "8M")
    scratch = xapi.vdi_create(sr_uuid, "4M")
    data = bytes(range(256)) * 4096
    io = ImageIO(fragile_cluster)
    io.write(disk, 0, data)
    commands = calls(xapi, sr_uuid, disk["key"], scratch["key"])
    cause(fragile_cluster)
    try:
        results = run_all(plugin_root, commands)
    finally:
        lift(fragile_cluster)
    bound = bounds.call(timeout) + SLACK
    failed = {}
    for command, (status, out, seconds) in sorted(results.items()):
        assert seconds < bound, "%s took %.0f s (%s)" % (command, seconds, out)
        if status != 0:
            assert not (fault == "pool full" and command in READS), (command, out)
            text = " ".join(map(str, out["params"])).lower()
            assert any(word in text for word in words), (command, out)
            failed[command] = commands[command]

    for command, params in sorted(failed.items()):  # retried once the fault is lifted
        status, out, _ = run_script(plugin_root, command, json.dumps(dict(params, dbg="r")))
        gone = command == "Volume.destroy" and "Volume_does_not_exist" in json.dumps(out)
        assert status == 0 or gone, (command, out)
    sr = xapi.sr(sr_uuid)
    listed = xapi.volume("SR.ls", sr=sr)
    referenced = {VolumeLocation.parse(volume["uri"][0]).image for volume in listed}
    with open_sr(sr) as attached:
        collect(attached, wait=120, full=True)
        assert set(attached.remains()) == referenced  # nothing lost, nothing left over
    for volume in listed:
        xapi.volume("Volume.stat", sr=sr, key=volume["key"])
    assert io.read(disk, 0, len(data)) == data
    io.close()


def test_a_busy_volume_answers_busy_inside_the_bound(xapi, device_config, plugin_root):
    """At timeout 5 (a bound of 20 s) a call that waits for a volume another call
    holds gives up in time to say Busy, rather than letting its watchdog speak."""
    sr_uuid = xapi.sr_create(dict(device_config, timeout="5"), name="busy")
    sr = xapi.sr(sr_uuid)
    disk = xapi.vdi_create(sr_uuid, "4M")
    with open_sr(sr) as attached:
        with attached.image_lock(VolumeLocation.parse(disk["uri"][0]).image):
            started = time.time()
            status, out, _ = run_script(plugin_root, "Volume.snapshot", json.dumps(
                {"dbg": "b", "sr": sr, "key": disk["key"]}))
            took = time.time() - started
    assert status == 1 and out["params"][0] == "Busy", out
    assert took < bounds.call(5)
    xapi.vdi_destroy(sr_uuid, disk["key"])
    xapi.sr_destroy(sr_uuid)


def test_diagnostics_has_one_bound_however_many_srs(xapi, plugin_root, fragile_cluster):
    """Ten SRs whose OSD is down, each worth a bound of its own: Plugin.diagnostics
    answers within one, with what it found by then."""
    config = {"pool": fragile_cluster.pool, "conf": fragile_cluster.conf,
              "user": fragile_cluster.user, "keyring": fragile_cluster.keyring,
              "timeout": "5"}
    srs = [xapi.sr_create(config, name="diagnosed %d" % n) for n in range(10)]
    fragile_cluster.stop_osd()
    try:
        started = time.time()
        status, out, _ = run_script(plugin_root, "Plugin.diagnostics", '{"dbg": "d"}')
        took = time.time() - started
    finally:
        fragile_cluster.start_osd()
    assert status == 0
    report = json.loads(out)  # the call's result: a JSON document as text
    attached = os.path.join(os.environ["XCP_RBD_RUN_DIR"], "attached")
    bound = bounds.call(max(  # ours, and any left attached
        SrLocation.parse(open(os.path.join(attached, name)).read()).cluster.timeout
        for name in os.listdir(attached)))
    assert took < bound + SLACK
    assert "unfinished" in report or all("error" in sr for sr in report["srs"]
                                         if sr["sr_uuid"] in srs)
    for sr_uuid in srs:
        xapi.sr_destroy(sr_uuid)
