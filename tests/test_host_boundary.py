"""The host boundary (xcp_rbd.datapath.host): the tap-ctl, nbd-client and rbd-nbd
steps that need Xen or kernel NBD, which this machine has not.

`FakeHost` puts stand-ins for those three tools first on PATH, and a sysfs for
their /dev/nbdN: each records its command line and keeps the state the real
tool keeps. The rbd-nbd stand-in even opens the image with librbd in a daemon
of its own, as rbd-nbd does, so the activation lock sees a real client. The
tests check the commands each datapath step runs, in order, and the state the
datapath keeps; everything behind the boundary is real (cluster, scripts,
locks). test_datapath.py and bench/ use FakeHost for the tapdisk steps of the
qemu backend.
"""

import json
import os
import signal
import sys

import pytest

from conftest import new_uuid

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
    sys.exit("no free nbd device")

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


@pytest.fixture(scope="session")
def fake_host(tmp_path_factory):
    host = FakeHost(str(tmp_path_factory.mktemp("fakehost")))
    saved = {key: os.environ.get(key) for key in host.environ()}
    os.environ.update(host.environ())
    os.environ.setdefault("XCP_RBD_HOST_UUID", new_uuid())
    yield host
    host.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _since(host, mark):
    return host.commands()[mark:]


def test_rbd_nbd_lifecycle_runs_these_commands(xapi, sr_uuid, fake_host, cluster):
    """The default backend through the installed scripts: the host commands of each
    step, the state kept between calls, and none of it left after detach."""
    vdi = xapi.vdi_create(sr_uuid, "16M")
    uri = vdi["uri"][0]
    assert "backend=rbd-nbd" in uri
    mark = len(fake_host.commands())
    backend = xapi.datapath("Datapath.attach", uri=uri, domain="7")
    spawn, allocate, attach = _since(fake_host, mark)  # attach maps nothing
    assert spawn == ["tap-ctl", "spawn"] and allocate == ["tap-ctl", "allocate"]
    pid = attach[attach.index("-p") + 1]
    minor = attach[attach.index("-m") + 1]
    tapdev = "/dev/xen/blktap-2/tapdev%s" % minor
    assert attach == ["tap-ctl", "attach", "-m", minor, "-p", pid]
    assert backend == {"implementations": [
        ["XenDisk", {"backend_type": "vbd3", "params": tapdev, "extra": {}}],
        ["BlockDevice", {"path": tapdev}]]}

    mark = len(fake_host.commands())
    xapi.datapath("Datapath.activate", uri=uri, domain="7")
    rbd_map, tap_open = _since(fake_host, mark)
    spec = "%s/%s/%s" % (cluster.pool, xapi._state()["device_config"][sr_uuid]["namespace"],
                         vdi["key"])
    assert rbd_map[:2] == ["rbd-nbd", "map"] and rbd_map[-1] == spec
    options = dict(zip(rbd_map[2:-1:2], rbd_map[3:-1:2]))
    assert options["--id"] == cluster.user and options["-c"] == cluster.conf
    assert options["--keyring"] == cluster.keyring
    [device] = fake_host.connected()
    assert tap_open == ["tap-ctl", "open", "-m", minor, "-p", pid, "-a", "aio:" + device]

    # idempotent, and the state survives between the calls
    mark = len(fake_host.commands())
    xapi.datapath("Datapath.activate", uri=uri, domain="7")
    assert _since(fake_host, mark) == []
    [state_dir] = os.listdir(os.path.join(os.environ["XCP_RBD_RUN_DIR"], "datapath"))
    with open(os.path.join(os.environ["XCP_RBD_RUN_DIR"], "datapath", state_dir,
                           "attachment.json")) as stream:
        kept = json.load(stream)
    assert kept["device"] == device and kept["tapdisk"]["path"] == tapdev
    assert kept["claimed"] and len(kept["clients"]) == 1  # the rbd-nbd daemon's client

    mark = len(fake_host.commands())
    xapi.datapath("Datapath.deactivate", uri=uri, domain="")
    assert _since(fake_host, mark) == [["tap-ctl", "close", "-m", minor, "-p", pid],
                                       ["rbd-nbd", "unmap", device]]
    mark = len(fake_host.commands())
    xapi.datapath("Datapath.deactivate", uri=uri, domain="")
    xapi.datapath("Datapath.detach", uri=uri, domain="")
    assert _since(fake_host, mark) == [["tap-ctl", "destroy", "-m", minor, "-p", pid]]
    assert fake_host.connected() == {}
    assert os.listdir(os.path.join(os.environ["XCP_RBD_RUN_DIR"], "datapath")) == []
    xapi.vdi_destroy(sr_uuid, vdi["key"])


