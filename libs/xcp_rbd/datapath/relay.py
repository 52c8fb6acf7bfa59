"""A storage migration's mirror under tapdisk (the rbd-nbd backend): the relay,
a data process of its own that Data.mirror starts (mirror.py), between tapdisk
and the migration's NBD target.

Why a relay: xapi's proxy to the destination takes one connection, and tapdisk
as an NBD client names its export "tapdisk_client" (a server that matches
names refuses it). The relay holds that one connection, under the target's
real export name, and serves tapdisk's secondary on a socket of its own
(`tap-ctl unpause -2 nbd:<socket>`). In order:

1. connect to the target and check its size; listen; print "ready";
2. accept tapdisk (its unpause): from then on every guest write reaches the
   relay before the image, and the relay forwards each to the target, in
   order, one at a time;
3. meanwhile copy what the image holds: its allocated extents (the target is a
   volume just created: zero where the source was never written), read with a
   read-only librbd open. Each piece read is written to the target except
   where a write forwarded since the mirror began covers it: that write is
   newer than the piece, or the same data. The check and the piece's write
   happen under the lock that forwarding takes, so that no forwarded write can
   fall between them. What tapdisk was told is written before the mirror began
   is on the OSDs when read: tapdisk's pause drains it, and rbd-nbd runs with
   librbd's cache off;
4. with the copy done the target is in sync, and stays so as writes go on
   (Data.stat: complete);
5. when tapdisk lets go (deactivate closes it), flush the target and end:
   `ended`, in sync or not.

A target that fails ends the relay as `failed`; the write it failed is failed
to tapdisk too, which then drops its secondary and completes the guest's write
(tapdisk's nbd_mirror_failed). The status file (JSON, replaced whole) says
where it is: state (connecting, copying, in_sync, ended, failed), copied and
total bytes, in_sync, error.

Run as `python3 -m xcp_rbd.datapath.relay <volume uri> <target socket>
<target export> <listening socket> <status file>`: paths, never a key.
"""

import json
import os
import socket
import sys
import threading

from xcp_rbd import location
from xcp_rbd.datapath import data_client_options, nbd_wire

PIECE = 4 << 20


class TargetSizeMismatch(nbd_wire.NbdError):
    reason = "target_size"


class Relay(object):
    def __init__(self, target, status_path):
        self.target = target
        self.status_path = status_path
        self.lock = threading.Lock()  # forwarding, and the copy's check-and-write
        self.pending = []  # (start, end) forwarded ahead of the copy
        self.copied_to = 0  # the copy is done below this offset
        self.status = {"state": "connecting", "copied": 0, "total": 0, "in_sync": False}
        self._saving = threading.Lock()

    def save(self, **changes):
        with self._saving:
            self.status.update(changes)
            _write_status(self.status_path, self.status)

    def forward(self, offset, data):
        """A write from tapdisk, to the target (under the lock)."""
        with self.lock:
            if offset + len(data) > self.copied_to:
                self.pending.append((offset, offset + len(data)))
            self.target.pwrite(data, offset)

    def write_piece(self, start, data):
        """A piece the copy read, less what forwarded writes cover; then the
        copy is done up to its end."""
        end = start + len(data)
        with self.lock:
            cursor = start
            for covered_start, covered_end in sorted(self.pending):
                if covered_end <= cursor or covered_start >= end:
                    continue
                if covered_start > cursor:
                    self.target.pwrite(data[cursor - start:covered_start - start], cursor)
                cursor = max(cursor, covered_end)
            if cursor < end:
                self.target.pwrite(data[cursor - start:], cursor)
            self.copied_to = end
            self.pending = [span for span in self.pending if span[1] > end]

    def copy(self, image):
        extents = []
        image.diff_iterate(0, image.size(), None,
                           lambda offset, length, exists: extents.append(
                               (offset, length)) if exists else None,
                           include_parent=True, whole_object=True)
        self.save(state="copying", total=sum(length for _, length in extents))
        copied = 0
        for offset, length in extents:
            for start in range(offset, offset + length, PIECE):
                size = min(PIECE, offset + length - start)
                self.write_piece(start, image.read(start, size))
                copied += size
                self.save(copied=copied)
        self.save(state="in_sync", in_sync=True)

    def serve(self, connection):
        """tapdisk's requests, until it disconnects (or the target fails)."""
        while True:
            command, handle, offset, length, data = connection.next_request()
            if command == nbd_wire.CMD_DISC:
                return
            if command == nbd_wire.CMD_WRITE:
                self.forward(offset, data)
                connection.reply(handle)
            elif command == nbd_wire.CMD_READ:  # a secondary is not read: zeros
                connection.reply(handle, data=bytes(length))
            else:
                connection.reply(handle)


def _open_image(where):
    import rados
    import rbd
    config = where.cluster
    handle = rados.Rados(rados_id=config.user, clustername=config.cluster,
                         conffile=config.conf if os.path.isfile(config.conf) else "",
                         conf=data_client_options(config))
    handle.connect(timeout=config.timeout)
    ioctx = handle.open_ioctx(where.pool)
    ioctx.set_namespace(where.namespace)
    return handle, rbd.Image(ioctx, where.image, read_only=True)


def _copy_in_background(relay, image, tapdisk, failures):
    """The copy (step 3) in a thread; a failure ends tapdisk's connection, and so
    the relay."""
    def run():
        try:
            relay.copy(image)
        except Exception as exc:
            failures.append("copying the volume: %s" % exc)
            tapdisk.shutdown(socket.SHUT_RDWR)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _listen(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    listener.listen(1)
    return listener


def run(uri, target_socket, export, listen_path, status_path):
    where = location.VolumeLocation.parse(uri)
    target = nbd_wire.Connection.connect_unix(target_socket, export)
    relay = Relay(target, status_path)
    handle, image = _open_image(where)
    if target.size != image.size():
        raise TargetSizeMismatch("the target %s has %d bytes, the volume %d"
                                 % (export, target.size, image.size()))
    listener = _listen(listen_path)
    relay.save()
    print("ready", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the caller waits for EOF
    sock, _ = listener.accept()
    listener.close()
    nbd_wire.serve_handshake(sock, image.size(), 0)
    failures = []
    _copy_in_background(relay, image, sock, failures)
    try:
        relay.serve(nbd_wire.Connection(sock))
    except (OSError, nbd_wire.NbdError) as exc:
        failures.append("tapdisk's connection: %s" % exc)
    if failures:
        raise nbd_wire.NbdError(failures[0])
    with relay.lock:  # the copy stops here, if it has not ended
        if not relay.status["in_sync"]:
            relay.save(error="deactivated before the mirror was in sync")
        if target.flags & nbd_wire.TRANSMISSION_SEND_FLUSH:
            target.flush()
        target.disconnect()
        relay.save(state="ended")
    os._exit(0)  # not waiting for the copy's thread or librbd's


def _write_status(path, status):
    with open(path + ".tmp", "w") as stream:
        json.dump(status, stream)
    os.rename(path + ".tmp", path)


def main(argv):
    status_path = argv[4]
    try:
        run(*argv)
    except Exception as exc:  # the status file says it: Data.stat reads it
        status = {"state": "failed", "error": str(exc),
                  "reason": getattr(exc, "reason", None)}
        try:
            with open(status_path) as stream:
                status = dict(json.load(stream), **status)
        except (IOError, ValueError):
            pass
        _write_status(status_path, status)
        sys.stderr.write("relay: %s\n" % exc)
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
