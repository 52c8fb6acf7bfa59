#!/usr/bin/env python3
"""Mirror benchmark: Data.mirror (qemu's mirror job in the volume's qemu, as a
storage migration runs it) next to `qemu-img convert` of the same image between
the same endpoints: the source RBD image -> an NBD socket.

Targets: `SR export`, another qemu-backend SR's volume, attached and activated
on the same cluster (what a migration's destination offers: the qemu backend's
NBD export, librbd behind it); `qemu-nbd`, a raw file on tmpfs served by
qemu-nbd (nothing behind the target). Images: `full` (every byte written) and
`thin` (every tenth 4 MiB extent written, the rest never): both copies ask the
source for allocation and write zeroes where it has none (convert without
--target-is-zero, which the mirror job of qemu 7.2 lacks).

Data.mirror: the source is active (a running VM, idle); the time runs from
Data.mirror until Data.stat says complete, Data.stat polled through the
installed scripts every 0.1 s as XAPI polls it (its script runs included).
The Datapath.deactivate that ends the mirror (in a migration's downtime) is
shown apart, next to a deactivate with no mirror. qemu-img convert: the source
is not in use, opened by qemu-img's own rbd driver; `-m 8` is its default, `-W`
lets it write out of order. Rounds alternate the two, and the table shows
medians; the first copy of each kind is checked with `qemu-img compare`.
Throughputs are virtual size / time.

Run (a one-node cluster of its own; tap-ctl and nbd-client are FakeHost's
stand-ins, tests/hosts.py):
    .venv/bin/python bench/bench_mirror.py [--size 1G] [--thin-size 4G] [--rounds 3]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from common import ROOT, environment, print_table, timed

sys.path.insert(0, os.path.join(ROOT, "tests"))

from hosts import FakeHost  # noqa: E402
from xcp_rbd.location import VolumeLocation  # noqa: E402
from xcp_rbd.xapi import parse_size  # noqa: E402

MiB = 1 << 20
EXTENT = 4 * MiB
VM = "7"
POLL = 0.1


def nbd_endpoint(backend):
    """(socket, export) of a datapath's Nbd implementation."""
    [uri] = [impl[1]["uri"] for impl in backend["implementations"] if impl[0] == "Nbd"]
    return tuple(uri[len("nbd:unix:"):].split(":exportname="))


def fill(backend, size, every):
    """Write every `every`-th 4 MiB extent through the export (distinct data in each)."""
    import nbd
    socket_path, export = nbd_endpoint(backend)
    handle = nbd.NBD()
    handle.set_export_name(export)
    handle.connect_unix(socket_path)
    data = bytearray(os.urandom(EXTENT))
    for offset in range(0, size, every * EXTENT):
        data[:8] = offset.to_bytes(8, "little")
        handle.pwrite(bytes(data), offset)
    handle.flush()
    handle.shutdown()


def rbd_opts(volume):
    where = VolumeLocation.parse(volume["uri"][0])
    return ("driver=rbd,pool=%s,namespace=%s,image=%s,conf=%s,user=%s" % (
        where.pool, where.namespace, where.image, where.cluster.conf, where.cluster.user),
        dict(os.environ, CEPH_ARGS="--keyring " + where.cluster.keyring))


def nbd_opts(socket_path, export):
    return "driver=nbd,server.type=unix,server.path=%s,export=%s" % (socket_path, export)


def qemu_img(args, env):
    process = subprocess.run(["qemu-img"] + args, env=env, capture_output=True, text=True)
    if process.returncode:
        raise SystemExit("qemu-img %s failed: %s" % (" ".join(args), process.stderr))


def mirror_round(xapi, source, target, scripts):
    """(seconds to complete, seconds of the deactivate that ends it); the time of
    each script run goes to `scripts`."""
    sr, key = source["sr"], source["volume"]["key"]
    uri = source["volume"]["uri"][0]
    xapi.vbd_plug(sr, key, VM)
    started = time.perf_counter()
    operation, seconds = timed(xapi.datapath, "Data.mirror", uri=uri, domain=VM,
                               remote="nbd+unix:///%s?socket=%s" % (target[1], target[0]))
    scripts["Data.mirror"].append(seconds)
    while True:
        status, seconds = timed(xapi.datapath, "Data.stat", operation=operation)
        scripts["Data.stat"].append(seconds)
        if status["failed"]:
            raise SystemExit("the mirror failed")
        if status["complete"]:
            break
        time.sleep(POLL)
    in_sync = time.perf_counter() - started
    end = timed(xapi.datapath, "Datapath.deactivate", uri=uri, domain=VM)[1]
    xapi.vbd_unplug(sr, key, VM)
    return in_sync, end


