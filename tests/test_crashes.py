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
    except Exception as exc:  # what the test reports already: detach, leave the rest
        xapi.pbd_unplug(sr_uuid)
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
                                                          image_io):
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
    deadline = time.time() + LOCK_LEASE + 60
    with open_sr(sr) as attached:
        while True:
            gc.collect(attached, wait=120, full=True)
            left = (rbd.RBD().list(attached.ioctx),
                    [entry["name"] for entry in rbd.RBD().trash_list(attached.ioctx)],
                    sorted(attached.index.read()))
            if left[:2] == ([], []) or time.time() > deadline:
                break
            time.sleep(3)
        assert left[:2] == ([], []), [holders(attached, entry) for entry in
                                      rbd.RBD().trash_list(attached.ioctx)]
    assert [field for field in left[2] if field.startswith("v.")] == []


def holders(attached, entry):
    """What keeps a trashed image: its snapshots (all namespaces) with the children
    their header records (cls_rbd children_list, encoded, as stored: not what
    librbd makes of it), watchers and descendants."""
    try:
        with rbd.Image(attached.ioctx, image_id=entry["id"], read_only=True) as image:
            snapshots = list(image.list_snaps())
            for snap in snapshots:
                _, children = attached.ioctx.execute(
                    "rbd_header." + entry["id"], "rbd", "children_list",
                    struct.pack("<Q", snap["id"]))
                snap["children_list"] = children.hex()
            return {"image": entry["name"], "snapshots": snapshots,
                    "watchers": list(image.watchers_list()),
                    "children": list(image.list_descendants())}
    except Exception as exc:
        return {"image": entry["name"], "error": repr(exc)}
