"""What every benchmark needs: a throwaway cluster, the plugins installed with
CMake, the XAPI-playing tool over them, timing and a printed table.

Benchmarks compare against a baseline measured in the same run on the same
cluster (the rbd CLI, fio's rbd engine); absolute numbers from a one-node
loopback cluster only say how costs scale.
"""

import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "libs"))

from ceph_cluster import LocalCluster  # noqa: E402
from install_tree import install  # noqa: E402
from xcp_rbd.xapi import Xapi  # noqa: E402


@contextlib.contextmanager
def environment(**cluster_options):
    """(cluster, xapi, device_config) on a fresh cluster and install."""
    with tempfile.TemporaryDirectory(prefix="xcp-rbd-bench-") as work:
        os.environ["XCP_RBD_RUN_DIR"] = os.path.join(work, "run")
        root = install(os.path.join(work, "prefix"))
        with LocalCluster(os.path.join(work, "ceph"), **cluster_options) as cluster:
            xapi = Xapi(root, os.path.join(work, "xapi.json"))
            config = {"pool": cluster.pool, "conf": cluster.conf, "user": cluster.user,
                      "keyring": cluster.keyring}
            yield cluster, xapi, config


def timed(function, *args, **kwargs):
    """(result, seconds)."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def median_ms(samples):
    return statistics.median(samples) * 1000.0


def print_table(title, headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = "  ".join("%%-%ds" % w for w in widths)
    print("\n" + title)
    print(line % tuple(headers))
    print(line % tuple("-" * w for w in widths))
    for row in rows:
        print(line % tuple(row))
    sys.stdout.flush()


def fill_sr(xapi, sr, total, with_snapshots=False, workers=4):
    """Create volumes (each with a snapshot if asked) through the scripts, a few at
    a time, until SR.ls lists `total`; return how many it lists."""
    per_volume = 2 if with_snapshots else 1
    todo = [total - len(xapi.volume("SR.ls", sr=sr))]
    lock = threading.Lock()

    def fill():
        while True:
            with lock:
                if todo[0] <= 0:
                    return
                todo[0] -= per_volume
            vdi = xapi.volume("Volume.create", sr=sr, name="filler", description="",
                              size=1 << 30, sharable=False)
            if with_snapshots:
                xapi.volume("Volume.snapshot", sr=sr, key=vdi["key"])

    threads = [threading.Thread(target=fill) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(xapi.volume("SR.ls", sr=sr))
