#!/usr/bin/python3
"""The demo: what an XCP-ng administrator's day looks like on an rbd SR.

Starts a throwaway one-node Ceph cluster, installs the plugins into a temporary
prefix with CMake, then drives them with xcp-rbd-xapi exactly as XAPI would:
sr-create, vdi-create, a snapshot, a revert, a clone, a scan, destroys, the
collector and sr-destroy, printing every command and what it answered.
Everything is removed at the end. Run with /usr/bin/python3 (or the project's
.venv): scripts/demo.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ceph_cluster import LocalCluster  # noqa: E402
from install_tree import install  # noqa: E402


def say(text):
    print("\n== %s" % text)
    sys.stdout.flush()


class Admin(object):
    """Types xcp-rbd-xapi commands and shows what they answer."""

    def __init__(self, tool, state):
        self.tool = tool
        self.state = state

    def __call__(self, *args, **show):
        argv = [self.tool, "--state", self.state] + list(args)
        print("$ xcp-rbd-xapi %s" % " ".join(args))
        sys.stdout.flush()
        out = subprocess.check_output(argv).decode("utf-8")
        result = json.loads(out) if out.strip() else None
        brief = show.get("brief")
        if brief:
            print("  " + brief(result))
        return result


def disk_line(vdi):
    kind = "snapshot" if not vdi["read_write"] else "disk"
    return "%s %s  name=%r  size=%d MiB  keys=%s" % (
        kind, vdi["key"], vdi["name"], vdi["virtual_size"] >> 20, json.dumps(vdi["keys"]))


def main():
    with tempfile.TemporaryDirectory(prefix="xcp-rbd-demo-") as work:
        os.environ["XCP_RBD_RUN_DIR"] = os.path.join(work, "run")
        say("Installing the plugins with CMake into %s" % os.path.join(work, "prefix"))
        install(os.path.join(work, "prefix"))
        say("Starting a throwaway Ceph cluster (1 mon, 1 mgr, 1 osd, cephx) on loopback")
        with LocalCluster(os.path.join(work, "ceph")) as cluster:
            print("  monitors %s, pool %s, user client.%s (keyring %s)"
                  % (cluster.mon_host, cluster.pool, cluster.user, cluster.keyring))
            xe = Admin(os.path.join(work, "prefix", "bin", "xcp-rbd-xapi"),
                       os.path.join(work, "xapi-state.json"))
            config = ["-d", "pool=%s" % cluster.pool, "-d", "conf=%s" % cluster.conf,
                      "-d", "user=%s" % cluster.user, "-d", "keyring=%s" % cluster.keyring]

            say("xe sr-create type=rbd: SR.create, then PBD.plug (SR.attach + SR.stat)")
            sr = xe("sr-create", "--name", "Ceph RBD", *config, brief=lambda r: "SR " + r)
            xe("sr-stat", sr, brief=lambda r: "%s: %d GiB free of %d GiB, health %s" % (
                r["name"], r["free_space"] >> 30, r["total_space"] >> 30, r["health"][0]))

            say("xe vdi-create: Volume.create + Volume.set vdi-type")
            disk = xe("vdi-create", sr, "--size", "1G", "--name", "web01 root",
                      brief=disk_line)
            data = xe("vdi-create", sr, "--size", "10G", "--name", "web01 data",
                      brief=disk_line)

            say("xe vm-snapshot: Volume.snapshot + five Volume.set per disk (an RBD snapshot)")
            snap = xe("vdi-snapshot", sr, disk["key"], brief=disk_line)

            say("xe snapshot-revert: XAPI destroys the live disk, then clones the snapshot;"
                " the plugin adopts the old image (one rollback, no copy, no chain)")
            reverted = xe("snapshot-revert", sr, snap["key"], disk["key"], brief=disk_line)

            say("xe vm-clone / vdi-clone: an RBD clone v2, whatever its size")
            clone = xe("vdi-clone", sr, data["key"], brief=disk_line)
            xe("vdi-resize", sr, clone["key"], "--size", "20G", brief=disk_line)

            say("xe sr-scan: SR.stat + SR.ls (one read of the SR index)")
            for vdi in xe("sr-scan", sr):
                print("  " + disk_line(vdi))

            say("Destroying the disks in any order: what Ceph cannot delete yet is hidden")
            xe("vdi-destroy", sr, data["key"])
            xe("vdi-destroy", sr, reverted["key"])
            xe("diagnostics", brief=lambda r: "hidden images: %s" % (
                r["srs"][0]["hidden_images"],))
            xe("vdi-destroy", sr, snap["key"])
            xe("vdi-destroy", sr, clone["key"])

            say("The collector reclaims the rest in the background (here: in the foreground)")
            xe("gc", sr, brief=lambda r: "%s; now hidden: %s, awaiting collection: %s" % (
                "; ".join(r["actions"]) or "the background collectors had done it all",
                r["status"]["hidden_images"] or "none",
                r["status"]["awaiting_collection"] or "none"))

            say("xe sr-destroy")
            xe("sr-destroy", sr)
            print("  namespaces left in pool %s: %s" % (
                cluster.pool, cluster.rbd("namespace", "ls", cluster.pool).split() or "none"))
        say("Cluster stopped and removed. Done.")


if __name__ == "__main__":
    main()
