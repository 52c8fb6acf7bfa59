"""The dom0 kernel's side of /dev/nbdN (Linux 4.19 drivers/block/nbd.c), and
what every stand-in shares: the journal and the fake sysfs.

A device is the directory sys/block/nbdN: `pid` exists while a userspace
client is attached (its pid), `backend` names the NBD server behind the device
and the request timeout the client set. Device opens a device as tapdisk's aio
driver does and sends it requests with the driver's rules: a timeout of 0
through the ioctl interface is ignored (blk-mq's 30 s stays), and a request
that outlives it fails with an I/O error and shuts the device down, so that
every later request fails too (nbd_xmit_timeout, sock_shutdown).
"""

import fcntl
import json
import os
import socket
import time

from xcp_rbd.datapath import nbd_wire

FAKE = os.environ.get("XCP_RBD_FAKE_DIR", "")
SYSFS = os.environ.get("XCP_RBD_SYSFS", "")
DEFAULT_TIMEOUT = 30


def journal(argv):
    with open(os.path.join(FAKE, "journal"), "a") as stream:
        stream.write(json.dumps(argv) + "\n")


def log(who, message):
    """A line in the stand-ins' log (dmesg, rbd-nbd's log file): for a failed test."""
    with open(os.path.join(FAKE, "log"), "a") as stream:
        stream.write("%.3f %s[%d]: %s\n" % (time.time(), who, os.getpid(), message))


def count(name):
    """A host-wide counter (tapdisk minors): its value, then incremented."""
    with open(os.path.join(FAKE, name), "a+") as stream:
        fcntl.flock(stream, fcntl.LOCK_EX)
        stream.seek(0)
        value = int(stream.read() or 0)
        stream.seek(0)
        stream.truncate()
        stream.write(str(value + 1))
        return value


def device_dir(device):
    return os.path.join(SYSFS, "block", os.path.basename(device))


def devices():
    names = os.listdir(os.path.join(SYSFS, "block"))
    return ["/dev/" + name for name in sorted(names, key=lambda name: int(name[3:]))]


def client_pid(device):
    """The attached client's pid, or None while the device is free."""
    try:
        with open(os.path.join(device_dir(device), "pid")) as stream:
            return int(stream.read())
    except IOError:
        return None


def device_lock():
    """Held while a client picks a free device (the kernel's NBD_SET_SOCK race)."""
    stream = open(os.path.join(FAKE, "nbd.lock"), "a")
    fcntl.flock(stream, fcntl.LOCK_EX)
    return stream


def connect(device, pid, socket_path, export, timeout):
    with open(os.path.join(device_dir(device), "backend"), "w") as stream:
        json.dump({"socket": socket_path, "export": export, "timeout": timeout}, stream)
    with open(os.path.join(device_dir(device), "pid"), "w") as stream:
        stream.write(str(pid))  # last: from now on the device is in use


def disconnect(device):
    for name in ("pid", "backend"):
        try:
            os.unlink(os.path.join(device_dir(device), name))
        except OSError:
            pass


class DeviceError(Exception):
    pass


def serve_nbd(sock, size, flags, execute, failures=(DeviceError,)):
    """The server's side of one NBD connection (rbd-nbd's daemon, tapdisk's
    server): the handshake, then execute(command, offset, length, data) -> data
    for each request, EIO for one that raises `failures`, until the client's
    goodbye; the socket closed in the end."""
    connection = nbd_wire.Connection(sock)
    try:
        nbd_wire.serve_handshake(sock, size, flags)
        while True:
            command, handle, offset, length, data = connection.next_request()
            if command == nbd_wire.CMD_DISC:
                return
            try:
                connection.reply(handle, data=execute(command, offset, length, data))
            except failures:
                connection.reply(handle, nbd_wire.EIO)
    except (OSError, nbd_wire.NbdError):
        pass
    finally:
        sock.close()


class Device(object):
    """/dev/nbdN opened by a user (tapdisk): requests through the kernel's rules."""

    def __init__(self, device):
        self.device = device
        try:
            with open(os.path.join(device_dir(device), "backend")) as stream:
                backend = json.load(stream)
            self._connection = nbd_wire.Connection.connect_unix(backend["socket"],
                                                                backend["export"])
        except (IOError, OSError, ValueError, nbd_wire.NbdError) as exc:
            raise DeviceError("%s: no such device or address (%s)" % (device, exc))
        self.timeout = backend["timeout"] or DEFAULT_TIMEOUT
        self._connection.sock.settimeout(self.timeout)
        self.size = self._connection.size
        self.dead = None

    def request(self, command, offset=0, length=0, data=b""):
        if self.dead:
            raise DeviceError("%s: I/O error (%s)" % (self.device, self.dead))
        try:
            return self._connection.request(command, offset, length, data)
        except nbd_wire.RequestFailed as exc:  # this request only
            raise DeviceError("%s: I/O error (%s)" % (self.device, exc))
        except socket.timeout:
            self.dead = "Connection timed out after %d s" % self.timeout
        except (OSError, nbd_wire.NbdError) as exc:
            self.dead = "its server went away: %s" % exc
        log("kernel", "%s: %s" % (self.device, self.dead))  # dmesg
        self._connection.sock.close()
        raise DeviceError("%s: I/O error (%s)" % (self.device, self.dead))

    def close(self):
        if not self.dead:
            self._connection.disconnect()
