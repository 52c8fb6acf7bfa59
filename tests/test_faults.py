"""Every fault an operator meets, named: a cluster of its own made to fail in each
way (manager stopped or failing over to its standby, monitor stopped or frozen,
OSD stopped or frozen, pool or cluster full) while XAPI's calls run, all at once
as XAPI runs them. Each answers inside its bound
(bounds.call of the SR's timeout) with success or an error that names the
cause; once the fault is lifted, SR.ls agrees with Ceph after a collection,
every call that failed succeeds when retried, and no volume lost a byte.

At timeout 5 here; at the default (10) with `scripts/test --long`. And an SR
made on a pool seconds old serves every call at once."""

import json
import os
import threading
import time

import pytest

from ceph_cluster import MON, OSD, LocalCluster
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


FULL_RATIOS = ("nearfull", "backfillfull", "full")  # the order the OSD map wants


def cluster_full(cluster):
    """Every OSD over its full ratio (the OSD takes the highest of the three)."""
    for ratio, value in zip(FULL_RATIOS, ("0.0001", "0.0002", "0.0003")):
        cluster.ceph("osd", "set-%s-ratio" % ratio, value)
    until("the OSD to be full", lambda: "OSD_FULL" in json.dumps(
        cluster.ceph("health", "detail", "--format=json")))


def cluster_emptied(cluster):
    for ratio, value in reversed(list(zip(FULL_RATIOS, ("0.85", "0.90", "0.95")))):
        cluster.ceph("osd", "set-%s-ratio" % ratio, value)
    cluster.wait_ready()


def thawed(daemon):
    def thaw(cluster):
        cluster.thaw(daemon)
        cluster.wait_ready()
    return thaw


UNANSWERED = ["cannot connect", "did not answer"]
# fault -> (cause it, lift it, words of which an error must say one)
FAULTS = {
    "manager stopped": (lambda c: c.stop_mgr(), lambda c: c.start_mgr(), ["manager"]),
    "manager failing over": (lambda c: c.kill_active_mgr(), lambda c: c.start_mgr(),
                             ["manager"]),
    "monitor stopped": (lambda c: c.stop_mon(), lambda c: c.start_mon(), UNANSWERED),
    "monitor frozen": (lambda c: c.freeze(MON), thawed(MON), UNANSWERED),
    "OSD stopped": (lambda c: c.stop_osd(), lambda c: c.start_osd(), ["did not answer"]),
    "OSD frozen": (lambda c: c.freeze(OSD), thawed(OSD), ["did not answer"]),
    "pool full": (pool_full, pool_emptied, ["is full"]),
    "cluster full": (cluster_full, cluster_emptied, ["is full"]),
}
# After a frozen daemon, Pacific's one OSD was seen to keep laggy PGs and slow ops
# for minutes: each such fault gets a cluster of its own.
OWN_CLUSTER = {"monitor frozen", "OSD frozen"}
# What reads alone answers when the pool or cluster is full (a VM's start needs
# Volume.stat).
READS = {"SR.stat", "SR.ls", "Volume.stat", "Plugin.diagnostics"}


@pytest.fixture
def fault_cluster(request, fragile_cluster, tmp_path):
    """The module's cluster, or one of the test's own (OWN_CLUSTER)."""
    if request.node.callspec.params["fault"] not in OWN_CLUSTER:
        yield fragile_cluster
        return
    with LocalCluster(str(tmp_path / "own-cluster"), managers=2) as own:
        yield own


@pytest.fixture(params=[5, pytest.param(10, marks=pytest.mark.long)],
                ids=["timeout 5", "default timeout"])
def faulty_sr(request, xapi, fault_cluster):
    sr_uuid = xapi.sr_create(sr_config(fault_cluster, request.param), name="faulty")
    yield sr_uuid, request.param
    xapi.sr_destroy(sr_uuid)


def sr_config(cluster, timeout, pool=None):
    return {"pool": pool or cluster.pool, "conf": cluster.conf, "user": cluster.user,
            "keyring": cluster.keyring, "timeout": str(timeout)}


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
        xapi, plugin_root, fault_cluster, faulty_sr, fault):
    sr_uuid, timeout = faulty_sr
    cause, lift, words = FAULTS[fault]
    disk = xapi.vdi_create(sr_uuid, "8M")
    scratch = xapi.vdi_create(sr_uuid, "4M")
    data = bytes(range(256)) * 4096
    io = ImageIO(fault_cluster)
    io.write(disk, 0, data)
    commands = calls(xapi, sr_uuid, disk["key"], scratch["key"])
    cause(fault_cluster)
    try:
        results = run_all(plugin_root, commands)
    finally:
        lift(fault_cluster)
    bound = bounds.call(timeout) + SLACK
    failed = {}
    for command, (status, out, seconds) in sorted(results.items()):
        assert seconds < bound, "%s took %.0f s (%s)" % (command, seconds, out)
        if status != 0:
            assert not (fault.endswith("full") and command in READS), (command, out)
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


def test_a_pool_seconds_old_serves_every_call(xapi, plugin_root, fragile_cluster):
    """The administrator makes a pool and the SR on it straight away (its PGs may
    still be peering, the manager's statistics do not list it yet): SR.create and
    then every call at once succeed, each inside its bound."""
    fragile_cluster.add_pool("young")
    started = time.time()
    sr_uuid = xapi.sr_create(sr_config(fragile_cluster, 5, pool="young"), name="young")
    assert time.time() - started < bounds.call(5) + SLACK
    disk = xapi.vdi_create(sr_uuid, "8M")
    scratch = xapi.vdi_create(sr_uuid, "4M")
    results = run_all(plugin_root, calls(xapi, sr_uuid, disk["key"], scratch["key"]))
    for command, (status, out, seconds) in sorted(results.items()):
        assert status == 0 and seconds < bounds.call(5) + SLACK, (command, out, seconds)
    xapi.sr_destroy(sr_uuid)


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
    srs = [xapi.sr_create(sr_config(fragile_cluster, 5), name="diagnosed %d" % n)
           for n in range(10)]
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
