#!/usr/bin/env python3
"""Datapath benchmark: fio through the qemu backend's NBD export against fio
straight on librbd, same cluster, same image, same run; then the downtime a
storage migration's mirror adds at Datapath.deactivate, on both backends.

Paths: this machine runs one of the VM's I/O paths for real, the qemu
backend's NBD export (qemu-storage-daemon's rbd driver). The default path of
an 8.3 host, tapdisk on rbd-nbd's kernel device, needs Xen, blktap and kernel
NBD, none of which exists here: the stand-ins (tests/standins) are Python
models of its behaviour, and their speed says nothing about it. It is not
measured; neither is tapdisk's own NBD export (the rbd-nbd SRs' `Nbd`).

For each workload (sequential 1 MiB read and write at queue depth 16, random
4 KiB read and write at queue depth 32) and each round, the installed datapath
scripts attach and activate the image, fio's `nbd` engine runs on the export,
the scripts deactivate and detach it, and fio's `rbd` engine runs on the image
right after: each ratio compares two runs seconds apart, and the table shows
the median of the rounds (the machine may be shared).

fio's nbd engine (libnbd) asks for structured replies; the kernel's NBD client,
which tapdisk sits on in XCP-ng, does not. For reads, qemu answers the former
with a sparse read that asks the rbd driver for block status first. The
`simple` column reads the same way at the same depth through libnbd without
structured replies, as the kernel client does (a Python loop: a lower bound).

Also prints the times of attach + activate and deactivate (twice) + detach:
script runs as xapi-storage-script does them, tap-ctl and nbd-client being
FakeHost's stand-ins (tests/hosts.py).

Mirror hand-over: a writer (64 KiB writes, one at a time) runs on the
volume's export while Data.mirror copies it to a qemu-nbd target (a raw file);
once Data.stat says complete, the writer stops (the VM pauses) and
Datapath.deactivate ends the mirror. The downtime is from the writer's last
acknowledged write until deactivate returns with the target complete, next to
the same with no mirror. qemu: its mirror job (write-blocking), for real.
rbd-nbd: tapdisk's mirror mode through our relay, tapdisk being the stand-in
(the relay and its copy are ours and real; tapdisk's part is modelled).

Run (a one-node cluster of its own, about six minutes):
    .venv/bin/python bench/bench_datapath.py [--runtime 5] [--rounds 3] [--size 1G]
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tools"), os.path.join(ROOT, "tests")]

from ceph_cluster import LocalCluster  # noqa: E402
from hosts import FakeHost  # noqa: E402

IMAGE = "bench"
WORKLOADS = [  # name, fio rw, block size, queue depth, target ratio
    ("seq read 1M qd16", "read", "1M", 16, 0.9),
    ("seq write 1M qd16", "write", "1M", 16, 0.9),
    ("rand read 4K qd32", "randread", "4k", 32, 0.8),
    ("rand write 4K qd32", "randwrite", "4k", 32, 0.8),
]


def install(work):
    """cmake install of this tree, scripts running on this Python."""
    build, prefix = os.path.join(work, "build"), os.path.join(work, "prefix")
    os.makedirs(build)
    subprocess.check_call(["cmake", "-DCMAKE_INSTALL_PREFIX=" + prefix,
                           "-DPYTHON_EXECUTABLE=" + sys.executable, ROOT],
                          cwd=build, stdout=subprocess.DEVNULL)
    subprocess.check_call(["make", "install"], cwd=build, stdout=subprocess.DEVNULL)
    sys.path.insert(0, os.path.join(prefix, "lib", "xcp-rbd", "python"))
    return os.path.join(prefix, "libexec", "xapi-storage-script")


def fio(engine_args, rw, bs, depth, size, runtime, env=None):
    """One fio job; (bytes/s, IOPS)."""
    argv = ["fio", "--name=bench", "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % depth,
            "--size=" + size, "--numjobs=1", "--output-format=json"] + engine_args
    if runtime:
        argv += ["--runtime=%d" % runtime, "--time_based"]
    process = subprocess.run(argv, env=env, capture_output=True, text=True)
    if process.returncode or "{" not in process.stdout:
        raise SystemExit("%s failed: %s%s" % (" ".join(argv), process.stdout, process.stderr))
    # fio prints its errors before the JSON document, on the same stream
    job = json.loads(process.stdout[process.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw_bytes"], side["iops"]


def simple_reads(socket_path, export, rw, bs, depth, size, runtime):
    """Reads with `depth` in flight, no structured replies; (bytes/s, IOPS)."""
    import nbd
    handle = nbd.NBD()
    handle.set_request_structured_replies(False)
    handle.set_export_name(export)
    handle.connect_unix(socket_path)
    block = 1 << 20 if bs == "1M" else 4096
    blocks = size // block
    buffers = [nbd.Buffer(block) for _ in range(depth)]
    chooser = random.Random(0)
    issued = 0
    started = time.time()
    while time.time() < started + runtime:
        while handle.aio_in_flight() < depth:
            index = chooser.randrange(blocks) if rw == "randread" else issued % blocks
            handle.aio_pread(buffers[issued % depth], index * block)
            issued += 1
        handle.poll(-1)
    done = issued - handle.aio_in_flight()
    elapsed = time.time() - started
    while handle.aio_in_flight():
        handle.poll(-1)
    handle.shutdown()
    return done * block / elapsed, done / elapsed


def timed(function, *args):
    started = time.time()
    result = function(*args)
    return time.time() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each workload")
    parser.add_argument("--size", default="1G", help="image size")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="xcp-rbd-bench-dp-")
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work):
    root = install(work)
    from xcp_rbd.cluster import ClusterConfig
    from xcp_rbd.location import SrLocation
    from xcp_rbd.xapi import Xapi, parse_size
    fake = FakeHost(os.path.join(work, "fakehost"))
    os.environ.update(fake.environ(), XCP_RBD_RUN_DIR=os.path.join(work, "run"),
                      XCP_RBD_HOST_UUID=str(uuid.uuid4()))
    with LocalCluster(os.path.join(work, "ceph")) as cluster:
        cluster.rbd("create", "%s/%s" % (cluster.pool, IMAGE), "--size", args.size)
        config = ClusterConfig(conf=cluster.conf, user=cluster.user, keyring=cluster.keyring)
        # The default namespace: fio's rbd engine has no namespace option.
        uri = SrLocation(cluster.pool, "", "bench", config, "qemu").volume_uri(IMAGE)
        xapi = Xapi(root, os.path.join(work, "xapi.json"))
        rbd_engine = ["--ioengine=rbd", "--clientname=" + cluster.user,
                      "--pool=" + cluster.pool, "--rbdname=" + IMAGE]
        rbd_env = dict(os.environ, CEPH_CONF=cluster.conf,
                       CEPH_ARGS="--keyring " + cluster.keyring)
        sys.stderr.write("filling the image\n")
        fio(rbd_engine, "write", "4M", 16, args.size, 0, rbd_env)
        up, down = [], []
        results = {name: [] for name, _, _, _, _ in WORKLOADS}
        for round_number in range(args.rounds):
            for name, rw, bs, depth, _ in WORKLOADS:
                sys.stderr.write("round %d: %s\n" % (round_number + 1, name))
                seconds, backend = timed(plug, xapi, uri)
                up.append(seconds)
                [nbd_uri] = [impl[1]["uri"] for impl in backend["implementations"]
                             if impl[0] == "Nbd"]
                socket_path, export = nbd_uri[len("nbd:unix:"):].split(":exportname=")
                nbd_engine = ["--ioengine=nbd",
                              "--uri=nbd+unix:///%s?socket=%s" % (export, socket_path)]
                try:
                    through_nbd = fio(nbd_engine, rw, bs, depth, args.size, args.runtime)
                    simple = simple_reads(socket_path, export, rw, bs, depth,
                                          parse_size(args.size), args.runtime) \
                        if "read" in rw else None
                finally:  # detach ends qemu, also when a run failed
                    down.append(timed(unplug, xapi, uri)[0])
                direct = fio(rbd_engine, rw, bs, depth, args.size, args.runtime, rbd_env)
                results[name].append((through_nbd, simple, direct))
        report(results, up, down)
        handovers(xapi, cluster, work, args.rounds)


MIRROR_SIZE = 256 << 20


def handovers(xapi, cluster, work, rounds):
    """The mirror hand-over table (see the module's doc)."""
    config = {"pool": cluster.pool, "conf": cluster.conf, "user": cluster.user,
              "keyring": cluster.keyring}
    print("\n| backend | deactivate ending a mirror in sync (downtime) | deactivate, "
          "no mirror | rounds |")
    print("|---|---|---|---|")
    for backend in ("qemu", "rbd-nbd"):
        sr = xapi.sr_create(dict(config, datapath=backend), name=backend)
        with_mirror, without = [], []
        for _ in range(rounds):
            with_mirror.append(handover(xapi, sr, work, mirrored=True))
            without.append(handover(xapi, sr, work, mirrored=False))
        print("| %s | median %.0f ms, max %.0f ms | median %.0f ms | %d |" % (
            backend, statistics.median(with_mirror) * 1000, max(with_mirror) * 1000,
            statistics.median(without) * 1000, rounds))
        xapi.sr_destroy(sr)


def handover(xapi, sr, work, mirrored):
    """Seconds from the writer's last acknowledged write to deactivate's return."""
    import threading
    import nbd
    vdi = xapi.vdi_create(sr, "%dM" % (MIRROR_SIZE >> 20))
    uri = vdi["uri"][0]
    backend = plug(xapi, uri)
    [nbd_uri] = [impl[1]["uri"] for impl in backend["implementations"] if impl[0] == "Nbd"]
    socket_path, export = nbd_uri[len("nbd:unix:"):].split(":exportname=")
    stop, last = threading.Event(), [0.0]

    def write():
        handle = nbd.NBD()
        handle.set_export_name(export)
        handle.connect_unix(socket_path)
        chooser, block = random.Random(0), bytes(64 << 10)
        while not stop.is_set():
            handle.pwrite(block, chooser.randrange(MIRROR_SIZE // len(block)) * len(block))
            last[0] = time.perf_counter()
        handle.shutdown()

    target = os.path.join(work, "target.raw")
    with open(target, "wb") as stream:
        stream.truncate(MIRROR_SIZE)
    target_socket = os.path.join(work, "target.sock")
    server = subprocess.Popen(["qemu-nbd", "--format=raw", "--persistent",
                               "--export-name=target", "--socket=" + target_socket, target])
    writer = threading.Thread(target=write)
    try:
        while not os.path.exists(target_socket):
            time.sleep(0.01)
        writer.start()
        time.sleep(0.5)
        if mirrored:
            operation = xapi.datapath("Data.mirror", uri=uri, domain="1",
                                      remote="nbd+unix:///target?socket=" + target_socket)
            while not xapi.datapath("Data.stat", operation=operation)["complete"]:
                time.sleep(0.1)
            time.sleep(1)  # writes mirrored in sync
        stop.set()
        writer.join()
        xapi.datapath("Datapath.deactivate", uri=uri, domain="1")
        downtime = time.perf_counter() - last[0]
    finally:
        stop.set()
        unplug(xapi, uri)
        server.kill()
        server.wait()
        os.unlink(target)
    xapi.vdi_destroy(sr, vdi["key"])
    return downtime


def plug(xapi, uri):
    backend = xapi.datapath("Datapath.attach", uri=uri, domain="1")
    xapi.datapath("Datapath.activate", uri=uri, domain="1")
    return backend


def unplug(xapi, uri):
    xapi.datapath("Datapath.deactivate", uri=uri, domain="1")
    xapi.datapath("Datapath.deactivate", uri=uri, domain="1")
    xapi.datapath("Datapath.detach", uri=uri, domain="1")


def report(results, up, down):
    print("| workload | fio nbd (our export) | fio rbd (librbd) | ratio nbd/rbd | target "
          "| simple reads (no structured replies) / rbd |")
    print("|---|---|---|---|---|---|")
    for name, _, _, _, target in WORKLOADS:
        runs = results[name]
        ratio = statistics.median(nbd[0] / rbd[0] for nbd, _, rbd in runs)
        simple = ("%.2f" % statistics.median(simple[0] / rbd[0] for _, simple, rbd in runs)
                  if runs[0][1] else "-")
        print("| %s | %s | %s | %.2f | >= %.1f %s | %s |" % (
            name, _median_rate([nbd for nbd, _, _ in runs]),
            _median_rate([rbd for _, _, rbd in runs]), ratio, target,
            "met" if ratio >= target else "MISSED", simple))
    for what, times in (("attach + activate", up), ("deactivate x2 + detach", down)):
        print("%s: median %.0f ms, max %.0f ms over %d runs (target < 1000 ms)" % (
            what, statistics.median(times) * 1000, max(times) * 1000, len(times)))


def _median_rate(runs):
    return "%.0f MiB/s, %.0f IOPS" % (statistics.median(bw for bw, _ in runs) / 2 ** 20,
                                      statistics.median(iops for _, iops in runs))


if __name__ == "__main__":
    main()
