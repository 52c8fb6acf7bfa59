"""tapdisk (blktap v3.55.5 drivers/), as far as the datapath uses it: a
process that serves VBDs, driven over its control socket ctl<pid> in
/run/blktap-control (XCP_RBD_BLKTAP_CONTROL here) by tap-ctl.

- open `aio:/dev/nbdN`: the device through the kernel model; every open also
  starts the VBD's NBD server nbd<pid>.<minor> (tapdisk-vbd.c
  tapdisk_vbd_start_nbdservers), fixed newstyle, any export name, flags
  HAS_FLAGS only (READ_ONLY with -R), which stands for the guest here;
- a secondary `nbd:<socket>` (open or unpause -2): tapdisk connects as a
  newstyle client with export name "tapdisk_client" and its NUL, refuses a
  target of another size, and then queues every write to it before the
  primary; an error from it disables mirroring and sets nbd_mirror_failed,
  and the guest's write still completes (tapdisk_vbd_complete_td_request);
- pause waits for requests in flight and holds new ones; unpause -a reopens
  the VBD on another image; close ends the secondary; tapdisk exits once its
  last VBD is detached.
"""

import errno
import json
import os
import socket
import struct
import sys
import threading

from standins import kernel
from xcp_rbd.datapath import nbd_wire

CONTROL = os.environ.get("XCP_RBD_BLKTAP_CONTROL", "/run/blktap-control")
TAPDISK_CLIENT = b"tapdisk_client\0"


class ControlError(Exception):
    def __init__(self, code, message):
        super(ControlError, self).__init__(message)
        self.code = code


