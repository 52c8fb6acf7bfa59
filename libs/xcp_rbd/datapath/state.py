"""What this host keeps: its identity, and one directory per attached volume.

Per-volume state lives in RUN_DIR/datapath/<volume id>/ (a tmpfs on XCP-ng, so
a reboot forgets it with the processes it describes): attachment.json, the
sockets and logs of the volume's qemu, and a lock file. Every datapath call
on a volume holds that lock, so calls on one volume run one at a time while
calls on different volumes run in parallel. The directory is keyed by the
volume (cluster, pool, namespace, image, snapshot), never by the domain, and
its name is a short hash because unix socket paths are limited to 107 bytes.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket

from xcp_rbd import errors

RUN_DIR = os.environ.get("XCP_RBD_RUN_DIR", "/var/run/nonpersistent/xcp-rbd")
INVENTORY = "/etc/xensource-inventory"
_SOCKET_PATH_MAX = 107


def host_uuid():
    """This host's XAPI uuid (INSTALLATION_UUID), or XCP_RBD_HOST_UUID."""
    override = os.environ.get("XCP_RBD_HOST_UUID")
    if override:
        return override
    try:
        with open(INVENTORY) as stream:
            for line in stream:
                key, _, value = line.partition("=")
                if key.strip() == "INSTALLATION_UUID":
                    return value.strip().strip("'\"")
    except IOError:
        pass
    raise errors.UnknownHost(
        "cannot tell this host's uuid: %s has no INSTALLATION_UUID and "
        "XCP_RBD_HOST_UUID is not set" % INVENTORY)


def identity():
    """How the activation lock names this host."""
    return {"host": host_uuid(), "hostname": socket.gethostname()}


def _volume_id(where):
    cluster = where.cluster
    text = "\n".join([cluster.conf, cluster.cluster, cluster.mon_host, where.spec])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def _flock(path):
    """An exclusive flock on `path`, created if needed; yields the open fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def host_lock(name):
    """A host-wide lock (e.g. while choosing a free /dev/nbdN)."""
    _makedirs(RUN_DIR)
    return _flock(os.path.join(RUN_DIR, name + ".lock"))


def _makedirs(path):
    try:
        os.makedirs(path, 0o700)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise


class Attachment(object):
    """One volume's state on this host, held under its lock (a context manager).

    `values` is the content of attachment.json: what the next call needs to
    carry on or undo (tapdisk, device, qemu pid, activation clients, ...).
    Leaving with no values removes the directory.
    """

    FILE = "attachment.json"
    LOCK = "lock"

    def __init__(self, where):
        self.where = where
        self.volume_id = _volume_id(where)
        self.directory = os.path.join(RUN_DIR, "datapath", self.volume_id)
        self.values = {}
        self._lock = None

    def path(self, name):
        return os.path.join(self.directory, name)

    def socket_path(self, name):
        path = self.path(name)
        if len(path) > _SOCKET_PATH_MAX:
            raise errors.InvalidConfiguration(
                "%s is too long for a unix socket: use a "
                "shorter XCP_RBD_RUN_DIR" % path)
        return path

    def __enter__(self):
        while True:
            _makedirs(self.directory)
            lock = _flock(self.path(self.LOCK))
            fd = lock.__enter__()
            try:
                current = os.stat(self.path(self.LOCK)).st_ino
            except OSError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            # detach removed the directory while we waited: start again.
            lock.__exit__(None, None, None)
        self._lock = lock
        try:
            with open(self.path(self.FILE)) as stream:
                self.values = json.load(stream)
        except IOError:
            self.values = {}
        return self

    def __exit__(self, *exc):
        try:
            if not self.values:  # nothing attached: no directory either
                self.remove()
        finally:
            self._lock.__exit__(*exc)

    def save(self):
        tmp = self.path(self.FILE + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as stream:
            json.dump(self.values, stream, indent=1, sort_keys=True)
        os.rename(tmp, self.path(self.FILE))

    def remove(self):
        """Forget the volume: every file, the lock file last (still held)."""
        for name in os.listdir(self.directory):
            if name != self.LOCK:
                os.unlink(os.path.join(self.directory, name))
        os.unlink(self.path(self.LOCK))
        os.rmdir(self.directory)
