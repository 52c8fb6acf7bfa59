"""Every Volume operation killed at random points, many times: each is retried as
XAPI would, the data of every disk is checked, then everything is destroyed and
collected, and the SR's namespace holds nothing (no image, no trash entry, no
record but the SR's). At timeout 5 here; at the default with `scripts/test
--long`. (What a crash can leave and the collector removes: gc.py.)"""

import json
import os
import random
import struct
import subprocess
import threading
import time
import warnings

import pytest
import rbd

from xcp_rbd import gc
from xcp_rbd.attached import open_sr
from xcp_rbd.metadata import LOCK_LEASE

MiB = 1 << 20
DISKS = 6
ROUNDS = 4


@pytest.fixture(params=[5, pytest.param(10, marks=pytest.mark.long)],
                ids=["timeout 5", "default timeout"])
def crash_sr(request, xapi, device_config):
    sr_uuid = xapi.sr_create(dict(device_config, timeout=str(request.param)), name="crash")
    yield sr_uuid
    try:
        xapi.sr_destroy(sr_uuid)
    except Exception as exc:  # what the test reports already (sr_destroy unplugged it)
        print("the crash SR stays: %s" % exc)


def killed(plugin_root, command, params, delay):
    """Run `command` and SIGKILL it after `delay` seconds (it may have ended)."""
    script = os.path.join(plugin_root, "volume", "org.xen.xapi.storage.rbd", command)
    process = subprocess.Popen([script, "--json"], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.stdin.write(json.dumps(dict(params, dbg="crash")).encode() + b"\n")
    process.stdin.close()
    time.sleep(delay)
    process.kill()
    process.wait()


def operation(chooser, xapi, sr, disk):
    """(command, params) of a random operation on `disk`; a destroy gets a volume
    of its own."""
    command = chooser.choice(["Volume.create", "Volume.snapshot", "Volume.clone",
                              "Volume.set", "Volume.resize", "Volume.destroy"])
    if command == "Volume.create":
        return command, {"sr": sr, "name": "c", "description": "", "size": 4 * MiB,
                         "sharable": False}
    if command == "Volume.destroy":
        victim = xapi.volume("Volume.create", sr=sr, name="v", description="",
                             size=4 * MiB, sharable=False)
        return command, {"sr": sr, "key": victim["key"]}
    if command == "Volume.set":
        return command, {"sr": sr, "key": disk["key"], "k": "crash", "v": "yes"}
    if command == "Volume.resize":
        return command, {"sr": sr, "key": disk["key"], "new_size": 16 * MiB}
    return command, {"sr": sr, "key": disk["key"]}


def retried(xapi, command, params):
    """XAPI's caller trying again until the killed call's lock runs out (its lease);
    a destroy that the killed call had finished is done."""
    deadline = time.time() + LOCK_LEASE + 30
    while True:
        try:
            return xapi.volume(command, **params)
        except Exception as exc:  # xcp_rbd.xapi.PluginError
            if command == "Volume.destroy" and "Volume_does_not_exist" in str(exc):
                return None
            assert "Busy" in str(exc) and time.time() < deadline, exc
            time.sleep(2)


def test_killed_operations_lose_nothing_and_leave_nothing(xapi, crash_sr, plugin_root,
                                                          image_io, cluster):
    """Each disk in a thread of its own (a killed call holds its disk's lock until
    its lease runs out): ROUNDS random operations each killed at a random point."""
    sr = xapi.sr(crash_sr)
    disks = [xapi.vdi_create(crash_sr, "8M") for _ in range(DISKS)]
    data = [bytes([index + 1]) * MiB for index in range(len(disks))]
    for disk, content in zip(disks, data):
        image_io.write(disk, MiB, content)
    failures = []

    def crash(seed, disk):
        chooser = random.Random(seed)
        try:
            for _ in range(ROUNDS):
                command, params = operation(chooser, xapi, sr, disk)
                killed(plugin_root, command, params, chooser.uniform(0.02, 0.5))
                retried(xapi, command, params)
        except Exception as exc:  # reported below
            failures.append(exc)
    threads = [threading.Thread(target=crash, args=(seed, disk))
               for seed, disk in enumerate(disks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for disk, content in zip(disks, data):
        assert image_io.read(disk, MiB, MiB) == content

    for volume in xapi.volume("SR.ls", sr=sr):
        retried(xapi, "Volume.destroy", {"sr": sr, "key": volume["key"]})
    # What a killed call holds runs out: its image lock, and the exclusive lock and
    # watch of the image it had open (osd_client_watch_timeout).
    with open_sr(sr) as attached:
        left = collected(attached, time.time() + LOCK_LEASE + 60)
        forgotten = left[:2] != ([], []) and forgotten_watches(attached, cluster)
        if forgotten:
            # Ceph's bug 58120 (Pacific's OSD): a client killed just as its watch
            # request reached the OSD leaves that watch in the object's info, with
            # no timeout, until the OSD loads the object again. What an operator
            # does about it (README, "A watch Ceph never expires"):
            warnings.warn("Ceph's bug 58120: watches no client holds, dropped with the "
                          "OSD's cache: %s" % forgotten)
            cluster.ceph("tell", "osd.0", "cache", "drop")
            left = collected(attached, time.time() + 60)
        assert left[:2] == ([], []), what_holds(attached, cluster, image_io)
    assert [field for field in left[2] if field.startswith("v.")] == []


def collected(attached, deadline):
    """Collect until the SR's namespace holds no image and no trash entry, or the
    deadline; returns (images, trash entries, index fields) left."""
    while True:
        gc.collect(attached, wait=120, full=True)
        left = (rbd.RBD().list(attached.ioctx),
                [entry["name"] for entry in rbd.RBD().trash_list(attached.ioctx)],
                sorted(attached.index.read()))
        if left[:2] == ([], []) or time.time() > deadline:
            return left
        time.sleep(3)


def forgotten_watches(attached, cluster):
    """Watchers of trashed images that the OSD lists from the object's info but does
    not hold in memory, so that no timeout can end them (Ceph's bug 58120)."""
    held = {(watch["entity_name"]["num"], watch["cookie"])
            for watch in cluster.ceph_json("tell", "osd.0", "dump_watchers")}
    forgotten = []
    for entry in rbd.RBD().trash_list(attached.ioctx):
        try:
            with rbd.Image(attached.ioctx, image_id=entry["id"], read_only=True) as image:
                forgotten += [watcher for watcher in image.watchers_list()
                              if (watcher["id"], watcher["cookie"]) not in held]
        except rbd.ImageNotFound:
            pass  # no header, no watch: what_holds tells
    return forgotten


def what_holds(attached, cluster, image_io):
    """Why trashed images stay, as text: each one's holders, which clients of the
    cluster are alive (the monitor's sessions), the OSD's own view of the watches
    (what it holds in memory), and the processes that could hold an image open."""
    trashed = [holders(attached, entry) for entry in rbd.RBD().trash_list(attached.ioctx)]
    headers = {"rbd_header." + entry["id"] for entry in rbd.RBD().trash_list(attached.ioctx)}
    processes = subprocess.run(["ps", "-ww", "-eo", "pid,etime,args"], stdout=subprocess.PIPE,
                               universal_newlines=True).stdout.splitlines()
    return "\n".join([
        "trashed images: %s" % json.dumps(trashed, default=str),
        "this test's clients: collector %d, image_io %d" % (
            attached.connection.rados.get_instance_id(), image_io.handle.get_instance_id()),
        "monitor sessions: %s" % json.dumps(
            [(session["global_id"], session["entity_name"],
              [a["nonce"] for a in session["addrs"]["addrvec"]])
             for session in cluster.ceph_json("tell", "mon.a", "sessions")]),
        "OSD watches: %s" % json.dumps(
            [watch for watch in cluster.ceph_json("tell", "osd.0", "dump_watchers")
             if watch.get("object") in headers]),
        "processes:"] + [line for line in processes
                         if "python" in line or "pytest" in line or "ceph-" in line])


def holders(attached, entry):
    """What keeps a trashed image: its trash state (MOVING: see gc.finish_move), its
    snapshots (all namespaces) with the children their header records (cls_rbd
    children_list, encoded, as stored: not what librbd makes of it), watchers and
    descendants."""
    try:
        with rbd.Image(attached.ioctx, image_id=entry["id"], read_only=True) as image:
            snapshots = list(image.list_snaps())
            for snap in snapshots:
                _, children = attached.ioctx.execute(
                    "rbd_header." + entry["id"], "rbd", "children_list",
                    struct.pack("<Q", snap["id"]))
                snap["children_list"] = children.hex()
            return {"image": entry["name"],
                    "trash_state": gc.trash_state(attached.ioctx, entry["id"]),
                    "snapshots": snapshots,
                    "watchers": list(image.watchers_list()),
                    "children": list(image.list_descendants())}
    except Exception as exc:
        return {"image": entry["name"], "error": repr(exc)}
