#!/usr/bin/python3
"""Volume plugin: wall time per call, next to the rbd CLI doing the same thing
on the same cluster in the same run.

Each plugin call is a whole script run (a new Python process, a cluster
connection, the SR index), as xapi-storage-script makes it; each rbd CLI call
is a whole process too. SR.ls is measured with 1 000 volumes in the SR, next
to `rbd ls -l` of the same namespace.

    /usr/bin/python3 bench/bench_volume.py [--volumes 1000] [--samples 10]
"""

import argparse
import subprocess

from common import environment, fill_sr, median_ms, print_table, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()

    with environment() as (cluster, xapi, config):
        sr_uuid = xapi.sr_create(config, name="bench")
        sr = xapi.sr(sr_uuid)
        namespace = xapi._state()["device_config"][sr_uuid]["namespace"]
        base = ["rbd", "-c", cluster.conf, "--id", cluster.user, "--keyring", cluster.keyring]

        def cli(*argv):
            subprocess.check_call(base + list(argv), stdout=subprocess.DEVNULL)

        # The baseline's own images live beside the SR's namespace, which the SR owns
        # (its collector reclaims whatever it does not know there).
        cluster.rbd("namespace", "create", "%s/baseline" % cluster.pool)

        def spec(name):
            return "%s/baseline/%s" % (cluster.pool, name)

        def plugin(command, **params):
            return xapi.volume(command, sr=sr, **params)

        rows = []

        def measure(label, ours, theirs):
            ours_s = [timed(ours, i)[1] for i in range(args.samples)]
            theirs_s = [timed(theirs, i)[1] for i in range(args.samples)]
            ours_ms, theirs_ms = median_ms(ours_s), median_ms(theirs_s)
            rows.append((label[0], "%.0f" % ours_ms, label[1], "%.0f" % theirs_ms,
                         "%.1f" % (ours_ms / theirs_ms)))

        disk = plugin("Volume.create", name="d", description="", size=64 << 20,
                      sharable=False)
        cli("create", spec("cli-disk"), "--size", "64M")
        created, snaps, cli_snaps = [], [], []
        measure(("Volume.create", "rbd create"),
                lambda i: created.append(plugin("Volume.create", name="c%d" % i,
                                                description="", size=64 << 20,
                                                sharable=False)["key"]),
                lambda i: cli("create", spec("cli-%d" % i), "--size", "64M"))
        measure(("Volume.stat", "rbd info"),
                lambda i: plugin("Volume.stat", key=disk["key"]),
                lambda i: cli("info", spec("cli-disk")))
        measure(("Volume.snapshot", "rbd snap create"),
                lambda i: snaps.append(plugin("Volume.snapshot", key=disk["key"])["key"]),
                lambda i: cli_snaps.append(cli("snap", "create", spec("cli-disk@s%d" % i))
                                           or "s%d" % i))
        measure(("Volume.clone", "rbd clone"),
                lambda i: plugin("Volume.clone", key=snaps[i]),
                lambda i: cli("clone", "--rbd-default-clone-format", "2",
                              spec("cli-disk@%s" % cli_snaps[i]), spec("cli-clone-%d" % i)))
        measure(("Volume.destroy", "rbd rm"),
                lambda i: plugin("Volume.destroy", key=created[i]),
                lambda i: cli("rm", "--no-progress", spec("cli-%d" % i)))

        count = fill_sr(xapi, sr, args.volumes)
        measure(("SR.ls (%d volumes)" % count, "rbd ls -l (same namespace)"),
                lambda i: plugin("SR.ls"),
                lambda i: cli("ls", "-l", "%s/%s" % (cluster.pool, namespace)))
        measure(("SR.stat", "ceph df"),
                lambda i: plugin("SR.stat"),
                lambda i: subprocess.check_call(
                    ["ceph", "-c", cluster.conf, "--id", cluster.user, "--keyring",
                     cluster.keyring, "df"], stdout=subprocess.DEVNULL))
        print_table("Volume plugin vs rbd CLI, median wall time per call (ms), %d samples"
                    % args.samples,
                    ["plugin call", "ms", "baseline", "ms", "ratio"], rows)


if __name__ == "__main__":
    main()
