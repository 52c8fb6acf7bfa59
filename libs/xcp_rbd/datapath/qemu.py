"""The qemu backend: one qemu per attached volume serves the image over NBD.

qemu-storage-daemon (qemu-dp on XCP-ng; XCP_RBD_QEMU overrides) starts at
Datapath.attach with its QMP monitor and an NBD server on a unix socket, and
opens nothing: attach may run on a migration's destination while the source
still writes. activate opens the image with qemu's rbd driver (librbd inside
qemu) and exports it; the export is the `Nbd` implementation, and the dom0
block device comes from nbd-client on it (host). deactivate removes the export
and closes the image, which flushes it and drops its watch; detach ends qemu.
The same qemu runs a storage migration's mirror job (mirror).

How qemu reaches Ceph: `conf` and `user` are rbd driver options; the keyring
path, mon_host and a connect bound reach librados through CEPH_ARGS in qemu's
environment (the rbd driver has no option for them), so the key itself stays
in the keyring file. The image is opened with cache.direct (librbd's cache
off): a write qemu acknowledges is on the OSDs.
"""

import os
import subprocess
import threading
import time

from xcp_rbd import errors, log, protocol
from xcp_rbd.datapath import client_options, host

QEMU_DP = "/usr/lib64/qemu-dp/bin/qemu-dp"
NODE = "disk"  # one qemu per volume, so fixed node and export ids
QMP_SOCKET = "qmp.sock"
NBD_SOCKET = "nbd.sock"
LOG = "qemu.log"
START_TIMEOUT = 10
CONNECT_ATTEMPTS = 3
QUIT_TIMEOUT = 10


def binary():
    configured = os.environ.get("XCP_RBD_QEMU")
    if configured:
        return configured
    return QEMU_DP if os.path.exists(QEMU_DP) else "qemu-storage-daemon"


def _argv(program, qmp):
    if os.path.basename(program).startswith("qemu-dp"):
        return [program, qmp]  # qemu-dp's main takes the QMP socket path alone
    return [program, "--chardev", "socket,id=qmp,path=%s,server=on,wait=off" % qmp,
            "--monitor", "chardev=qmp"]


def _alive(att):
    """Whether the qemu recorded in the state runs (a reused pid is not it)."""
    pid = att.values.get("qemu_pid")
    if not pid:
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as stream:
            argv = stream.read()
        with open("/proc/%d/stat" % pid) as stream:
            status = stream.read().rpartition(")")[2].split()[0]
    except IOError:
        return False
    return status != "Z" and att.socket_path(QMP_SOCKET).encode("utf-8") in argv


def _log_tail(att):
    try:
        with open(att.path(LOG)) as stream:
            return stream.read()[-1000:].strip()
    except IOError:
        return ""


class Monitor(object):
    """A QMP session with a volume's qemu. A qemu that does not answer within
    `bound` seconds is killed, so that a hung daemon cannot hang the call: the
    call then gets errors.QemuFailed. Each wait on it is named to the watchdog."""

    def __init__(self, att, bound):
        self.att = att
        self.bound = bound
        self._qmp = None
        self._timer = None

    def __enter__(self):
        from qemu.qmp.legacy import QEMUMonitorProtocol  # only qemu calls pay for it
        self._timer = threading.Timer(self.bound, host.kill, [self.att.values["qemu_pid"]])
        self._timer.daemon = True
        self._timer.start()
        for _ in range(CONNECT_ATTEMPTS):
            self._qmp = QEMUMonitorProtocol(self.att.socket_path(QMP_SOCKET))
            try:
                with protocol.waiting_for(self._waiting("the handshake")):
                    self._qmp.connect()
                return self
            except Exception as exc:  # qemu.qmp's errors differ between versions
                # An event (a job changing state) that qemu sends before its answer
                # to qmp_capabilities fails qemu.qmp's handshake; the next session
                # does not meet the same event.
                failure = exc
        self._timer.cancel()
        raise errors.QemuFailed("cannot talk to qemu (pid %s): %s" % (
            self.att.values["qemu_pid"], failure))

    def _waiting(self, what):
        """The watchdog's words for a wait on this qemu's answer to `what`."""
        return "qemu (pid %s) to answer %s on its QMP monitor" % (
            self.att.values["qemu_pid"], what)

    def execute(self, command, arguments=None):
        """A QMP command's return value (cmd_obj: the same in every qemu.qmp)."""
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            with protocol.waiting_for(self._waiting(command)):
                reply = self._qmp.cmd_obj(message)
        except Exception as exc:
            raise errors.QemuFailed("qemu (pid %s) did not answer %s: %s" % (
                self.att.values["qemu_pid"], command, exc))
        if "error" in reply:
            raise errors.QemuError("%s: %s" % (
                command, reply["error"].get("desc", reply["error"])))
        return reply.get("return")

    def __exit__(self, *exc):
        self._timer.cancel()
        try:
            self._qmp.close()
        except Exception:  # the connection of a qemu that just quit or died
            pass


