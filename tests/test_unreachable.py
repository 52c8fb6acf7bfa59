"""A cluster that stops answering: every command fails within its bound, clearly.

Neither XAPI nor xapi-storage-script bounds a script's run time, so a hung
script would hang the administrator's operation."""

import json
import time

import pytest

from conftest import run_script
from xcp_rbd import bounds

TIMEOUT = 2                    # device-config:timeout of the SR
BOUND = bounds.call(TIMEOUT)   # what cluster.Connection promises, at most


@pytest.fixture
def fragile_sr(xapi, fragile_cluster):
    config = {"pool": fragile_cluster.pool, "conf": fragile_cluster.conf,
              "user": fragile_cluster.user, "keyring": fragile_cluster.keyring,
              "timeout": str(TIMEOUT)}
    sr_uuid = xapi.sr_create(config, name="fragile")
    vdi = xapi.vdi_create(sr_uuid, "4M")
    yield xapi.sr(sr_uuid), vdi["key"]
    xapi.sr_destroy(sr_uuid)  # no SR of a cluster that goes away stays attached


def timed_failure(plugin_root, command, **params):
    params["dbg"] = "test"
    started = time.time()
    status, out, _ = run_script(plugin_root, command, json.dumps(params))
    return status, out, time.time() - started


@pytest.mark.parametrize("how", ["frozen", "monitor stopped"])
def test_unanswering_cluster_fails_within_bound(plugin_root, fragile_cluster, fragile_sr, how):
    sr, key = fragile_sr
    if how == "frozen":
        fragile_cluster.freeze()
    else:
        fragile_cluster.stop_mon()
    try:
        # SR.stat answers: the SR is Unreachable (xapi retries, then says "try again later")
        status, out, elapsed = timed_failure(plugin_root, "SR.stat", sr=sr)
        assert status == 0 and out["health"][0] == "Unreachable", out
        assert elapsed < BOUND + 3, ("SR.stat", elapsed)
        for command, params in (("Volume.stat", {"key": key}),
                                ("Volume.snapshot", {"key": key}), ("SR.ls", {})):
            status, out, elapsed = timed_failure(plugin_root, command, sr=sr, **params)
            assert status == 1, command
            assert out["params"][0] == "Ceph_unreachable", out
            assert "did not answer" in out["params"][1] or "cannot connect" in out["params"][1]
            assert elapsed < BOUND + 3, (command, elapsed)
    finally:
        if how == "frozen":
            fragile_cluster.thaw()
        else:
            fragile_cluster.start_mon()
    # and once the cluster answers again, so does the SR
    status, out, _ = timed_failure(plugin_root, "Volume.stat", sr=sr, key=key)
    assert status == 0 and out["key"] == key


def test_stopped_osd_fails_writes_within_bound(plugin_root, fragile_cluster, fragile_sr):
    sr, key = fragile_sr
    fragile_cluster.stop_osd()
    try:
        status, out, elapsed = timed_failure(plugin_root, "Volume.set", sr=sr, key=key,
                                             k="a", v="b")
        assert status == 1 and out["params"][0] == "Ceph_unreachable"
        assert elapsed < BOUND + 3
    finally:
        fragile_cluster.start_osd()
