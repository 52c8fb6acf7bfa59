#!/usr/bin/python3
"""Changed block tracking: Volume.list_changed_blocks next to `rbd diff` on the same
snapshots of a 100 GiB thin disk with 1 % of it written between them.

1 % is written as admin with `rbd bench --io-type write --io-pattern rand`, once as
4 KiB writes (every 4 MiB object of the disk gets some: the object map cannot skip
any) and once as 1 MiB writes (about 1 000 objects: the object map skips the rest).
Each call is a whole process, as XAPI makes it: the plugin script (Python, cluster
connection, SR index, diff, bitmap) and the rbd CLI (`rbd diff`, byte-granular like
the plugin; `--whole-object`, object-granular, for reference). Then the first
snapshot is data-destroyed (the second exists, so its changes are stored in the
index and its RBD snapshot removed) and list_changed_blocks answers from the index.
The plugin's bitmap is checked against the blocks of `rbd diff`'s extents: within
them, and what it leaves out (the front of objects that are new since the older,
empty snapshot) reads as zeros.

The cluster uses BlueStore on a sparse file (RAM-backed memstore keeps every object
at its full extent).

    /usr/bin/python3 bench/bench_cbt.py [--size 100G] [--percent 1] [--samples 5]
"""

import argparse
import base64
import json
import subprocess

from common import environment, median_ms, print_table, timed

from xcp_rbd.attached import open_sr
from xcp_rbd.xapi import parse_size

BLOCK = 64 << 10
OBJECT = 4 << 20


def check_exact(sr, disk, snapshot, exact, expected, samples=2000):
    """The plugin's bitmap is within rbd diff's blocks, and the blocks rbd diff
    reports that it does not (a new object reported from its start) read as zeros
    in the newer snapshot: the older one had no data (a sample of them is read)."""
    assert exact <= expected, "the bitmap has blocks rbd diff does not report"
    left_out = sorted(expected - exact)
    step = max(1, len(left_out) // samples)
    with open_sr(sr) as attached:
        name = disk["uri"][0].split("?")[0].rsplit("/", 1)[1]
        with attached.image(name, snapshot=snapshot["key"], read_only=True) as image:
            for block in left_out[::step]:
                assert image.read(block * BLOCK, BLOCK) == bytes(BLOCK), block


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="100G")
    parser.add_argument("--percent", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    size = parse_size(args.size)
    written = int(size * args.percent / 100) // OBJECT * OBJECT

    with environment(objectstore="bluestore", osd_bytes=2 * written + (8 << 30)) as (
            cluster, xapi, config):
        sr_uuid = xapi.sr_create(config, name="bench cbt")
        sr = xapi.sr(sr_uuid)
        namespace = xapi._state()["device_config"][sr_uuid]["namespace"]

        def rbd(*argv, **options):
            user = ["--id", "admin", "--keyring", cluster.admin_keyring] \
                if options.get("admin") else ["--id", cluster.user, "--keyring",
                                               cluster.keyring]
            return subprocess.check_output(["rbd", "-c", cluster.conf] + user + list(argv))

        def lcb(key, key2):
            result = xapi.volume("Volume.list_changed_blocks", sr=sr, key=key, key2=key2,
                                 offset=0, length=-1)
            bitmap = base64.b64decode(result["bitmap"])
            return {n for n in range(8 * len(bitmap)) if bitmap[n // 8] & (0x80 >> n % 8)}

        def medians(*functions):
            """Median ms of each, sampled in turn (other load hits them alike)."""
            samples = [[timed(function)[1] for function in functions]
                       for _ in range(args.samples)]
            return [median_ms(column) for column in zip(*samples)]

        rows = []
        for io_size in ("4K", "1M"):
            disk = xapi.vdi_create(sr_uuid, size, name="disk %s" % io_size)
            xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])
            spec = "%s/%s/%s" % (cluster.pool, namespace, disk["key"])
            first = xapi.vdi_snapshot(sr_uuid, disk["key"])
            rbd("bench", "--io-type", "write", "--io-pattern", "rand", "--io-size", io_size,
                "--io-threads", "16", "--io-total", str(written), spec, admin=True)
            second = xapi.vdi_snapshot(sr_uuid, disk["key"])
            diff = ["diff", "--from-snap", first["key"], "%s@%s" % (spec, second["key"])]

            extents = json.loads(rbd(*(diff + ["--format", "json"])).decode())
            expected = set()
            for extent in extents:
                expected.update(range(extent["offset"] // BLOCK,
                                      (extent["offset"] + extent["length"] - 1) // BLOCK + 1))
            objects = len(json.loads(rbd(*(diff + ["--whole-object", "--format", "json"]))
                                     .decode()))
            exact = lcb(first["key"], second["key"])
            check_exact(sr, disk, second, exact, expected)

            label = "%s random writes: %d objects, %d blocks (rbd diff: %d)" % (
                io_size, objects, len(exact), len(expected))
            ours, theirs, whole = medians(lambda: lcb(first["key"], second["key"]),
                                          lambda: rbd(*diff),
                                          lambda: rbd(*(diff + ["--whole-object"])))
            rows.append((label, "list_changed_blocks", "%.0f" % ours, "rbd diff",
                         "%.0f" % theirs, "%.2f" % (ours / theirs)))
            rows.append(("", "", "", "rbd diff --whole-object", "%.0f" % whole, ""))

            xapi.volume("Volume.data_destroy", sr=sr, key=first["key"])
            with open_sr(sr) as attached:
                stored = attached.index.read(prefix="v.")["v." + first["key"]]
            assert lcb(first["key"], second["key"]) == exact
            stored_ms, = medians(lambda: lcb(first["key"], second["key"]))
            rows.append(("  after data_destroy (record %d KiB)" % (len(stored) >> 10),
                         "list_changed_blocks", "%.0f" % stored_ms, "rbd diff", "%.0f" % theirs,
                         "%.2f" % (stored_ms / theirs)))
        print_table("list_changed_blocks on a %s thin disk, %g %% written between two "
                    "snapshots; median ms of %d whole-process calls"
                    % (args.size, args.percent, args.samples),
                    ["written", "plugin call", "ms", "baseline", "ms", "ratio"], rows)


if __name__ == "__main__":
    main()
