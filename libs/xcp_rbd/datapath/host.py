"""The datapath steps that need Xen, the kernel's NBD driver or systemd: they run
on an XCP-ng dom0 only, and everything else in the datapath runs anywhere.

- tapdisk (blktap3) is the Xen side of both backends (backend type `vbd3`), as
  in XCP-ng's own tapdisk datapath: spawn + allocate + attach at
  Datapath.attach, open on the dom0 block device at activate, close at
  deactivate, destroy at detach. Every open also starts tapdisk's NBD server
  for the VBD (nbd_socket), and `-2` adds a secondary that gets every write
  first (a storage migration's mirror);
- the dom0 block device: `rbd-nbd map` (rbd-nbd backend) or `nbd-client` on
  qemu's NBD socket (qemu backend), both /dev/nbdN.

Data processes outlive the script that starts them (tapdisk, rbd-nbd's
daemon, qemu, a mirror's relay): start_data_process puts each in a systemd
scope of its own under vm.slice, so that a toolstack restart, which kills
everything in xapi-storage-script.service's cgroup, leaves the VMs their
disks, and shields it from the OOM killer, which would take a VM's disk to
save memory elsewhere. What finds it again (pid, unit) goes in the volume's
state.

NBD_TIMEOUT is the kernel's request timeout on both backends' devices. On
4.19 a request that outlives it fails and the device is dead for good (no
reconnect), so it must outlast what Ceph takes to recover: an OSD failure is
noticed after osd_heartbeat_grace (20 s) and peering follows; an OSD restart
(an upgrade, with noout) or a monitor election can take a minute. 120 s
covers these; a cluster down for longer gives the guest I/O errors then,
rather than hanging it for good. The kernel's default is 30 s.

Each function returns what later steps need, for the caller to keep in the
volume's state. No key is ever on a command line: rbd-nbd gets keyring paths.
"""

import json
import os
import re
import signal
import subprocess
import time

from xcp_rbd import errors, log, protocol
from xcp_rbd.datapath import state

COMMAND_TIMEOUT = 30
NBD_TIMEOUT = 120
SLICE = "vm.slice"  # where XCP-ng runs the VMs' own processes (qemu-dp, xenopsd's)
OOM_SCORE_ADJ = "-1000"  # never chosen: the VM would lose its disk
EXIT_TIMEOUT = 30  # rbd-nbd's daemon closing the image after unmap
# Tests move these (there is no Xen, kernel NBD or systemd here).
BLKTAP_CONTROL = os.environ.get("XCP_RBD_BLKTAP_CONTROL", "/run/blktap-control")
SYSTEMD_RUNTIME = os.environ.get("XCP_RBD_SYSTEMD_RUNTIME", "/run/systemd/system")


def _run(argv, preexec_fn=None):
    """Run a host command; its stdout, or a clear error."""
    log.info("running %s", " ".join(argv))
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True,
                                   preexec_fn=preexec_fn)
    except OSError as exc:
        raise errors.HostCommandFailed("cannot run %s: %s" % (argv[0], exc))
    try:
        with protocol.waiting_for("%s to finish" % " ".join(argv)):
            out, err = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise errors.HostCommandFailed("%s did not finish within %d s"
                                       % (" ".join(argv), COMMAND_TIMEOUT))
    if process.returncode != 0:
        raise errors.HostCommandFailed("%s failed (exit %d): %s" % (
            " ".join(argv), process.returncode, err.strip()))
    return out.strip()


