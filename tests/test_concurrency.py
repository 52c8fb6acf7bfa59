"""Scripts run in parallel (xapi >= 25.6 runs them concurrently, from several hosts):
mixed operations on one SR must all succeed and leave SR.ls consistent with the cluster."""

import json
import threading

import rbd

from xcp_rbd import gc
from xcp_rbd.attached import open_sr

WORKERS = 8
ROUNDS = 3


def worker(xapi, sr_uuid, sr, index, expected, errors):
    try:
        for round_ in range(ROUNDS):
            vdi = xapi.vdi_create(sr_uuid, "4M", name="w%d-r%d" % (index, round_))
            snap = xapi.vdi_snapshot(sr_uuid, vdi["key"])
            xapi.volume("Volume.set", sr=sr, key=vdi["key"], k="worker", v=str(index))
            clone = xapi.vdi_clone(sr_uuid, snap["key"])
            xapi.vdi_param_set(sr_uuid, clone["key"], name="clone-%d" % index)
            copy = xapi.vdi_clone(sr_uuid, vdi["key"])
            if round_ % 2:
                xapi.vdi_destroy(sr_uuid, vdi["key"])   # a disk that has snapshots
                xapi.vdi_destroy(sr_uuid, copy["key"])
                expected[snap["key"]] = {"name": vdi["name"]}
            else:
                xapi.vdi_destroy(sr_uuid, snap["key"])  # a snapshot that has a clone
                expected[vdi["key"]] = {"name": vdi["name"], "worker": str(index)}
                expected[copy["key"]] = {"name": vdi["name"]}
            expected[clone["key"]] = {"name": "clone-%d" % index}
    except Exception as exc:  # reported by the test below
        errors.append("worker %d: %r" % (index, exc))


def check_cluster_matches(sr, listed):
    """Every listed volume exists on the cluster, and after collection nothing else."""
    with open_sr(sr) as attached:
        gc.collect(attached, wait=120)
        remains = set(attached.remains())
        referenced_images = set()
        for volume in listed:
            where = volume["uri"][0]
            image = where.split("?")[0].rsplit("/", 1)[1]
            referenced_images.add(image)
            with attached.image(image, read_only=True) as opened:
                snaps = {s["name"] for s in opened.list_snaps()
                         if s["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_USER}
            if not volume["read_write"]:
                assert volume["key"] in snaps
        assert remains == referenced_images


def test_parallel_mixed_operations(xapi, sr_uuid, sr):
    expected = {}
    errors = []
    threads = [threading.Thread(target=worker, args=(xapi, sr_uuid, sr, i, expected, errors))
               for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    listed = {v["key"]: v for v in xapi.sr_scan(sr_uuid)}
    assert set(listed) == set(expected)
    for key, want in expected.items():
        assert listed[key]["name"] == want["name"]
        if "worker" in want:
            assert listed[key]["keys"]["worker"] == want["worker"]
    check_cluster_matches(sr, list(listed.values()))


def test_parallel_sets_on_one_volume(xapi, sr_uuid, sr):
    vdi = xapi.vdi_create(sr_uuid, "4M")
    errors = []

    def set_keys(index):
        try:
            for n in range(3):
                xapi.volume("Volume.set", sr=sr, key=vdi["key"], k="k%d-%d" % (index, n),
                            v=json.dumps([index, n]))
            xapi.volume("Volume.set_name", sr=sr, key=vdi["key"], new_name="n%d" % index)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=set_keys, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stat = xapi.volume("Volume.stat", sr=sr, key=vdi["key"])
    for index in range(WORKERS):
        for n in range(3):
            assert json.loads(stat["keys"]["k%d-%d" % (index, n)]) == [index, n]
    assert stat["name"] in {"n%d" % i for i in range(WORKERS)}


def test_parallel_snapshots_of_one_disk(xapi, sr_uuid, sr):
    vdi = xapi.vdi_create(sr_uuid, "4M")
    snaps = []
    errors = []

    def snapshot():
        try:
            snaps.append(xapi.volume("Volume.snapshot", sr=sr, key=vdi["key"])["key"])
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=snapshot) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    listed = {v["key"] for v in xapi.sr_scan(sr_uuid)}
    assert listed == set(snaps) | {vdi["key"]}
