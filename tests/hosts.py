"""Simulated XCP-ng hosts, shared by the datapath tests and benchmarks.

- `FakeHost` puts the stand-ins of tests/standins (tap-ctl and tapdisk,
  rbd-nbd, nbd-client, systemd-run: the host boundary, xcp_rbd.datapath.host,
  which needs Xen, kernel NBD and systemd, which this machine has not) first on
  PATH, with the world they keep their state in. They serve the data for real:
  a VM's reads and writes go through tapdisk's NBD socket, the kernel model
  and rbd-nbd's librbd (or qemu's), and each records its command line.
- `Host` is one host's identity (XCP_RBD_HOST_UUID) and state directory
  (XCP_RBD_RUN_DIR): two of them drive the same cluster as two hosts.
- NBD helpers reach the exports the datapath hands to XAPI with libnbd.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid

import nbd

TESTS = os.path.dirname(os.path.abspath(__file__))
LIBS = os.path.join(os.path.dirname(TESTS), "libs")
LAUNCHER = """#!%(python)s
import sys
sys.path[:0] = [%(tests)r, %(libs)r]
from standins import %(module)s
sys.exit(%(module)s.main(%(args)s))
"""
# tool on PATH -> (stand-in module, what its main takes)
STANDINS = {"tap-ctl": ("tap_ctl", "sys.argv[1:]"), "tapdisk": ("tapdisk", ""),
            "rbd-nbd": ("rbd_nbd", "sys.argv[1:]"),
            "nbd-client": ("nbd_client", "sys.argv[1:]"),
            "systemd-run": ("systemd_run", "sys.argv[1:]")}
CGROUP_ROOT = "/sys/fs/cgroup/systemd"  # cgroup v1 name=systemd, as on EL7


class FakeHost(object):
    """The stand-ins of tests/standins on PATH, with their world: a sysfs with
    /dev/nbd0..N-1, /run/blktap-control, a systemd that is running, and the root
    of a name=systemd hierarchy of the test's own (XCP_RBD_FAKE_CGROUP)."""

    def __init__(self, directory, nbd_devices=16):
        self.directory = directory
        self.bin = os.path.join(directory, "bin")
        self.sysfs = os.path.join(directory, "sys")
        # Sockets live here: pytest's directories are too deep for their paths.
        self.run = tempfile.mkdtemp(prefix="xcp-rbd-fake-")
        self.blktap_control = os.path.join(self.run, "blktap-control")
        self.systemd_runtime = os.path.join(self.run, "systemd", "system")
        self.cgroup = os.path.join(CGROUP_ROOT, os.path.basename(self.run))
        for path in (self.bin, self.blktap_control, self.systemd_runtime, self.cgroup):
            os.makedirs(path)
        for index in range(nbd_devices):
            os.makedirs(os.path.join(self.sysfs, "block", "nbd%d" % index))
        parameters = os.path.join(self.sysfs, "module", "nbd", "parameters")
        os.makedirs(parameters)   # the module is loaded, with this many devices
        with open(os.path.join(parameters, "nbds_max"), "w") as stream:
            stream.write("%d\n" % nbd_devices)
        for tool, (module, args) in STANDINS.items():
            path = os.path.join(self.bin, tool)
            with open(path, "w") as stream:
                stream.write(LAUNCHER % {"python": sys.executable, "tests": TESTS,
                                         "libs": LIBS, "module": module, "args": args})
            os.chmod(path, 0o755)

    def environ(self):
        return {"PATH": self.bin + os.pathsep + os.environ["PATH"],
                "XCP_RBD_SYSFS": self.sysfs, "XCP_RBD_FAKE_DIR": self.directory,
                "XCP_RBD_FAKE_RUN": self.run, "XCP_RBD_BLKTAP_CONTROL": self.blktap_control,
                "XCP_RBD_SYSTEMD_RUNTIME": self.systemd_runtime,
                "XCP_RBD_FAKE_CGROUP": self.cgroup}

    def commands(self):
        """Every command run so far: [tool, arg, ...] lists, in order."""
        try:
            with open(os.path.join(self.directory, "journal")) as stream:
                return [json.loads(line) for line in stream]
        except IOError:
            return []

    def connected(self):
        """{/dev/nbdN: pid of its client} of the devices in use."""
        block = os.path.join(self.sysfs, "block")
        found = {}
        for name in os.listdir(block):
            path = os.path.join(block, name, "pid")
            if os.path.exists(path):
                with open(path) as stream:
                    found["/dev/" + name] = int(stream.read())
        return found

    def log(self):
        """What the stand-ins logged (the kernel's messages, rbd-nbd's errors)."""
        try:
            with open(os.path.join(self.directory, "log")) as stream:
                return stream.read()
        except IOError:
            return ""

    def tapdisks(self):
        """The pids of the tapdisks running."""
        return sorted(int(name[3:]) for name in os.listdir(self.blktap_control)
                      if name.startswith("ctl") and name[3:].isdigit())

    def cgroup_of(self, pid):
        """The cgroup of `pid` in the name=systemd hierarchy, relative to the test's
        root, or None for one outside it."""
        with open("/proc/%d/cgroup" % pid) as stream:
            for line in stream:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "name=systemd":
                    root = "/" + os.path.relpath(self.cgroup, CGROUP_ROOT)
                    return os.path.relpath(path, root) if path.startswith(root) else None
        return None

    def close(self):
        """Stop what a failed test left running, then remove its world."""
        for pid in list(self.connected().values()) + self.tapdisks():
            kill(pid)
        for top, dirs, _ in os.walk(self.cgroup, topdown=False):
            with open(os.path.join(top, "cgroup.procs")) as stream:
                for pid in stream.read().split():
                    kill(int(pid))
        for top, dirs, _ in os.walk(self.cgroup, topdown=False):
            until("the cgroup %s to empty" % top, lambda: _rmdir(top), bound=10)
        shutil.rmtree(self.run)