def plain_deactivate(xapi, source):
    sr, key = source["sr"], source["volume"]["key"]
    xapi.vbd_plug(sr, key, VM)
    seconds = timed(xapi.datapath, "Datapath.deactivate",
                    uri=source["volume"]["uri"][0], domain=VM)[1]
    xapi.vbd_unplug(sr, key, VM)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="size of the full image")
    parser.add_argument("--thin-size", default="4G", help="size of the thin image")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = [("full", parse_size(args.size), 1), ("thin", parse_size(args.thin_size), 10)]
    shm = tempfile.mkdtemp(prefix="xcp-rbd-bench-mirror-", dir="/dev/shm")
    try:
        with environment() as (cluster, xapi, config):
            fake = FakeHost(os.path.join(os.environ["XCP_RBD_RUN_DIR"] + "-fakehost"))
            os.environ.update(fake.environ(), XCP_RBD_HOST_UUID=str(uuid.uuid4()))
            run(xapi, config, images, args.rounds, shm)
    finally:
        shutil.rmtree(shm)


def run(xapi, config, images, rounds, shm):
    source_sr = xapi.sr_create(dict(config, datapath="qemu"), name="source")
    destination_sr = xapi.sr_create(dict(config, datapath="qemu"), name="destination")
    rows, ends, plain = [], [], []
    scripts = {"Data.mirror": [], "Data.stat": []}
    for name, size, every in images:
        volume = xapi.vdi_create(source_sr, size)
        source = {"sr": source_sr, "volume": volume}
        sys.stderr.write("filling the %s image\n" % name)
        fill(xapi.vbd_plug(source_sr, volume["key"], VM), size, every)
        xapi.vbd_unplug(source_sr, volume["key"], VM)
        destination = xapi.vdi_create(destination_sr, size)
        sr_target = nbd_endpoint(xapi.vbd_plug(destination_sr, destination["key"], "MIR1"))
        raw = os.path.join(shm, "target.raw")
        with open(raw, "wb") as stream:
            stream.truncate(size)
        qemu_nbd_socket = os.path.join(shm, "nbd.sock")
        qemu_nbd = subprocess.Popen(
            ["qemu-nbd", "--format=raw", "--persistent", "--export-name=target",
             "--socket=" + qemu_nbd_socket, raw], stdin=subprocess.DEVNULL)
        while not os.path.exists(qemu_nbd_socket):
            time.sleep(0.01)
        try:
            for target_name, target in (("SR export", sr_target),
                                        ("qemu-nbd", (qemu_nbd_socket, "target"))):
                results = {"mirror": [], "convert": [], "convert -W": []}
                source_opts, env = rbd_opts(volume)
                for round_number in range(rounds):
                    sys.stderr.write("%s -> %s, round %d\n" % (name, target_name,
                                                               round_number + 1))
                    in_sync, end = mirror_round(xapi, source, target, scripts)
                    results["mirror"].append(in_sync)
                    ends.append(end)
                    if round_number == 0:
                        qemu_img(["compare", "--image-opts", source_opts,
                                  nbd_opts(*target)], env)
                    for method, extra in (("convert", []), ("convert -W", ["-W"])):
                        results[method].append(timed(qemu_img, [
                            "convert", "-n", "-m", "8"] + extra + [
                            "--image-opts", source_opts,
                            "--target-image-opts", nbd_opts(*target)], env)[1])
                        if round_number == 0:
                            qemu_img(["compare", "--image-opts", source_opts,
                                      nbd_opts(*target)], env)
                    plain.append(plain_deactivate(xapi, source))
                medians = {method: statistics.median(times)
                           for method, times in results.items()}
                rows.append([name, "%d MiB" % (size // MiB), target_name] + [
                    "%.0f MiB/s (%.1f s)" % (size / MiB / medians[method], medians[method])
                    for method in ("mirror", "convert", "convert -W")] + [
                    "%.2f" % (medians["convert"] / medians["mirror"])])
        finally:
            qemu_nbd.kill()
            qemu_nbd.wait()
            os.unlink(raw)
        xapi.vbd_unplug(destination_sr, destination["key"], "MIR1")
    print_table("Data.mirror vs qemu-img convert, source RBD image -> NBD socket "
                "(median of %d rounds)" % rounds,
                ["image", "size", "target", "Data.mirror to complete",
                 "qemu-img convert -m 8", "convert -m 8 -W", "mirror / convert speed"],
                rows)
    print("Datapath.deactivate ending an idle mirror in sync: median %.0f ms, max %.0f ms "
          "(%d runs); with no mirror: median %.0f ms" % (
              statistics.median(ends) * 1000, max(ends) * 1000, len(ends),
              statistics.median(plain) * 1000))
    print("script runs included in the mirror's time: Data.mirror median %.0f ms, "
          "Data.stat median %.0f ms (every %.1f s)" % (
              statistics.median(scripts["Data.mirror"]) * 1000,
              statistics.median(scripts["Data.stat"]) * 1000, POLL))


if __name__ == "__main__":
    main()
