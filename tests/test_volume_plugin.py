"""The volume plugin end to end: installed scripts, a real cluster, XAPI's sequences."""

import json
import os

import pytest

from conftest import run_script

MiB = 1 << 20


def keys_of(volumes):
    return {v["key"]: v for v in volumes}


def test_install_has_one_link_per_command(plugin_root):
    from xcp_rbd.volume_plugin import COMMANDS
    directory = os.path.join(plugin_root, "volume", "org.xen.xapi.storage.rbd")
    links = {name for name in os.listdir(directory) if os.path.islink(os.path.join(directory, name))}
    assert links == set(COMMANDS)
    for name in links:
        assert os.access(os.path.join(directory, name), os.X_OK)


def test_query_documents_configuration(xapi):
    query = xapi.volume("Plugin.Query")
    assert query["plugin"] == "rbd"
    assert query["required_api_version"] == "5.0"
    assert {"pool", "namespace", "conf", "user", "keyring", "mon_host", "cluster"} <= set(
        query["configuration"])
    assert {"VDI_SNAPSHOT", "VDI_CLONE", "VDI_RESIZE", "THIN_PROVISIONING"} <= set(
        query["features"])


def test_sr_lifecycle(xapi, sr_uuid, device_config, cluster):
    sr = xapi.sr(sr_uuid)
    # attach is idempotent and stable
    assert xapi.pbd_plug(sr_uuid) == sr
    stat = xapi.volume("SR.stat", sr=sr)
    assert stat["uuid"] == sr_uuid and stat["name"] == "test SR"
    assert stat["total_space"] >= stat["free_space"] > 0  # equal while the pool is empty
    assert stat["health"][0] == "Healthy"
    xapi.volume("SR.set_name", sr=sr, new_name="renamed")
    xapi.volume("SR.set_description", sr=sr, new_description="described")
    stat = xapi.volume("SR.stat", sr=sr)
    assert (stat["name"], stat["description"]) == ("renamed", "described")
    # the SR's own namespace exists on the cluster
    config = xapi._state()["device_config"][sr_uuid]
    assert config["sr_uuid"] == sr_uuid
    assert config["namespace"] in cluster.rbd("namespace", "ls", cluster.pool)
    # detach twice is fine
    xapi.pbd_unplug(sr_uuid)
    xapi.volume("SR.detach", sr=sr)
    xapi.pbd_plug(sr_uuid)


def test_probe_finds_sr(xapi, sr_uuid, device_config):
    results = xapi.sr_probe(device_config)
    found = [r for r in results if r["configuration"].get("sr_uuid") == sr_uuid]
    assert len(found) == 1
    assert found[0]["complete"] is True
    assert found[0]["sr"]["name"] == "test SR"
    only = xapi.sr_probe(dict(device_config, sr_uuid=sr_uuid))
    assert [r["configuration"]["sr_uuid"] for r in only] == [sr_uuid]
    pools = xapi.sr_probe({k: v for k, v in device_config.items() if k != "pool"})
    assert any(r["configuration"]["pool"] == device_config["pool"] and not r["complete"]
               for r in pools)


def test_sr_create_in_given_namespace(xapi, cluster, device_config):
    cluster.rbd("namespace", "create", "%s/given" % cluster.pool)
    sr_uuid = xapi.sr_create(dict(device_config, namespace="given"), name="ns")
    vdi = xapi.vdi_create(sr_uuid, "4M")
    assert "/given/" in vdi["uri"][0]
    xapi.sr_destroy(sr_uuid)
    assert "given" in cluster.rbd("namespace", "ls", cluster.pool)  # not ours to remove
    assert cluster.rbd("ls", "%s/given" % cluster.pool).strip() == ""


def test_volume_lifecycle(xapi, sr_uuid, sr):
    vdi = xapi.vdi_create(sr_uuid, 10 * MiB + 1, name="disk0", description="first")
    key = vdi["key"]
    assert vdi["uuid"] == key and vdi["read_write"] is True
    assert vdi["virtual_size"] >= 10 * MiB + 1
    assert vdi["uri"][0].startswith("rbd+tapdisk://")
    stat = xapi.volume("Volume.stat", sr=sr, key=key)
    assert stat["keys"] == {"vdi-type": "user"}
    xapi.volume("Volume.set", sr=sr, key=key, k="_sm_config_x", v="1")
    xapi.volume("Volume.unset", sr=sr, key=key, k="_sm_config_x")
    xapi.volume("Volume.unset", sr=sr, key=key, k="never-set")
    xapi.vdi_param_set(sr_uuid, key, name="disk1", description="second")
    stat = xapi.vdi_resize(sr_uuid, key, 20 * MiB)
    assert stat["virtual_size"] == 20 * MiB
    assert (stat["name"], stat["description"]) == ("disk1", "second")
    assert keys_of(xapi.sr_scan(sr_uuid))[key]["keys"] == {"vdi-type": "user"}
    xapi.vdi_destroy(sr_uuid, key)
    assert key not in keys_of(xapi.sr_scan(sr_uuid))
    # destroy of a key already destroyed succeeds (xapi does it for clone-on-boot)
    xapi.volume("Volume.destroy", sr=sr, key=key)