def test_rbd_nbd_second_host_is_refused(xapi, sr_uuid, fake_host, tmp_path):
    """The activation lock with rbd-nbd's client: refused while mapped on host A."""
    vdi = xapi.vdi_create(sr_uuid, "16M")
    uri = vdi["uri"][0]
    host_a = os.environ["XCP_RBD_HOST_UUID"]
    xapi.datapath("Datapath.attach", uri=uri, domain="3")
    xapi.datapath("Datapath.activate", uri=uri, domain="3")
    saved = os.environ["XCP_RBD_RUN_DIR"], host_a
    os.environ["XCP_RBD_RUN_DIR"], os.environ["XCP_RBD_HOST_UUID"] = str(tmp_path), new_uuid()
    try:
        xapi.datapath("Datapath.attach", uri=uri, domain="9")
        with pytest.raises(Exception) as refused:
            xapi.datapath("Datapath.activate", uri=uri, domain="9")
        assert refused.value.params[:2] == ["Activated_on_another_host", host_a]
        xapi.datapath("Datapath.detach", uri=uri, domain="9")
    finally:
        os.environ["XCP_RBD_RUN_DIR"], os.environ["XCP_RBD_HOST_UUID"] = saved
    xapi.datapath("Datapath.deactivate", uri=uri, domain="3")
    xapi.datapath("Datapath.detach", uri=uri, domain="3")
    assert fake_host.connected() == {}


def test_tapdisk_create_frees_what_it_got_when_attach_fails(fake_host, install, tmp_path):
    """A tap-ctl attach that fails leaves no minor allocated (host.tapdisk_create)."""
    from xcp_rbd import protocol
    from xcp_rbd.datapath import host
    failing = tmp_path / "bin"
    failing.mkdir()
    (failing / "tap-ctl").write_text(
        "#!/bin/sh\necho \"$*\" >> %s/calls\ncase $1 in spawn) echo 123456789;; "
        "allocate) echo /dev/xen/blktap-2/tapdev5;; attach) exit 1;; esac\n" % tmp_path)
    (failing / "tap-ctl").chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = str(failing) + os.pathsep + path
    try:
        with pytest.raises(protocol.StorageError):
            host.tapdisk_create()
    finally:
        os.environ["PATH"] = path
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["spawn", "allocate", "attach -m 5 -p 123456789", "free -m 5"]


def test_nbd_connect_takes_the_first_free_device(fake_host, install):
    from xcp_rbd.datapath import host
    first = host.nbd_connect("/run/a.sock", "a")
    second = host.nbd_connect("/run/b.sock", "b")
    assert (first, second) == ("/dev/nbd0", "/dev/nbd1")
    assert fake_host.commands()[-1] == ["nbd-client", "-unix", "/run/b.sock", "/dev/nbd1",
                                        "-name", "b", "-block-size", "512"]
    host.nbd_disconnect(first)
    assert host.nbd_connect("/run/c.sock", "c") == "/dev/nbd0"
    host.nbd_disconnect("/dev/nbd0")
    host.nbd_disconnect(second)
    assert fake_host.connected() == {}


def test_host_command_failure_is_clear(fake_host, install):
    from xcp_rbd import protocol
    from xcp_rbd.datapath import host
    with pytest.raises(protocol.StorageError) as failed:
        host.rbd_nbd_unmap("/dev/nbd-not-here")
    assert failed.value.params[0] == "Host_command_failed"
    assert "rbd-nbd unmap /dev/nbd-not-here" in failed.value.params[1]
