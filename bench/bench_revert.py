#!/usr/bin/python3
"""Snapshots at Ceph speed for life: revert cost, background copies, chain
depth, SR.ls/SR.stat at scale and read latency after many reverts.

- revert = XAPI's sequence through the installed scripts (Volume.stat,
  Volume.destroy of the live disk, Volume.clone of the snapshot), on a disk with
  64 MiB written and on one with 4 GiB written, next to the flatten-based revert
  older drivers do (rbd clone of the snapshot, then rbd flatten) on the same data;
- native revert (Volume.revert, xapi 26.16 and later) next to the adoption revert;
- bytes the collector copied (flattens) over 50 write/snapshot/revert cycles,
  and the disk's clone-chain depth at the end;
- SR.ls and SR.stat with 2 000 volumes (snapshots included) next to `rbd ls -l`;
- 4 KiB random read latency straight through librbd (`rbd bench`, one thread;
  fio's rbd engine cannot open images in a namespace) after 1 and 50 cycles,
  next to a control disk that gets the same writes and never a snapshot.

The cluster uses BlueStore on a sparse file (not RAM), as real OSDs do.

    /usr/bin/python3 bench/bench_revert.py [--big 4G] [--cycles 50] [--volumes 2000]
"""

import argparse
import re
import subprocess

from common import environment, fill_sr, median_ms, print_table, timed

from xcp_rbd import flatten, gc
from xcp_rbd.attached import open_sr
from xcp_rbd.xapi import parse_size

MiB = 1 << 20


