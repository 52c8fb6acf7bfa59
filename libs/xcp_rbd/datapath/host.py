"""The datapath steps that need Xen or the kernel's NBD driver: they run on an
XCP-ng dom0 only, and everything else in the datapath runs anywhere.

- tapdisk (blktap3) is the Xen side of both backends (backend type `vbd3`), as
  in XCP-ng's own tapdisk datapath: spawn + allocate + attach at
  Datapath.attach, open on the dom0 block device at activate, close at
  deactivate, destroy at detach;
- the dom0 block device: `rbd-nbd map` (rbd-nbd backend) or `nbd-client` on
  qemu's NBD socket (qemu backend), both /dev/nbdN.

Each function returns what later steps need, for the caller to keep in the
volume's state. No key is ever on a command line: rbd-nbd gets keyring paths.
"""

import os
import re
import signal
import subprocess

from xcp_rbd import log, protocol
from xcp_rbd.datapath import state

COMMAND_TIMEOUT = 30


def _run(argv):
    """Run a host command; its stdout, or a clear error."""
    log.info("running %s", " ".join(argv))
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True)
    except OSError as exc:
        raise protocol.failure("Host_command_failed", "cannot run %s: %s" % (argv[0], exc))
    try:
        out, err = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise protocol.failure("Host_command_failed", "%s did not finish within %d s"
                               % (" ".join(argv), COMMAND_TIMEOUT))
    if process.returncode != 0:
        raise protocol.failure("Host_command_failed", "%s failed (exit %d): %s" % (
            " ".join(argv), process.returncode, err.strip()))
    return out.strip()


def _tap_args(tapdisk):
    return ["-m", str(tapdisk["minor"]), "-p", str(tapdisk["pid"])]


def tapdisk_create():
    """A tapdisk process with a Xen block device (/dev/xen/blktap-2/tapdevN),
    nothing opened yet: {"pid", "minor", "path"}."""
    pid = int(_run(["tap-ctl", "spawn"]).split()[-1])
    minor = None
    try:
        path = _run(["tap-ctl", "allocate"])
        minor = int(re.search(r"(\d+)$", path).group(1))
        tapdisk = {"pid": pid, "minor": minor, "path": path}
        _run(["tap-ctl", "attach"] + _tap_args(tapdisk))
        return tapdisk
    except Exception:
        # Leak no tapdisk process or minor when attach fails half-way.
        try:
            if minor is not None:
                _run(["tap-ctl", "free", "-m", str(minor)])
            os.kill(pid, signal.SIGTERM)
        except Exception as exc:  # the first error is the one to report
            log.warning("cleaning up tapdisk %d: %s", pid, exc)
        raise


def tapdisk_open(tapdisk, device, read_only):
    _run(["tap-ctl", "open"] + _tap_args(tapdisk) + ["-a", "aio:" + device]
         + (["-R"] if read_only else []))


def tapdisk_close(tapdisk):
    """Flush tapdisk's I/O and let go of the dom0 block device."""
    _run(["tap-ctl", "close"] + _tap_args(tapdisk))


def tapdisk_destroy(tapdisk):
    _run(["tap-ctl", "destroy"] + _tap_args(tapdisk))


def _sysfs(*path):
    return os.path.join(os.environ.get("XCP_RBD_SYSFS", "/sys"), *path)  # tests move it


def free_nbd_device():
    """The first /dev/nbdN with no client connected (no pid in sysfs), None while
    the nbd module is not loaded (rbd-nbd's first map loads it), or a clear error:
    the module makes nbds_max devices when it loads (16 by default), shared with
    xapi's own nbd-client users, and no more."""
    if not os.path.isdir(_sysfs("module", "nbd")):
        return None
    names = _nbd_devices()
    for name in names:
        if not os.path.exists(_sysfs("block", name, "pid")):
            return "/dev/" + name
    raise NoNbdDevice(len(names))


def _nbd_devices():
    block = _sysfs("block")
    names = [name for name in os.listdir(block) if re.match(r"nbd\d+$", name)] \
        if os.path.isdir(block) else []
    return sorted(names, key=lambda name: int(name[3:]))


class NoNbdDevice(protocol.StorageError):
    def __init__(self, count):
        super(NoNbdDevice, self).__init__([
            "No_nbd_device", "all %d NBD devices of this host (/dev/nbd*) are in use: the "
            "nbd module makes nbds_max of them when it loads. Give it more with "
            "'options nbd nbds_max=128' in /etc/modprobe.d/nbd.conf, then reload it "
            "while no NBD device is in use (modprobe -r nbd; modprobe nbd) or reboot"
            % count])


def nbd_connect(socket_path, export):
    """A dom0 block device on an NBD export served on a unix socket."""
    with state.host_lock("nbd"):
        device = free_nbd_device()
        if device is None:
            raise protocol.failure("No_nbd_device", "the nbd kernel module is not loaded: "
                                   "modprobe nbd nbds_max=128")
        _run(["nbd-client", "-unix", socket_path, device, "-name", export,
              "-block-size", "512"])
    return device


def nbd_disconnect(device):
    _run(["nbd-client", "-d", device])


def rbd_nbd_map(spec, options, read_only):
    """`rbd-nbd map`: a daemon of its own opens the image; returns /dev/nbdN."""
    # The host lock keeps rbd-nbd from choosing a device nbd_connect is choosing.
    with state.host_lock("nbd"):
        free_nbd_device()
        try:
            out = _run(["rbd-nbd", "map"] + options
                       + (["--read-only"] if read_only else []) + [spec])
        except protocol.StorageError as exc:
            if "failed to find unused device" in exc.params[-1]:  # taken meanwhile
                raise NoNbdDevice(len(_nbd_devices()))
            raise
    return out.splitlines()[-1].strip()


def rbd_nbd_unmap(device):
    """Unmapping flushes and closes the image and ends the rbd-nbd daemon."""
    _run(["rbd-nbd", "unmap", device])