def test_snapshot_keeps_name_and_not_keys(xapi, sr_uuid, sr):
    vdi = xapi.vdi_create(sr_uuid, 8 * MiB, name="vm disk", description="d")
    xapi.volume("Volume.set", sr=sr, key=vdi["key"], k="custom", v="value")
    snap = xapi.vdi_snapshot(sr_uuid, vdi["key"])
    assert snap["read_write"] is False
    assert (snap["name"], snap["description"]) == ("vm disk", "d")
    assert snap["keys"]["snapshot_of"] == vdi["key"]
    assert snap["keys"]["is_a_snapshot"] == "true"
    assert "custom" not in snap["keys"]
    clone = xapi.vdi_clone(sr_uuid, snap["key"])
    assert clone["read_write"] is True and clone["keys"] == {}
    assert clone["name"] == "vm disk"
    listed = keys_of(xapi.sr_scan(sr_uuid))
    assert listed[snap["key"]]["keys"]["snapshot_of"] == vdi["key"]
    assert set(listed) == {vdi["key"], snap["key"], clone["key"]}


def test_revert_reads_snapshot_data(xapi, sr_uuid, image_io):
    vdi = xapi.vdi_create(sr_uuid, 16 * MiB)
    image_io.write(vdi, 0, b"before" * 1000)
    image_io.write(vdi, 12 * MiB, b"tail-before")
    snap = xapi.vdi_snapshot(sr_uuid, vdi["key"])
    image_io.write(vdi, 0, b"AFTER!" * 1000)
    image_io.write(vdi, 12 * MiB, b"tail-AFTER!")
    reverted = xapi.snapshot_revert(sr_uuid, snap["key"], vdi["key"])
    assert image_io.read(reverted, 0, 6000) == b"before" * 1000
    assert image_io.read(reverted, 12 * MiB, 11) == b"tail-before"
    assert image_io.read(snap, 0, 6) == b"before"
    listed = keys_of(xapi.sr_scan(sr_uuid))
    assert vdi["key"] not in listed
    assert set(listed) == {snap["key"], reverted["key"]}
    # the reverted disk is writable and independent of the snapshot
    image_io.write(reverted, 0, b"new")
    assert image_io.read(snap, 0, 6) == b"before"


def test_clone_of_writable_volume(xapi, sr_uuid, image_io):
    vdi = xapi.vdi_create(sr_uuid, 8 * MiB)
    image_io.write(vdi, 4096, b"golden image")
    clone = xapi.vdi_clone(sr_uuid, vdi["key"])
    assert image_io.read(clone, 4096, 12) == b"golden image"
    image_io.write(vdi, 4096, b"changed orig")
    assert image_io.read(clone, 4096, 12) == b"golden image"
    # no visible snapshot is left behind on the source
    assert set(keys_of(xapi.sr_scan(sr_uuid))) == {vdi["key"], clone["key"]}
    xapi.vdi_destroy(sr_uuid, vdi["key"])
    assert image_io.read(clone, 4096, 12) == b"golden image"


def test_destroy_disk_with_snapshots_and_snapshot_with_clones(xapi, sr_uuid, sr, image_io):
    vdi = xapi.vdi_create(sr_uuid, 8 * MiB)
    image_io.write(vdi, 0, b"gen1")
    snap1 = xapi.vdi_snapshot(sr_uuid, vdi["key"])
    snap2 = xapi.vdi_snapshot(sr_uuid, vdi["key"])
    clone = xapi.vdi_clone(sr_uuid, snap2["key"])
    xapi.vdi_destroy(sr_uuid, vdi["key"])       # disk with snapshots
    xapi.vdi_destroy(sr_uuid, snap2["key"])     # snapshot with a clone
    assert set(keys_of(xapi.sr_scan(sr_uuid))) == {snap1["key"], clone["key"]}
    assert image_io.read(clone, 0, 4) == b"gen1"
    assert image_io.read(snap1, 0, 4) == b"gen1"
    xapi.vdi_destroy(sr_uuid, snap1["key"])
    xapi.vdi_destroy(sr_uuid, clone["key"])
    xapi.volume("Volume.destroy", sr=sr, key=clone["key"])  # XAPI's clone-on-boot quirk
    assert xapi.sr_scan(sr_uuid) == []


