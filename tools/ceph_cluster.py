#!/usr/bin/python3
"""Throwaway one-node Ceph cluster on loopback, for tests, the demo and benchmarks.

`LocalCluster` builds a cluster of one monitor (mon.a), one manager (mgr.x, with the
always-on `rbd_support` module, so `ceph rbd task add ...` works) and one OSD (osd.0,
BlueStore on a sparse file by default, or `memstore` in RAM: its snapshot trimming was
seen to crash the OSD, a segfault in MemStore's omap iterator, under the test suite's
snapshot churn), cephx on, in a temporary
directory that holds everything: ceph.conf, keyrings (mode 0600), daemon data, pid files,
admin sockets and logs. The monitor listens on a free port of 127.0.0.1 (msgr2 only), so
several clusters can run side by side.

It creates a pool `rbd` (rbd-initialised) and a least-privilege user `client.xcp`
(mon 'profile rbd', osd/mgr 'profile rbd pool=rbd'), the identity the plugins use.

Library use (pytest fixtures, demo, benchmarks)::

    with LocalCluster() as cluster:
        cluster.rbd("create", "rbd/img", "--size", "64M")
        # the plugin side: -c cluster.conf --id cluster.user --keyring cluster.keyring

Command line (daemons are detached and outlive the command; progress goes to stderr,
stdout gets one JSON object with conf, admin_keyring, mon_host, pool, user, keyring, dir)::

    /usr/bin/python3 tools/ceph_cluster.py start DIR
    /usr/bin/python3 tools/ceph_cluster.py status DIR
    /usr/bin/python3 tools/ceph_cluster.py stop DIR

ceph.conf names the admin keyring for client.admin, so `ceph -c DIR/ceph.conf -s` works.
Only the ceph command-line tools and daemons are used (no rados bindings), so any Python 3
can run it. Secrets stay in the keyring files: nothing here prints them.
"""

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

log = logging.getLogger("ceph_cluster")

GiB = 1 << 30
MON, MGR, OSD = "mon.a", "mgr.x", "osd.0"
STANDBY_MGRS = ("mgr.y", "mgr.z")
PG_NUM = 8
MGR_MODULE_DIR = "/usr/share/ceph/mgr"
# The mgr loads every module it finds (~4 s for all of them on two cores, most of the
# start time), but only needs the always-on ones (`ceph mgr module ls`; a missing one is
# HEALTH_ERR), so it gets a module path holding just these.
MGR_MODULES = ("balancer", "crash", "devicehealth", "orchestrator", "pg_autoscaler",
               "progress", "rbd_support", "status", "telemetry", "volumes")
STATE_FILE = "cluster.json"
# Where the cluster's daemons and CLIs are, when this runs in another root (the
# old-client test root sees this machine's root there: scripts/old-client).
HOST_ROOT = os.environ.get("XCP_RBD_CEPH_HOST_ROOT")


def _on_host(argv):
    """argv, run in HOST_ROOT if there is one."""
    return ["chroot", HOST_ROOT] + list(argv) if HOST_ROOT else list(argv)