def _connect_secondary(path):
    """tdnbd_nbd_negotiate_new: NBD_OPT_EXPORT_NAME with tapdisk's own name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if nbd_wire.recv_exact(sock, 16) != nbd_wire.NBDMAGIC + struct.pack(">Q", nbd_wire.IHAVEOPT):
        raise nbd_wire.NbdError("not a newstyle server")
    nbd_wire.recv_exact(sock, 2)
    sock.sendall(struct.pack(">I", nbd_wire.FLAG_FIXED_NEWSTYLE | nbd_wire.FLAG_NO_ZEROES))
    sock.sendall(struct.pack(">QII", nbd_wire.IHAVEOPT, nbd_wire.OPT_EXPORT_NAME,
                             len(TAPDISK_CLIENT)) + TAPDISK_CLIENT)
    size, flags = struct.unpack(">QH", nbd_wire.recv_exact(sock, 10))
    return nbd_wire.Connection(sock, size, flags)


class Vbd(object):
    def __init__(self, pid, minor):
        self.name = os.path.join(CONTROL, "nbd%d.%d" % (pid, minor))
        self.minor = minor
        self.params = None
        self.primary = None
        self.secondary = None
        self.read_only = False
        self.mirror_failed = 0
        self.io_lock = threading.Lock()  # one request at a time; held while paused
        self.paused = False
        self._listener = None
        self._clients = []

    def open(self, params, read_only, secondary):
        if self.primary:
            raise ControlError(errno.EBUSY, "already open")
        driver, _, path = params.partition(":")
        if driver != "aio":
            raise ControlError(errno.EINVAL, "the stand-in knows aio only")
        try:
            self.primary = kernel.Device(path)
        except kernel.DeviceError as exc:
            raise ControlError(errno.ENXIO, str(exc))
        self.params, self.read_only = params, read_only
        if secondary:
            self.add_secondary(secondary)
        self._start_server()

    def add_secondary(self, secondary):
        kind, _, path = secondary.partition(":")
        if secondary == "null":
            self._drop_secondary()
            return
        if kind != "nbd":
            raise ControlError(errno.EINVAL, "secondary %s: nbd only" % secondary)
        try:
            connection = _connect_secondary(path)
        except (OSError, nbd_wire.NbdError) as exc:
            raise ControlError(errno.EIO, "secondary %s: %s" % (secondary, exc))
        if connection.size != self.primary.size:
            connection.disconnect()
            raise ControlError(errno.EINVAL, "secondary has %d bytes, the leaf %d"
                               % (connection.size, self.primary.size))
        self._drop_secondary()
        self.secondary, self.mirror_failed = connection, 0

    def _drop_secondary(self):
        if self.secondary:
            self.secondary.disconnect()
            self.secondary = None

    def _start_server(self):
        if os.path.exists(self.name):
            os.unlink(self.name)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.name)
        self._listener.listen(8)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            self._clients.append(sock)
            flags = nbd_wire.TRANSMISSION_READ_ONLY if self.read_only else 0
            threading.Thread(target=kernel.serve_nbd, args=(
                sock, self.primary.size, flags, self.request), daemon=True).start()

    def request(self, command, offset, length, data):
        if command == nbd_wire.CMD_WRITE and self.read_only:
            raise kernel.DeviceError("read-only")
        with self.io_lock:
            if command == nbd_wire.CMD_WRITE and self.secondary:
                try:
                    self.secondary.pwrite(data, offset)  # first, as in mirror mode
                except (OSError, nbd_wire.NbdError):
                    self.mirror_failed = 1
                    self.secondary.sock.close()
                    self.secondary = None
            return self.primary.request(command, offset, length, data)

    def pause(self):
        if not self.paused:
            self.io_lock.acquire()
            self.paused = True

    def unpause(self, params, secondary):
        """Resume, on a new image first when given one (tapdisk_vbd_resume)."""
        if params:
            try:
                primary = kernel.Device(params.partition(":")[2])
            except kernel.DeviceError as exc:
                raise ControlError(errno.ENXIO, str(exc))
            self.primary.close()
            self.primary, self.params = primary, params
        if secondary:
            self.add_secondary(secondary)
        if self.paused:
            self.paused = False
            self.io_lock.release()

    def close(self):
        if self._listener:
            self._listener.close()
            os.unlink(self.name)
            self._listener = None
        for sock in self._clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._clients = []
        if not self.paused:  # else held already
            self.io_lock.acquire()
        try:
            self._drop_secondary()
            if self.primary:
                self.primary.close()
                self.primary = None
        finally:
            self.paused = False
            self.io_lock.release()
        self.params = None

    def stats(self):
        return {"name": self.params, "minor": self.minor,
                "nbd_mirror_failed": self.mirror_failed,
                "reqs_outstanding": 0, "read_only": self.read_only}


class Tapdisk(object):
    def __init__(self):
        self.pid = os.getpid()
        self.vbds = {}

    def vbd(self, minor):
        if minor not in self.vbds:
            raise ControlError(errno.EINVAL, "no VBD with minor %d" % minor)
        return self.vbds[minor]

    def handle(self, message):
        op, minor = message["op"], message.get("minor")
        if op == "attach":
            self.vbds.setdefault(minor, Vbd(self.pid, minor))
        elif op == "open":
            self.vbd(minor).open(message["params"], message["read_only"],
                                 message.get("secondary"))
        elif op == "pause":
            self.vbd(minor).pause()
        elif op == "unpause":
            self.vbd(minor).unpause(message.get("params"), message.get("secondary"))
        elif op == "close":
            self.vbd(minor).close()
        elif op == "detach":
            self.vbd(minor).close()
            del self.vbds[minor]
        elif op == "stats":
            return self.vbd(minor).stats()
        elif op == "list":
            return [[vbd.minor, 0x2 if vbd.paused else 0, vbd.params]
                    for vbd in self.vbds.values()]
        return {}


def main():
    tapdisk = Tapdisk()
    path = os.path.join(CONTROL, "ctl%d" % tapdisk.pid)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(8)
    os.rename(path + ".tmp", path)  # tap-ctl spawn returns once it exists
    attached = False
    try:
        while not attached or tapdisk.vbds:
            sock, _ = listener.accept()
            with sock, sock.makefile("rw") as stream:
                message = json.loads(stream.readline())
                try:
                    reply = {"error": 0, "result": tapdisk.handle(message)}
                except ControlError as exc:
                    reply = {"error": exc.code, "message": str(exc)}
                stream.write(json.dumps(reply) + "\n")
            attached = attached or message["op"] == "attach"
    finally:
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