def _rmdir(path):
    try:
        os.rmdir(path)
        return True
    except OSError:
        return False


class Host(object):
    """A simulated XCP-ng host: its identity and its state directory."""

    def __init__(self, xapi, run_dir):
        self.xapi = xapi
        self.run_dir = run_dir
        self.uuid = str(uuid.uuid4())

    @contextlib.contextmanager
    def current(self):
        saved = {key: os.environ.get(key) for key in ("XCP_RBD_RUN_DIR", "XCP_RBD_HOST_UUID")}
        os.environ.update(XCP_RBD_RUN_DIR=self.run_dir, XCP_RBD_HOST_UUID=self.uuid)
        try:
            yield
        finally:
            os.environ.update(saved)

    def datapath(self, command, uri, domain):
        with self.current():
            return self.xapi.datapath(command, uri=uri, domain=domain)

    def run(self, flow, *args, **kwargs):
        """One of the Xapi tool's flows (vm_migrate_localhost, nbd_connect, ...), as
        this host."""
        with self.current():
            return getattr(self.xapi, flow)(*args, **kwargs)

    def plug(self, sr_uuid, key, domain="7"):
        with self.current():
            return self.xapi.vbd_plug(sr_uuid, key, domain)

    def unplug(self, sr_uuid, key, domain="7"):
        with self.current():
            self.xapi.vbd_unplug(sr_uuid, key, domain)

    def attachments(self):
        """The per-volume state this host keeps."""
        root = os.path.join(self.run_dir, "datapath")
        found = []
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            try:
                with open(os.path.join(root, name, "attachment.json")) as stream:
                    found.append(json.load(stream))
            except IOError:
                continue  # being created or removed
        return found

    def qemu_pid(self):
        [attachment] = self.attachments()
        return attachment["qemu_pid"]


@contextlib.contextmanager
def simulated_host(xapi):
    # Not under tmp_path: socket paths must stay under 108 bytes.
    run_dir = tempfile.mkdtemp(prefix="xcp-rbd-host-")
    host = Host(xapi, run_dir)
    try:
        yield host
    finally:
        # A failed test must not leave qemu behind (a passing one leaves nothing).
        for attachment in host.attachments():
            if attachment.get("qemu_pid"):
                kill(attachment["qemu_pid"])
        shutil.rmtree(run_dir)


def kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def nbd_export(backend):
    [uri] = [impl[1]["uri"] for impl in backend["implementations"] if impl[0] == "Nbd"]
    match = re.match(r"nbd:unix:(.+):exportname=(.+)$", uri)
    return match.group(1), match.group(2)


def nbd_client(backend):
    """A libnbd client on the export of a Datapath.attach result."""
    return nbd_connection(*nbd_export(backend))


@contextlib.contextmanager
def nbd_connection(socket_path, export):
    handle = nbd.NBD()
    handle.set_export_name(export)
    handle.connect_unix(socket_path)
    try:
        yield handle
    finally:
        handle.shutdown()


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as stream:
            return stream.read().rpartition(")")[2].split()[0] != "Z"
    except IOError:
        return False


def until(what, check, bound=90):
    """Poll `check` until it returns something true (bounded only against hangs)."""
    deadline = time.time() + bound
    while True:
        result = check()
        if result:
            return result
        assert time.time() < deadline, "still waiting for " + what
        time.sleep(0.5)


def blocklist(cluster):
    return cluster.ceph("osd", "blocklist", "ls")


@contextlib.contextmanager
def nbd_server(path, size=1 << 20):
    """A bare NBD server on a unix socket (any export name, zeros, no writes): what
    nbd-client's stand-in negotiates with. Yields the path."""
    from xcp_rbd.datapath import nbd_wire

    def serve(sock):
        with sock:
            try:
                nbd_wire.serve_handshake(sock, size, nbd_wire.TRANSMISSION_READ_ONLY)
            except (OSError, nbd_wire.NbdError):
                pass

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)

    def accept():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield path
    finally:
        listener.close()
        os.unlink(path)


def own_cgroup():
    """This process' cgroup in the name=systemd hierarchy (a path from its root)."""
    with open("/proc/self/cgroup") as stream:
        for line in stream:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "name=systemd":
                return path
    raise AssertionError("no name=systemd hierarchy here")


@contextlib.contextmanager
def toolstack_unit(fake_host):
    """Calls made inside run in a cgroup that stands for xapi-storage-script.service
    (the scripts inherit it, as the daemon's children do); yields its directory."""
    unit = os.path.join(fake_host.cgroup, "system.slice", "xapi-storage-script.service")
    os.makedirs(unit, exist_ok=True)
    home = os.path.join(CGROUP_ROOT, own_cgroup().lstrip("/"))
    with open(os.path.join(unit, "cgroup.procs"), "w") as stream:
        stream.write(str(os.getpid()))
    try:
        yield unit
    finally:
        with open(os.path.join(home, "cgroup.procs"), "w") as stream:
            stream.write(str(os.getpid()))


def kill_unit(unit):
    """What systemd does to a unit with the default KillMode=control-group when it
    stops: SIGTERM to every process in its cgroup, SIGKILL to what is left after
    the stop timeout (shortened). Returns the pids it found."""
    def pids():
        with open(os.path.join(unit, "cgroup.procs")) as stream:
            return [int(pid) for pid in stream.read().split()]
    found = pids()
    for pid in found:
        kill(pid, signal.SIGTERM)
    deadline = time.time() + 5
    while pids() and time.time() < deadline:
        time.sleep(0.1)
    for pid in pids():
        kill(pid)
    return found


def tapdisk_export(attachment):
    """(socket, export) of the NBD server of the attachment's tapdisk: how the VM's
    I/O reaches the volume here (blkback's ring, on a host)."""
    tapdisk = attachment["tapdisk"]
    return os.path.join(os.environ["XCP_RBD_BLKTAP_CONTROL"],
                        "nbd%d.%d" % (tapdisk["pid"], tapdisk["minor"])), "vm"


def vm_disk(attachment):
    """An NBD client on the attachment's tapdisk, standing for the VM."""
    return nbd_connection(*tapdisk_export(attachment))