def image_of(volume):
    return volume["uri"][0].split("?")[0].rsplit("/", 1)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", default="4G")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--volumes", type=int, default=2000)
    args = parser.parse_args()
    big = parse_size(args.big)

    with environment(objectstore="bluestore", osd_bytes=4 * big + (8 << 30)) as (
            cluster, xapi, config):
        sr_uuid = xapi.sr_create(config, name="bench")
        sr = xapi.sr(sr_uuid)
        namespace = xapi._state()["device_config"][sr_uuid]["namespace"]

        cluster.rbd("namespace", "create", "%s/baseline" % cluster.pool)

        def spec(name):
            return "%s/%s/%s" % (cluster.pool, namespace, name)

        def write(volume, total, pattern="seq"):
            cluster.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-threads", "8",
                        "--io-total", str(total), "--io-pattern", pattern,
                        spec(image_of(volume)), timeout=1800)

        rows = []
        reverts = {}
        for label, size in (("64 MiB", 64 * MiB), (args.big, big)):
            disk = xapi.vdi_create(sr_uuid, big + 1024 * MiB, name="revert " + label)
            write(disk, size)
            snap = xapi.vdi_snapshot(sr_uuid, disk["key"])
            write(disk, 64 * MiB, "rand")  # the guest changed things after the snapshot
            new, seconds = timed(xapi.snapshot_revert, sr_uuid, snap["key"], disk["key"])
            reverts[label] = seconds
            # the old drivers' way, same snapshot and data: clone, then flatten (in a
            # namespace of its own: the SR's collector owns the SR's namespace)
            flat = "%s/baseline/flat-%d" % (cluster.pool, size)
            _, flatten_seconds = timed(lambda: (
                cluster.rbd("clone", "--rbd-default-clone-format", "2",
                            spec("%s@%s" % (image_of(new), snap["key"])), flat),
                cluster.rbd("flatten", "--no-progress", flat, timeout=3600)))
            rows.append(("revert, %s written" % label, "%.0f" % (seconds * 1000),
                         "clone + rbd flatten", "%.0f" % (flatten_seconds * 1000),
                         "%.1fx faster" % (flatten / seconds)))
            # xapi 26.16+: Volume.revert in place, same snapshot, same amount changed
            write(new, 64 * MiB, "rand")
            _, native = timed(xapi.snapshot_revert, sr_uuid, snap["key"], new["key"],
                              native=True)
            rows.append(("native revert (Volume.revert), %s written" % label,
                         "%.0f" % (native * 1000), "revert by adoption",
                         "%.0f" % (seconds * 1000), "%.2fx" % (native / seconds)))
            cluster.rbd("rm", "--no-progress", flat, timeout=600)
            xapi.vdi_destroy(sr_uuid, new["key"])
            xapi.vdi_destroy(sr_uuid, snap["key"])
        rows.append(("revert %s / revert 64 MiB" % args.big,
                     "%.2f" % (reverts[args.big] / reverts["64 MiB"]), "target", "<= 3", ""))

        # 50 cycles of write, snapshot, revert on one disk
        # written all over, so that reads hit real objects after 1 cycle as after 50
        disk = xapi.vdi_create(sr_uuid, 1024 * MiB, name="cycled")
        control = xapi.vdi_create(sr_uuid, 1024 * MiB, name="control")
        write(disk, 1024 * MiB)
        write(control, 1024 * MiB)
        latency = {}

        def read_latency_us(volume):
            out = cluster.rbd("bench", "--io-type", "read", "--io-size", "4K",
                              "--io-threads", "1", "--io-total", "64M", "--io-pattern", "rand",
                              spec(image_of(volume)), timeout=600)
            ops = float(re.findall(r"ops/sec:\s*([\d.]+)", out)[-1])
            return 1e6 / ops

        for cycle in range(1, args.cycles + 1):
            write(disk, 16 * MiB, "rand")
            write(control, 16 * MiB, "rand")
            snap = xapi.vdi_snapshot(sr_uuid, disk["key"])
            disk = xapi.snapshot_revert(sr_uuid, snap["key"], disk["key"])
            if cycle in (1, args.cycles):
                latency[cycle] = read_latency_us(disk), read_latency_us(control)
        with open_sr(sr) as attached:
            gc.collect(attached, wait=300)
            status = gc.status(attached)
            depth = flatten.chain_depth(attached, image_of(disk))
        copied = status["collected"].get("flattened_bytes", 0)
        rows.append(("bytes copied by the collector over %d cycles" % args.cycles,
                     str(copied), "target", "0", ""))
        rows.append(("clone-chain depth after %d cycles" % args.cycles, str(depth), "", "", ""))
        for cycle in (1, args.cycles):
            reverted, unreverted = latency[cycle]
            rows.append(("4K random read latency after %d cycle%s (us)"
                         % (cycle, "" if cycle == 1 else "s"),
                         "%.0f" % reverted, "control disk", "%.0f" % unreverted,
                         "%+.1f %%" % (100.0 * (reverted / unreverted - 1))))
        rows.append(("read latency, after %d cycles / after 1" % args.cycles,
                     "%.2f" % (latency[args.cycles][0] / latency[1][0]), "control disk",
                     "%.2f" % (latency[args.cycles][1] / latency[1][1]), "target +10 %"))

        # SR.ls and SR.stat with --volumes volumes, snapshots included
        count = fill_sr(xapi, sr, args.volumes, with_snapshots=True)
        samples = 5
        ls = median_ms([timed(xapi.volume, "SR.ls", sr=sr)[1] for _ in range(samples)])
        stat = median_ms([timed(xapi.volume, "SR.stat", sr=sr)[1] for _ in range(samples)])
        rbd_ls = median_ms([timed(subprocess.check_call,
                                  ["rbd", "-c", cluster.conf, "ls", "-l",
                                   "%s/%s" % (cluster.pool, namespace)],
                                  stdout=subprocess.DEVNULL)[1] for _ in range(samples)])
        rows.append(("SR.ls, %d volumes (ms)" % count, "%.0f" % ls, "rbd ls -l", "%.0f" % rbd_ls,
                     "%.1fx" % (ls / rbd_ls)))
        rows.append(("SR.stat, %d volumes (ms)" % count, "%.0f" % stat, "target", "< 1000", ""))
        print_table("Revert and scale (times in ms unless said)",
                    ["measure", "ours", "baseline", "baseline value", "comparison"], rows)


if __name__ == "__main__":
    main()