# Caps of the daemons' own keys, imported into the monitor at mkfs.
DAEMON_CAPS = {
    "mgr": {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
    OSD: {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
}
ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"}


class ClusterError(RuntimeError):
    """A cluster command failed or the cluster did not become ready in time."""


def _free_port():
    """A TCP port of 127.0.0.1 that is free now and outside the daemons' bind range."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not 6800 <= port <= 7300:  # ms_bind_port_min/max: where mgr and OSDs bind
            return port


def _xcp_caps(pools):
    """Caps of client.xcp: rbd on the given pools only."""
    profile = ", ".join("profile rbd pool=%s" % pool for pool in pools)
    return {"mon": "profile rbd", "osd": profile, "mgr": profile}


def _caps_args(caps):
    return [arg for kind, cap in caps.items() for arg in ("--cap", kind, cap)]


def _tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class LocalCluster:
    """A one-node Ceph cluster (1 mon, 1 mgr, 1 OSD, cephx) living in `workdir`.

    workdir: directory for everything; created (now if None, else by `start`) and
        removed by `stop` when it is None or does not exist yet; an existing one must be
        empty and is kept.
    osd_bytes: OSD capacity (memstore: RAM it may use; bluestore: sparse file size).
    paxos_propose_interval: monitor commit batching; every RBD snapshot waits for one
        commit, so the 1 s default would make snapshots take ~1 s.
    objectstore: "memstore" (RAM) or "bluestore" (sparse file `osd.0.block` in workdir).
    timeout: seconds to wait for the cluster to become ready.
    managers: how many managers (mgr.x, then standbys mgr.y, mgr.z), for failovers.
    """

    pool = "rbd"
    user = "xcp"

    def __init__(self, workdir=None, osd_bytes=8 * GiB, paxos_propose_interval=0.05,
                 objectstore="bluestore", timeout=60, managers=1):
        if objectstore not in ("memstore", "bluestore"):
            raise ValueError("objectstore must be memstore or bluestore")
        self._owns_dir = workdir is None or not os.path.exists(workdir)
        self.dir = os.path.abspath(workdir or tempfile.mkdtemp(prefix="ceph-"))
        self.osd_bytes = osd_bytes
        self.paxos_propose_interval = paxos_propose_interval
        self.objectstore = objectstore
        self.timeout = timeout
        self.managers = (MGR,) + STANDBY_MGRS[:managers - 1]
        self.daemons = (MON,) + self.managers + (OSD,)
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.admin_keyring = os.path.join(self.dir, "admin.keyring")
        self.keyring = os.path.join(self.dir, "xcp.keyring")
        self.mon_host = None
        self.pools = [self.pool]
        self._procs = {}  # daemon name -> Popen, for the daemons this object started
        self._status = None  # the last status seen while waiting, for error messages

    @classmethod
    def attach(cls, workdir):
        """A LocalCluster for a cluster that `start` (maybe of another process) left in
        `workdir`; its `stop` kills the daemons but keeps the directory."""
        with open(os.path.join(workdir, STATE_FILE)) as f:
            state = json.load(f)
        cluster = cls(state["dir"], state["osd_bytes"], state["paxos_propose_interval"],
                      state["objectstore"], managers=state.get("managers", 1))
        cluster.mon_host = state["mon_host"]
        cluster.pools = state["pools"]
        return cluster

    def info(self):
        """What a client needs (no secrets: paths to the keyrings)."""
        return {"conf": self.conf, "admin_keyring": self.admin_keyring,
                "mon_host": self.mon_host, "pool": self.pool, "user": self.user,
                "keyring": self.keyring, "dir": self.dir}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ----------------------------------------------------------------- commands

    def _run(self, argv, timeout=60):
        log.debug("run %s", " ".join(argv))
        try:
            res = subprocess.run(_on_host(argv), capture_output=True, text=True,
                                 timeout=timeout, umask=0o077)
        except subprocess.TimeoutExpired as e:
            raise ClusterError("timed out after %ss: %s: %s" % (
                timeout, " ".join(argv), (e.stderr or b"").decode()[-2000:])) from None
        if res.returncode:
            raise ClusterError("%s failed (exit %d): %s" % (
                " ".join(argv), res.returncode, res.stderr.strip()[-2000:]))
        return res.stdout

    def ceph(self, *args, timeout=60):
        """Run the ceph CLI as client.admin against this cluster; returns stdout."""
        return self._run(["ceph", "-c", self.conf, "-n", "client.admin",
                          "-k", self.admin_keyring,
                          "--connect-timeout", str(max(1, int(timeout))), *args],
                         timeout=timeout)

    def ceph_json(self, *args, timeout=60):
        """`ceph(*args, "--format", "json")`, parsed."""
        return json.loads(self.ceph(*args, "--format", "json", timeout=timeout))

    def rbd(self, *args, timeout=60):
        """Run the rbd CLI as client.admin against this cluster; returns stdout."""
        return self._run(["rbd", "-c", self.conf, "-n", "client.admin",
                          "-k", self.admin_keyring, *args], timeout=timeout)

    # ----------------------------------------------------------------- start

    def start(self):
        """Create the cluster and wait until it is HEALTH_OK (raises ClusterError)."""
        if os.path.exists(self.dir) and os.listdir(self.dir):
            raise ClusterError("workdir %s is not empty" % self.dir)
        t0 = time.monotonic()
        log.info("starting a cluster in %s", self.dir)
        try:
            self._create()
            self._wait_ready(t0 + self.timeout)
        except BaseException as e:
            tails = self._log_tails()
            self.stop()
            if isinstance(e, ClusterError):
                raise ClusterError("%s\n%s" % (e, tails)) from None
            raise
        log.info("cluster %s ready in %.1f s (mon %s)", self.dir, time.monotonic() - t0,
                 self.mon_host)
        return self

    def _create(self):
        for sub in ("log", "run") + self.daemons:
            os.makedirs(os.path.join(self.dir, sub), mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.mon_host = "v2:127.0.0.1:%d" % _free_port()
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)

        # Keys: every entity is imported into the monitor at mkfs, with its caps.
        mkfs_keyring = os.path.join(self.dir, "mkfs.keyring")
        self._authtool(mkfs_keyring, "mon.", {"mon": "allow *"})
        for path, name, caps in (
                (self.admin_keyring, "client.admin", ADMIN_CAPS),
                (self.keyring, "client." + self.user, _xcp_caps(self.pools)),
                (self._keyring_of(OSD), OSD, DAEMON_CAPS[OSD])) + tuple(
                    (self._keyring_of(mgr), mgr, DAEMON_CAPS["mgr"])
                    for mgr in self.managers):
            self._authtool(path, name, caps)
            self._run(["ceph-authtool", mkfs_keyring, "--import-keyring", path])
        monmap = os.path.join(self.dir, "monmap")
        self._run(["monmaptool", "--create", "--fsid", fsid,
                   "--addv", "a", "[%s]" % self.mon_host, monmap])
        self._run(["ceph-mon", "-c", self.conf, "-i", "a", "--mkfs",
                   "--monmap", monmap, "--keyring", mkfs_keyring])
        os.unlink(mkfs_keyring)
        os.unlink(monmap)
        osd_uuid = str(uuid.uuid4())
        self._run(["ceph-osd", "-c", self.conf, "-i", "0", "--mkfs",
                   "--osd-uuid", osd_uuid, "--no-mon-config"], timeout=120)

        self._link_mgr_modules()
        self._spawn(MON)
        for mgr in self.managers:
            self._spawn(mgr)
        # No device_health_metrics pool, no SMART scraping (before the OSD is up).
        self.ceph("config", "set", "mgr", "mgr/devicehealth/enable_monitoring", "false",
                  "--force")
        self.ceph("osd", "new", osd_uuid, "0")
        self._spawn(OSD)
        self.ceph("osd", "pool", "create", self.pool, str(PG_NUM), str(PG_NUM))
        self.rbd("pool", "init", self.pool, timeout=self.timeout)
        self._save_state()

    def _write_conf(self, fsid):
        d = self.dir
        store = ["osd objectstore = %s" % self.objectstore]
        if self.objectstore == "memstore":
            store += ["memstore device bytes = %d" % self.osd_bytes,
                      # a fast shutdown skips the dump of the RAM store to disk, which
                      # would lose every object across stop_osd()/start_osd()
                      "osd fast shutdown = false"]
        else:
            # The block file must be outside the OSD data dir (mkfs fails otherwise).
            store += ["bluestore block path = %s/osd.0.block" % d,
                      "bluestore block create = true",
                      "bluestore block size = %d" % self.osd_bytes,
                      "bluestore fsck on mkfs = false"]
        daemon = "\n".join(["keyring = %s/$name/keyring" % d,
                            "log file = %s/log/$name.log" % d,
                            "admin socket = %s/run/$name.asok" % d])
        text = """\
[global]
fsid = {fsid}
mon host = {mon_host}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
run dir = {d}/run
mon data = {d}/$name
mgr data = {d}/$name
osd data = {d}/$name
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
mon data avail warn = 1
mon data avail crit = 0
mon osd initial require min compat client = mimic
paxos propose interval = {paxos}
mgr initial modules =
mgr stats period = 1
mgr module path = {d}/mgr-modules
{store}

[client.admin]
keyring = {admin}

[mon]
{daemon}

[mgr]
{daemon}

[osd]
{daemon}
""".format(fsid=fsid, mon_host=self.mon_host, d=d, paxos=self.paxos_propose_interval,
           store="\n".join(store), admin=self.admin_keyring, daemon=daemon)
        with open(os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                  "w") as f:
            f.write(text)

    def _link_mgr_modules(self):
        """Fill the mgr module path: the shared files and the always-on modules."""
        path = os.path.join(self.dir, "mgr-modules")
        os.mkdir(path)
        for entry in os.scandir((HOST_ROOT or "") + MGR_MODULE_DIR):
            if entry.name in MGR_MODULES or not entry.is_dir():  # linked as the mgr sees it
                os.symlink(os.path.join(MGR_MODULE_DIR, entry.name),
                           os.path.join(path, entry.name))

    def _keyring_of(self, daemon):
        return os.path.join(self.dir, daemon, "keyring")

    def _authtool(self, path, name, caps):
        self._run(["ceph-authtool", "--create-keyring", path, "--gen-key", "-n", name,
                   *_caps_args(caps)])

    def _save_state(self):
        state = dict(self.info(), osd_bytes=self.osd_bytes, objectstore=self.objectstore,
                     paxos_propose_interval=self.paxos_propose_interval, pools=self.pools,
                     managers=len(self.managers))
        with open(os.path.join(self.dir, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)

    # ----------------------------------------------------------------- daemons

    def _pidfile(self, daemon):
        return os.path.join(self.dir, "run", daemon + ".pid")

    def _spawn(self, daemon):
        if self._pid(daemon):
            raise ClusterError("%s is already running" % daemon)
        log.debug("start %s", daemon)
        kind, ident = daemon.split(".")
        with open(os.path.join(self.dir, "log", daemon + ".out"), "ab") as out:
            proc = subprocess.Popen(
                _on_host(["ceph-" + kind, "-f", "-c", self.conf, "-i", ident]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, umask=0o077)
        self._procs[daemon] = proc
        with open(self._pidfile(daemon), "w") as f:
            f.write("%d\n" % proc.pid)

    def _pid(self, daemon):
        """Pid of the running daemon, or None (a zombie or a reused pid is not it)."""
        proc = self._procs.get(daemon)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        try:
            with open(self._pidfile(daemon)) as f:
                pid = int(f.read())
            with open("/proc/%d/stat" % pid) as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if state == "Z" or self.conf.encode() not in argv:
            return None
        return pid

    def _kill(self, daemons, grace=5.0, sig=signal.SIGTERM):
        """SIGCONT and `sig` the daemons, SIGKILL those still alive after `grace` s."""
        pids = {d: self._pid(d) for d in daemons}
        pids = {d: pid for d, pid in pids.items() if pid}
        for signum in (signal.SIGCONT, sig):
            for pid in pids.values():
                os.kill(pid, signum)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(self._pid(d) for d in pids):
            time.sleep(0.05)
        for d in pids:
            pid = self._pid(d)
            if pid:
                log.warning("%s did not stop in %.0f s: SIGKILL", d, grace)
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(self._pid(d) for d in pids):
            if time.monotonic() > deadline:
                raise ClusterError("could not kill %s" % ", ".join(pids))
            time.sleep(0.05)
        for d in daemons:
            self._procs.pop(d, None)
            try:
                os.unlink(self._pidfile(d))
            except FileNotFoundError:
                pass

    def _signal(self, daemons, sig):
        for daemon in daemons or self.daemons:
            pid = self._pid(daemon)
            if pid:
                os.kill(pid, sig)

    def stop(self):
        """Kill all daemons; remove the directory if this object created it."""
        # The OSD goes first, while the monitor can still acknowledge its shutdown (else
        # it waits 5 s for it); a memstore OSD gets SIGKILL: on SIGTERM it would dump
        # its whole RAM store to files that are thrown away.
        self._kill([OSD], sig=signal.SIGKILL if self.objectstore == "memstore"
                   else signal.SIGTERM)
        self._kill(self.managers + (MON,))
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def running(self):
        """{daemon: pid or None}."""
        return {d: self._pid(d) for d in self.daemons}

    def freeze(self, *daemons):
        """SIGSTOP the daemons (default: all): they hang, their connections stay open."""
        self._signal(daemons, signal.SIGSTOP)

    def thaw(self, *daemons):
        """SIGCONT the daemons (default: all), undoing `freeze`."""
        self._signal(daemons, signal.SIGCONT)

    def stop_osd(self):
        """Stop the OSD cleanly and wait until the monitor has marked it down.

        A memstore OSD saves its RAM store to its data dir on the way (seconds per GiB),
        so `start_osd` finds the data again."""
        self._kill([OSD], grace=60)
        self._wait(lambda: self._osd_up() is False, time.monotonic() + self.timeout,
                   "osd.0 marked down")

    def start_osd(self):
        """Start the OSD again; wait until it is up and all PGs are active+clean."""
        self._spawn(OSD)
        self.wait_ready()

    def stop_mon(self):
        """Stop the monitor: clients and daemons get no answers until `start_mon`."""
        self._kill([MON])

    def start_mon(self):
        """Start the monitor again and wait until the cluster is ready."""
        self._spawn(MON)
        self.wait_ready()

    def stop_mgr(self):
        """Stop every manager: pool statistics go stale and `rbd task` is unanswered."""
        self._kill(self.managers)

    def kill_active_mgr(self):
        """SIGKILL the active manager, as when its host dies: a standby takes over
        once the monitor's mon_mgr_beacon_grace (30 s) has passed."""
        self._kill(["mgr." + self.ceph_json("mgr", "dump", timeout=5)["active_name"]],
                   sig=signal.SIGKILL)

    def start_mgr(self):
        """Start the managers that are not running; wait until the cluster is ready."""
        for mgr in self.managers:
            if not self._pid(mgr):
                self._spawn(mgr)
        self.wait_ready()

    # ----------------------------------------------------------------- pools

    def add_pool(self, name):
        """Create and rbd-init pool `name`, and give client.xcp the same rights on it."""
        self.ceph("osd", "pool", "create", name, str(PG_NUM), str(PG_NUM))
        self.rbd("pool", "init", name, timeout=self.timeout)
        self.pools.append(name)
        caps = _xcp_caps(self.pools)
        self.ceph("auth", "caps", "client." + self.user,
                  *[word for item in caps.items() for word in item])
        self._save_state()

    # ----------------------------------------------------------------- waiting

    def _wait(self, ready, deadline, what):
        last = None
        while True:
            try:
                if ready():
                    return
            except ClusterError as e:
                last = e
            if time.monotonic() > deadline:
                raise ClusterError("timed out waiting for %s%s" % (
                    what, " (last error: %s)" % last if last else ""))
            time.sleep(0.1)

    def _osd_up(self):
        osds = self.ceph_json("osd", "dump", timeout=5)["osds"]
        return bool(osds and osds[0]["up"])

    def _is_ready(self):
        """HEALTH_OK, OSD up, all PGs active+clean, mgr available."""
        status = self.ceph_json("status", timeout=5)
        pgs = status["pgmap"]
        states = {s["state_name"]: s["count"] for s in pgs.get("pgs_by_state", [])}
        self._status = {"health": status["health"]["status"],
                        "osds_up": status["osdmap"]["num_up_osds"], "pgs": states,
                        "mgr_available": status["mgrmap"]["available"]}
        # An empty pgmap (no mgr report yet) does not count as "all active+clean".
        return (self._status["health"] == "HEALTH_OK"
                and status["osdmap"]["num_up_osds"] == status["osdmap"]["num_osds"] == 1
                and self._status["mgr_available"]
                and pgs["num_pgs"] >= PG_NUM * len(self.pools)
                # snapshot trimming (active+clean+snaptrim...) is background work
                and sum(count for state, count in states.items()
                        if state.startswith("active+clean")) == pgs["num_pgs"])

    def wait_ready(self):
        """Wait until the cluster is ready again (after a fault)."""
        self._wait_ready(time.monotonic() + self.timeout)

    def _wait_ready(self, deadline):
        self._status = None
        try:
            self._wait(self._is_ready, deadline, "HEALTH_OK")
        except ClusterError as e:
            raise ClusterError("%s; last status: %s" % (e, self._status)) from None

    def _log_tails(self):
        parts = []
        for daemon in self.daemons:
            for ext in (".out", ".log"):
                path = os.path.join(self.dir, "log", daemon + ext)
                text = _tail(path)
                if text.strip():
                    parts.append("--- %s\n%s" % (path, text))
        return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster in DIR; print its info as JSON")
    start.add_argument("dir")
    start.add_argument("--osd-bytes", type=int, default=8 * GiB)
    start.add_argument("--objectstore", choices=("memstore", "bluestore"),
                       default="bluestore")
    start.add_argument("--paxos-propose-interval", type=float, default=0.05)
    for name, text in (("stop", "stop the cluster in DIR and remove DIR"),
                       ("status", "print daemon pids and health as JSON")):
        sub.add_parser(name, help=text).add_argument("dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="ceph_cluster: %(message)s")

    if args.command == "start":
        cluster = LocalCluster(args.dir, args.osd_bytes, args.paxos_propose_interval,
                               args.objectstore)
        try:
            cluster.start()
        except ClusterError as e:
            log.error("%s", e)
            return 1
        print(json.dumps(cluster.info()))
        return 0

    if not os.path.exists(os.path.join(args.dir, STATE_FILE)):
        log.error("%s holds no cluster (no %s)", args.dir, STATE_FILE)
        return 1
    cluster = LocalCluster.attach(args.dir)
    if args.command == "stop":
        cluster.stop()
        shutil.rmtree(cluster.dir)
        log.info("stopped and removed %s", cluster.dir)
        return 0
    daemons = cluster.running()
    try:
        health = cluster.ceph_json("health", timeout=5)["status"]
    except ClusterError as e:
        health = "unreachable: %s" % e
    print(json.dumps(dict(cluster.info(), daemons=daemons, health=health)))
    return 0 if all(daemons.values()) and health == "HEALTH_OK" else 1


if __name__ == "__main__":
    sys.exit(main())
