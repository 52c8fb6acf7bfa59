"""SR health and capacity that are about this SR, and the flatten guard that does not
trust a manager that does not answer: a real cluster made to misbehave."""

import json
import time

import pytest

from xcp_rbd import flatten, gc, records
from xcp_rbd.attached import open_sr
from xcp_rbd.location import VolumeLocation
from xcp_rbd.xapi import PluginError

MiB = 1 << 20


def sr_stat(xapi, sr_uuid):
    return xapi.volume("SR.stat", sr=xapi.sr(sr_uuid))


def test_sr_stat_answers_without_the_managers_statistics(xapi, cluster, device_config):
    """A manager stopped, then a pool created: `ceph df` does not list the pool, and
    the SR on it still plugs and answers SR.stat, saying what it could not know."""
    cluster.stop_mgr()
    try:
        cluster.add_pool("fresh")
        sr_uuid = xapi.sr_create(dict(device_config, pool="fresh"), name="fresh pool")
        stat = sr_stat(xapi, sr_uuid)
        assert stat["uuid"] == sr_uuid and stat["name"] == "fresh pool"
        assert 0 < stat["free_space"] <= stat["total_space"]
        assert "not in the manager's statistics" in stat["health"][1]
        xapi.sr_destroy(sr_uuid)
    finally:
        cluster.start_mgr()


def test_an_unrelated_health_error_leaves_the_sr_healthy(xapi, sr_uuid, cluster):
    """A CephFS with no MDS is HEALTH_ERR for the cluster and nothing to this SR:
    sr-scan must go on (xapi fails it for an Unavailable SR)."""
    cluster.ceph("osd", "pool", "create", "fs-meta", "8")
    cluster.ceph("osd", "pool", "create", "fs-data", "8")
    cluster.ceph("fs", "new", "unrelated", "fs-meta", "fs-data")
    try:
        until_health = time.time() + 30
        while cluster.ceph_json("health")["status"] != "HEALTH_ERR":
            assert time.time() < until_health, "no HEALTH_ERR from a CephFS without MDS"
            time.sleep(0.5)
        assert sr_stat(xapi, sr_uuid)["health"][0] == "Healthy"
        assert xapi.sr_scan(sr_uuid) == []
    finally:
        cluster.ceph("fs", "fail", "unrelated")
        cluster.ceph("fs", "rm", "unrelated", "--yes-i-really-mean-it")
        for pool in ("fs-meta", "fs-data"):
            cluster.ceph("osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it")


def test_an_unreachable_cluster_is_unreachable_health(xapi, device_config, cluster):
    sr_uuid = xapi.sr_create(dict(device_config, timeout="2"), name="far away")
    cluster.stop_mon()
    try:
        stat = sr_stat(xapi, sr_uuid)
        with pytest.raises(PluginError) as scan:
            xapi.sr_scan(sr_uuid)
    finally:
        cluster.start_mon()
    assert stat["health"][0] == "Unreachable" and stat["uuid"] == sr_uuid
    assert scan.value.code == "SR_UNHEALTHY"
    assert scan.value.params == [sr_uuid, "Unreachable", "try again later"]
    xapi.sr_destroy(sr_uuid)


def test_probe_by_sr_uuid_without_pool_finds_it_complete(xapi, sr_uuid, device_config):
    config = {k: v for k, v in device_config.items() if k != "pool"}
    results = xapi.sr_probe(dict(config, sr_uuid=sr_uuid))
    assert [r["configuration"]["sr_uuid"] for r in results] == [sr_uuid]
    assert results[0]["complete"] is True and results[0]["sr"]["uuid"] == sr_uuid
    assert all(r["complete"] for r in results)


@pytest.mark.parametrize("silence", ["manager refuses", "manager stopped"])
def test_snapshot_waits_for_a_flatten_the_manager_does_not_report(
        xapi, device_config, cluster, image_io, silence):
    """While Ceph's manager flattens a disk and does not say so (the user's mgr caps
    revoked; the manager stopped, its persistent task waiting for it), a snapshot of
    the disk either waits until the flatten has ended or fails with Busy; it is never
    taken while the flatten may run."""
    sr_uuid = xapi.sr_create(dict(device_config, max_chain_depth="1", timeout="3"),
                             name="flatten guard")
    sr = xapi.sr(sr_uuid)
    disk = xapi.vdi_create(sr_uuid, 512 * MiB)
    objects = range(0, 512 * MiB, 4 * MiB)
    for offset in objects:
        image_io.write(disk, offset, b"f" * (4 * MiB))
    deep = xapi.vdi_clone(sr_uuid, xapi.vdi_clone(sr_uuid, disk["key"])["key"])
    image = VolumeLocation.parse(deep["uri"][0]).image
    with open_sr(sr) as attached:
        gc.collect(attached, wait=60)          # queues the flatten in the manager
        job = json.loads(attached.index.read(prefix=records.JOB)[records.job_field(image)])
        assert job.get("task")
        saved = cluster.ceph_json("auth", "get", "client." + cluster.user)[0]["caps"]
        if silence == "manager stopped":
            cluster.stop_mgr()
        else:
            cluster.ceph("auth", "caps", "client." + cluster.user, "mon", saved["mon"],
                         "osd", saved["osd"])
        try:
            try:
                snapshot = xapi.vdi_snapshot(sr_uuid, deep["key"], xapi_keys=False)
                depth_then = flatten.chain_depth(attached, image)
            except PluginError as refused:
                assert refused.params[0] == "Busy"
                assert "does not say whether it runs" in refused.params[1]
                snapshot = None
        finally:
            if silence == "manager stopped":
                cluster.start_mgr()
            else:
                cluster.ceph("auth", "caps", "client." + cluster.user,
                             *[word for item in saved.items() for word in item])
        if snapshot is not None:
            assert depth_then == 0   # taken once the flatten was over, not during it
            data = image_io.read_at(snapshot, objects, 4)
            assert data == [b"ffff"] * len(objects)
        if silence == "manager stopped":   # the manager's queue resumes the flatten
            deadline = time.time() + 120
            while flatten.chain_depth(attached, image) and time.time() < deadline:
                time.sleep(1)
            assert flatten.chain_depth(attached, image) == 0
    xapi.sr_destroy(sr_uuid)


def test_chain_depth_of_an_image_gone_meanwhile_is_zero(sr):
    """(Plugin.diagnostics and the collector walk chains that a flatten or a destroy
    can end under them.)"""
    with open_sr(sr) as attached:
        assert flatten.chain_depth(attached, "no-such-image") == 0