def test_sr_destroy_leaves_nothing(xapi, device_config, cluster):
    sr_uuid = xapi.sr_create(device_config, name="short-lived")
    namespace = xapi._state()["device_config"][sr_uuid]["namespace"]
    vdi = xapi.vdi_create(sr_uuid, "8M")
    snap = xapi.vdi_snapshot(sr_uuid, vdi["key"])
    xapi.vdi_clone(sr_uuid, snap["key"])
    xapi.vdi_clone(sr_uuid, vdi["key"])
    xapi.sr_destroy(sr_uuid)
    assert namespace not in cluster.rbd("namespace", "ls", cluster.pool)
    assert sr_uuid not in json.dumps(xapi.sr_probe(device_config))


def test_errors_are_clear_and_change_nothing(xapi, sr_uuid, sr, plugin_root, device_config):
    vdi = xapi.vdi_create(sr_uuid, 8 * MiB)
    before = xapi.sr_scan(sr_uuid)

    def fails(command, **params):
        params.setdefault("dbg", "test")
        status, out, err = run_script(plugin_root, command, json.dumps(params))
        assert status == 1
        assert set(out) == {"code", "params", "backtrace"}
        assert set(out["backtrace"]) == {"error", "files", "lines"}
        assert all(isinstance(p, str) for p in out["params"])
        return out

    shrink = fails("Volume.resize", sr=sr, key=vdi["key"], new_size=MiB)
    assert shrink["code"] == "SR_BACKEND_FAILURE_79"
    assert "shrinking not allowed" in shrink["params"][1]
    unknown = fails("Volume.stat", sr=sr, key="no-such-key")
    assert unknown["params"] == ["Volume_does_not_exist", "no-such-key"]
    assert fails("Volume.snapshot", sr=sr, key="no-such-key")["params"][0] == \
        "Volume_does_not_exist"
    missing = fails("Volume.create", sr=sr, name="x", description="", size=1)
    assert "sharable" in missing["params"][1] and "missing" in missing["params"][1]
    typed = fails("Volume.create", sr=sr, name="x", description="", size="big",
                  sharable=False)
    assert "size" in typed["params"][1]
    status, out, _ = run_script(plugin_root, "Volume.stat", "{not json")
    assert status == 1 and out["params"][0] == "Invalid_parameters"
    nopool = fails("SR.create", uuid="x", name="", description="",
                   configuration=dict(device_config, pool="no-such-pool"))
    assert nopool["params"][0] == "Ceph_pool_missing" and "no-such-pool" in nopool["params"][1]
    nouser = fails("SR.create", uuid="y", name="", description="",
                   configuration=dict(device_config, user="nobody"))
    assert nouser["params"][0] in ("Ceph_permission_denied", "Ceph_unreachable")
    nokeyring = fails("SR.create", uuid="z", name="", description="",
                      configuration=dict(device_config, keyring="/nonexistent/keyring"))
    assert "/nonexistent/keyring" in nokeyring["params"][1]
    assert xapi.sr_scan(sr_uuid) == before
    assert not [r for r in xapi.sr_probe(device_config)
                if r["configuration"]["sr_uuid"] in ("x", "y", "z")]


def test_script_without_json_flag_fails_cleanly(plugin_root):
    status, out, _ = run_script(plugin_root, "Plugin.Query", "{}", args=())
    assert status == 1 and out["params"][0] == "Invalid_parameters"


def test_diagnostics_reports_attached_srs(xapi, sr_uuid):
    xapi.vdi_create(sr_uuid, "4M")
    report = json.loads(xapi.volume("Plugin.diagnostics"))
    mine = [s for s in report["srs"] if s["sr_uuid"] == sr_uuid]
    assert mine and mine[0]["volumes"] == 1


@pytest.mark.parametrize("size", [0, 1, 4095])
def test_odd_sizes(xapi, sr_uuid, size):
    vdi = xapi.vdi_create(sr_uuid, size)
    assert vdi["virtual_size"] >= size


def test_sr_create_refuses_non_rbd_pool_and_read_only_user(xapi, cluster, device_config,
                                                          plugin_root, tmp_path):
    cluster.ceph("osd", "pool", "create", "plain", "8")
    with pytest.raises(Exception) as refused:
        xapi.sr_create(dict(device_config, pool="plain"))
    assert refused.value.params[0] == "Ceph_pool_not_rbd"
    assert "rbd pool init plain" in refused.value.params[1]
    keyring = str(tmp_path / "reader.keyring")
    cluster.ceph("auth", "get-or-create", "client.reader", "mon", "profile rbd", "osd",
                 "profile rbd-read-only pool=%s" % cluster.pool, "-o", keyring)
    with pytest.raises(Exception) as refused:
        xapi.sr_create(dict(device_config, user="reader", keyring=keyring))
    assert refused.value.params[0] == "Ceph_permission_denied"
    assert "client.reader" in refused.value.params[1]
    namespaces = cluster.rbd("namespace", "ls", cluster.pool)
    assert not [r for r in xapi.sr_probe(device_config)
                if r["configuration"]["namespace"] not in namespaces]
