"""Simulated XCP-ng hosts, shared by the datapath tests and benchmarks.

- `FakeHost` puts stand-ins for tap-ctl, nbd-client and rbd-nbd (the host
  boundary, xcp_rbd.datapath.host: they need Xen or kernel NBD, which this
  machine has not) first on PATH, and a sysfs for their /dev/nbdN: each records
  its command line and keeps the state the real tool keeps. The rbd-nbd
  stand-in even opens the image with librbd in a daemon of its own, as rbd-nbd
  does, so the activation lock sees a real client.
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
import sys
import tempfile
import time
import uuid

import nbd

# tap-ctl and nbd-client (by the name they run as): shell, fast as the real ones.
FAKE_SHELL_TOOL = r'''#!/bin/sh
tool=${0##*/}
line="[\"$tool\""
for arg in "$@"; do line="$line, \"$arg\""; done
echo "$line]" >> "$XCP_RBD_FAKE_DIR/journal"
count() {  # a counter file, under flock: prints the value, then increments it
    (flock 9; n=$(cat "$XCP_RBD_FAKE_DIR/$1" 2>/dev/null || echo 0)
     echo $((n + 1)) > "$XCP_RBD_FAKE_DIR/$1"; echo "$n") 9>> "$XCP_RBD_FAKE_DIR/$1.lock"
}
case "$tool $1" in
    "tap-ctl spawn") echo $((40000 + $(count tapdisk))) ;;
    "tap-ctl allocate") echo "/dev/xen/blktap-2/tapdev$(count minor)" ;;
    "nbd-client -d") rm "$XCP_RBD_SYSFS/block/${2##*/}/pid" ;;
    nbd-client*)
        pid="$XCP_RBD_SYSFS/block/${3##*/}/pid"
        if [ -e "$pid" ]; then echo "$3 is busy" >&2; exit 1; fi
        echo 1 > "$pid" ;;
esac
'''

# rbd-nbd: map starts a daemon that opens the image, as rbd-nbd does.
FAKE_RBD_NBD = r'''#!%(python)s -S
import json, os, signal, subprocess, sys, time
FAKE, SYS = os.environ["XCP_RBD_FAKE_DIR"], os.environ["XCP_RBD_SYSFS"]
args = sys.argv[1:]
HOLDER = %(holder)r
with open(os.path.join(FAKE, "journal"), "a") as journal:
    journal.write(json.dumps(["rbd-nbd"] + args) + "\n")

def pid_file(device):
    return os.path.join(SYS, "block", os.path.basename(device), "pid")

def free_device():
    for name in sorted(os.listdir(os.path.join(SYS, "block")), key=lambda n: int(n[3:])):
        if not os.path.exists(pid_file(name)):
            return "/dev/" + name
    # as rbd-nbd.cc's try_ioctl_setup says it, and main's EXIT_FAILURE
    sys.stderr.write("rbd-nbd: failed to find unused device\n")
    sys.exit(1)

if args[0] == "map":
    options = dict(zip(args[1:-1:2], args[2:-1:2]))
    device = free_device()
    holder = subprocess.Popen(
        ["%(python)s", "-c", HOLDER, options["-c"], options["--id"], options["--keyring"],
         args[-1]], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    if holder.stdout.readline() != b"ready\n":
        sys.exit("cannot open %%s" %% args[-1])
    with open(pid_file(device), "w") as f:
        f.write(str(holder.pid))
    print(device)
elif args[0] == "unmap":
    with open(pid_file(args[1])) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGTERM)
    while os.path.exists("/proc/%%d" %% pid) and "Z" not in open(
            "/proc/%%d/stat" %% pid).read().rpartition(")")[2].split()[:1]:
        time.sleep(0.01)
    os.unlink(pid_file(args[1]))
'''

# rbd-nbd's daemon, as far as Ceph sees it: a client with the image open.
HOLDER = r'''
import signal, sys, rados, rbd
conf, user, keyring, spec = sys.argv[1:]
pool, namespace, image = spec.split("/")
handle = rados.Rados(conffile=conf, rados_id=user, conf={"keyring": keyring})
handle.connect()
ioctx = handle.open_ioctx(pool)
ioctx.set_namespace(namespace)
opened = rbd.Image(ioctx, image)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
try:
    signal.pause()
finally:
    opened.close()
    ioctx.close()
    handle.shutdown()
'''


class FakeHost(object):
    """tap-ctl, nbd-client and rbd-nbd stand-ins, and a sysfs with /dev/nbd0..N-1."""

    def __init__(self, directory, nbd_devices=16):
        self.directory = directory
        self.bin = os.path.join(directory, "bin")
        self.sysfs = os.path.join(directory, "sys")
        os.makedirs(self.bin)
        for index in range(nbd_devices):
            os.makedirs(os.path.join(self.sysfs, "block", "nbd%d" % index))
        parameters = os.path.join(self.sysfs, "module", "nbd", "parameters")
        os.makedirs(parameters)   # the module is loaded, with this many devices
        with open(os.path.join(parameters, "nbds_max"), "w") as stream:
            stream.write("%d\n" % nbd_devices)
        for names, text in ((("tap-ctl", "nbd-client"), FAKE_SHELL_TOOL),
                            (("rbd-nbd",), FAKE_RBD_NBD % {"python": sys.executable,
                                                           "holder": HOLDER})):
            path = os.path.join(self.bin, names[0])
            with open(path, "w") as stream:
                stream.write(text)
            os.chmod(path, 0o755)
            for name in names[1:]:
                os.symlink(names[0], os.path.join(self.bin, name))

    def environ(self):
        return {"PATH": self.bin + os.pathsep + os.environ["PATH"],
                "XCP_RBD_SYSFS": self.sysfs, "XCP_RBD_FAKE_DIR": self.directory}

    def commands(self):
        """Every command run so far: [tool, arg, ...] lists, in order."""
        try:
            with open(os.path.join(self.directory, "journal")) as stream:
                return [json.loads(line) for line in stream]
        except IOError:
            return []

    def connected(self):
        """{/dev/nbdN: pid file content} of the devices in use."""
        block = os.path.join(self.sysfs, "block")
        found = {}
        for name in os.listdir(block):
            path = os.path.join(block, name, "pid")
            if os.path.exists(path):
                with open(path) as stream:
                    found["/dev/" + name] = stream.read()
        return found

    def close(self):
        """Stop the rbd-nbd stand-ins a failed test left mapped."""
        for content in self.connected().values():
            if int(content) > 1:
                try:
                    os.kill(int(content), signal.SIGKILL)
                except OSError:
                    pass


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


@contextlib.contextmanager
def nbd_client(backend):
    socket_path, export = nbd_export(backend)
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