def _shield_from_oom():
    """In the child, before exec: inherited by everything it starts. Lowering it
    needs CAP_SYS_RESOURCE, which dom0's root has; without it the process starts
    unshielded (diagnostics show each data process' oom_score_adj)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as stream:
            stream.write(OOM_SCORE_ADJ)
    except OSError:
        pass


def oom_score_adj(pid):
    try:
        with open("/proc/%d/oom_score_adj" % pid) as stream:
            return int(stream.read())
    except (IOError, ValueError, TypeError):
        return None


def data_process(argv, role, volume_id):
    """(argv, unit, preexec_fn) that start `argv` as a data process (see the
    module's doc): in scope unit xcp-rbd-<role>-<volume id>-<random> of vm.slice.
    Without systemd (not a dom0) it stays in the caller's cgroup."""
    if not os.path.isdir(SYSTEMD_RUNTIME):  # sd_booted()
        log.warning("no systemd here: %s stays in the caller's cgroup", argv[0])
        return argv, None, _shield_from_oom
    unit = "xcp-rbd-%s-%s-%s" % (role, volume_id, os.urandom(3).hex())
    return (["systemd-run", "--scope", "--slice=" + SLICE, "--unit=" + unit,
             "--description=xcp-rbd %s of %s" % (role, volume_id), "--"] + argv,
            unit, _shield_from_oom)


def running(pid):
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open("/proc/%d/stat" % pid) as stream:
            return stream.read().rpartition(")")[2].split()[0] != "Z"
    except (IOError, TypeError):
        return False


def _tap_args(tapdisk):
    return ["-m", str(tapdisk["minor"]), "-p", str(tapdisk["pid"])]


def tapdisk_create(volume_id):
    """A tapdisk process with a Xen block device (/dev/xen/blktap-2/tapdevN),
    nothing opened yet: {"pid", "minor", "path", "unit"}."""
    argv, unit, preexec_fn = data_process(["tap-ctl", "spawn"], "tapdisk", volume_id)
    pid = int(_run(argv, preexec_fn).split()[-1])
    minor = None
    try:
        path = _run(["tap-ctl", "allocate"])
        minor = int(re.search(r"(\d+)$", path).group(1))
        tapdisk = {"pid": pid, "minor": minor, "path": path, "unit": unit}
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


def tapdisk_reopen(tapdisk, device):
    """Move an open tapdisk onto another dom0 block device (its data process died):
    pause, then unpause on the new device, as SMAPIv1 reloads a VHD chain. The
    domains keep their VBD; the requests the dead device failed stay failed."""
    _run(["tap-ctl", "pause"] + _tap_args(tapdisk))
    _run(["tap-ctl", "unpause"] + _tap_args(tapdisk) + ["-a", "aio:" + device])


def nbd_socket(tapdisk):
    """The unix socket of the NBD server tapdisk runs for its VBD while it is open
    (blktap's tapdisk_nbdserver_alloc: nbd<pid>.<minor>); it serves any export name."""
    return os.path.join(BLKTAP_CONTROL, "nbd%d.%d" % (tapdisk["pid"], tapdisk["minor"]))


def tapdisk_mirror(tapdisk, secondary):
    """Make `secondary` (nbd:<socket>, or null to drop it) tapdisk's secondary in
    mirror mode: from the unpause on, every write goes to it before the primary.
    The pause lets the writes in flight finish first."""
    _run(["tap-ctl", "pause"] + _tap_args(tapdisk))
    try:
        _run(["tap-ctl", "unpause"] + _tap_args(tapdisk) + ["-2", secondary])
    except errors.StorageError:
        _run(["tap-ctl", "unpause"] + _tap_args(tapdisk))  # the VM's I/O goes on
        raise


def tapdisk_stats(tapdisk):
    """tap-ctl stats' JSON (nbd_mirror_failed: the secondary failed a write)."""
    return json.loads(_run(["tap-ctl", "stats"] + _tap_args(tapdisk)))


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
    raise _all_nbd_devices_used(len(names))


def _nbd_devices():
    block = _sysfs("block")
    names = [name for name in os.listdir(block) if re.match(r"nbd\d+$", name)] \
        if os.path.isdir(block) else []
    return sorted(names, key=lambda name: int(name[3:]))


def _all_nbd_devices_used(count):
    return errors.NoNbdDevice(
        "all %d NBD devices of this host (/dev/nbd*) are in use: the "
        "nbd module makes nbds_max of them when it loads. Give it more with "
        "'options nbd nbds_max=128' in /etc/modprobe.d/nbd.conf, then reload it "
        "while no NBD device is in use (modprobe -r nbd; modprobe nbd) or reboot"
        % count)


def nbd_connect(socket_path, export):
    """A dom0 block device on an NBD export served on a unix socket."""
    with state.host_lock("nbd"):
        device = free_nbd_device()
        if device is None:
            raise errors.NoNbdDevice("the nbd kernel module is not loaded: "
                                     "modprobe nbd nbds_max=128")
        _run(["nbd-client", "-unix", socket_path, device, "-name", export,
              "-block-size", "512", "-timeout", str(NBD_TIMEOUT)])
    return device


def nbd_disconnect(device):
    _run(["nbd-client", "-d", device])


def rbd_nbd_map(spec, options, read_only, volume_id):
    """`rbd-nbd map`: a daemon of its own opens the image (a data process);
    returns {"device": /dev/nbdN, "pid": the daemon's, "unit"}."""
    argv, unit, preexec_fn = data_process(
        ["rbd-nbd", "map", "--timeout", str(NBD_TIMEOUT)] + options
        + (["--read-only"] if read_only else []) + [spec], "rbd-nbd", volume_id)
    # The host lock keeps rbd-nbd from choosing a device nbd_connect is choosing.
    with state.host_lock("nbd"):
        free_nbd_device()
        try:
            out = _run(argv, preexec_fn)
        except errors.StorageError as exc:
            if "failed to find unused device" in exc.params[-1]:  # taken meanwhile
                raise _all_nbd_devices_used(len(_nbd_devices()))
            raise
    device = out.splitlines()[-1].strip()
    return {"device": device, "pid": nbd_client_pid(device), "unit": unit}


def nbd_client_pid(device):
    """The pid of the process serving /dev/nbdN (the kernel's pid attribute), or
    None when nothing does."""
    try:
        with open(_sysfs("block", os.path.basename(device), "pid")) as stream:
            return int(stream.read())
    except (IOError, ValueError):
        return None


def rbd_nbd_unmap(device, pid):
    """Unmapping ends the rbd-nbd daemon, which flushes and closes the image. unmap
    returns before that: wait for the daemon, so that the image is closed (and its
    client gone) when this returns."""
    serving = nbd_client_pid(device)
    if serving is not None and pid in (serving, None):  # not a device reused since
        _run(["rbd-nbd", "unmap", device])
    deadline = time.time() + EXIT_TIMEOUT
    while running(pid):
        if time.time() > deadline:
            log.warning("rbd-nbd %d did not end within %d s after unmap: killing it",
                        pid, EXIT_TIMEOUT)
            kill(pid)
            return
        time.sleep(0.01)


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass  # already gone