class Qemu(object):
    name = "qemu"

    def _bound(self, where):
        # blockdev-add connects to the cluster: up to client_mount_timeout.
        return 2 * where.cluster.timeout + 5

    def attach(self, att, where):
        if not _alive(att):
            self._start(att, where)

    def implementations(self, att, where):
        return [["Nbd", {"uri": "nbd:unix:%s:exportname=%s" % (
            att.socket_path(NBD_SOCKET), where.export)}]]

    def alive(self, att):
        return _alive(att)

    def _start(self, att, where):
        options = client_options(where.cluster)
        if any(" " in option for option in options):
            raise errors.InvalidConfiguration(
                "paths given to qemu may not contain spaces: %s" % " ".join(options))
        for name in (QMP_SOCKET, NBD_SOCKET):
            if os.path.exists(att.socket_path(name)):
                os.unlink(att.socket_path(name))
        program = binary()
        env = dict(os.environ, CEPH_ARGS=" ".join(options))
        argv, unit, preexec_fn = host.data_process(
            _argv(program, att.socket_path(QMP_SOCKET)), "qemu", att.volume_id)
        log_fd = os.open(att.path(LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # A session of its own: qemu outlives this script, and must not keep
            # the script's stdout (xapi-storage-script waits for it to close).
            # systemd-run --scope execs qemu: the pid is qemu's.
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                cwd=att.directory, env=env, start_new_session=True, preexec_fn=preexec_fn)
        except OSError as exc:
            raise errors.QemuFailed("cannot run %s: %s" % (program, exc))
        finally:
            os.close(log_fd)
        att.values.update(qemu_pid=process.pid, qemu_unit=unit)
        att.save()
        deadline = time.time() + START_TIMEOUT
        with protocol.waiting_for("%s (pid %d) to start" % (program, process.pid)):
            while not os.path.exists(att.socket_path(QMP_SOCKET)):
                if process.poll() is not None or time.time() > deadline:
                    host.kill(process.pid)
                    raise errors.QemuFailed("%s did not start: %s"
                                            % (program, _log_tail(att)))
                time.sleep(0.01)
        with Monitor(att, self._bound(where)) as qmp:
            qmp.execute("nbd-server-start", {"addr": {
                "type": "unix", "data": {"path": att.socket_path(NBD_SOCKET)}}})
        log.info("%s: qemu %d serves NBD on %s", where.spec, process.pid,
                 att.socket_path(NBD_SOCKET))

    def open(self, att, where, read_only):
        """Open the image in qemu and export it; the dom0 block device on it."""
        if not _alive(att):
            self._start(att, where)
        blockdev = {"driver": "rbd", "node-name": NODE, "pool": where.pool,
                    "image": where.image, "user": where.cluster.user,
                    "read-only": read_only, "discard": "unmap",
                    "cache": {"direct": True, "no-flush": False}}
        if where.namespace:
            blockdev["namespace"] = where.namespace
        if where.snap:
            blockdev["snapshot"] = where.snap
        if os.path.isfile(where.cluster.conf):
            blockdev["conf"] = where.cluster.conf
        with Monitor(att, self._bound(where)) as qmp:
            qmp.execute("blockdev-add", blockdev)
            qmp.execute("block-export-add", {
                "type": "nbd", "id": NODE, "node-name": NODE,
                "name": where.export, "writable": not read_only})
        return host.nbd_connect(att.socket_path(NBD_SOCKET), where.export)

    def close(self, att, where):
        """Drop the export and close the image (flushing it). True when qemu had
        died or had to be killed: its Ceph client must then be fenced."""
        if att.values.get("device"):
            host.nbd_disconnect(att.values["device"])
        if not _alive(att):
            return True
        try:
            with Monitor(att, self._bound(where)) as qmp:
                self._close(qmp)
        except errors.QemuFailed as exc:
            log.warning("%s: %s; killing it", where.spec, exc)
            host.kill(att.values["qemu_pid"])
            return True
        return False

    def _close(self, qmp):
        """Undo open, also half of it (open failed), also none of it."""
        if any(export["id"] == NODE for export in qmp.execute("query-block-exports")):
            # hard: drop NBD clients still connected (the VM is gone by now).
            qmp.execute("block-export-del", {"id": NODE, "mode": "hard"})
            while any(export["id"] == NODE
                      for export in qmp.execute("query-block-exports")):
                time.sleep(0.01)  # bounded by the Monitor's kill timer
        if any(node["node-name"] == NODE
               for node in qmp.execute("query-named-block-nodes")):
            qmp.execute("blockdev-del", {"node-name": NODE})

    def detach(self, att, where):
        """End qemu: quit, or SIGKILL when it does not."""
        if not _alive(att):
            return
        try:
            with Monitor(att, QUIT_TIMEOUT) as qmp:
                qmp.execute("quit")
        except errors.QemuFailed as exc:
            log.warning("%s: %s", where.spec, exc)
        deadline = time.time() + QUIT_TIMEOUT
        while _alive(att) and time.time() < deadline:
            time.sleep(0.01)
        if _alive(att):
            log.warning("%s: qemu %d did not quit: killing it", where.spec,
                        att.values["qemu_pid"])
            host.kill(att.values["qemu_pid"])
