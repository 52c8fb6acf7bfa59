"""Exclusive activation: one host at a time writes a volume, and a dead host is
fenced before another takes over.

Datapath.attach may run on several hosts at once (live migration attaches on
the destination while the source is still active), so the exclusion is taken
by Datapath.activate and dropped by Datapath.deactivate.

Design: the plugin's scripts live for one call, so no lock held by a process
of theirs (a librbd managed lock, a cls lock, which only its locker may
unlock) can last from activate to deactivate; and the long-lived process that
writes, qemu or rbd-nbd, cannot be asked to hold one (qemu has no option for
it). So the lock is a record, `xcp_rbd.activation` in the omap of the image's
RBD header object, changed only by atomic compare-and-set:

    {"host": <host uuid>, "hostname", "since", "clients": [<addresses>]}

`clients` are the Ceph client addresses of the data process that activate
started (the watchers that its opening of the image added). A holder is
alive while one of them still watches the image: Ceph drops the watch of a
client that dies or hangs (osd_client_watch_timeout, 30 s by default). A
record whose clients no longer watch is taken over, and only after each of
them is blocklisted, so a half-dead host that wakes up can never write again.
The record lives and dies with the image and librbd ignores it.
"""

import json

import rbd

from xcp_rbd import bounds, ceph_client, errors, log
from xcp_rbd.metadata import Conflict, Omap, dumps, now

FIELD = "xcp_rbd.activation"


def _held_elsewhere(where, holder, alive):
    message = ("%s is active on host %s (%s) since %s (its client %s still watches "
               "the image): deactivate it there first; if that host is dead, Ceph "
               "drops its watch within osd_client_watch_timeout (30 s by default), "
               "then activate takes over" % (
                   where.spec, holder["host"], holder.get("hostname", "?"),
                   holder.get("since", "?"), ", ".join(sorted(alive))))
    log.warning("%s", message)  # the error's params are XAPI's, the words are here
    return errors.ActivatedOnAnotherHost(holder["host"], message)


class ActivationLock(object):
    """The activation record of one writable image (a context manager)."""

    def __init__(self, connection, where):
        self.connection = connection
        self.where = where
        self.ioctx = None
        self.index = None

    def __enter__(self):
        self.ioctx = self.connection.open_pool(self.where.pool, self.where.namespace)
        with self._image() as image:
            self.index = Omap(self.ioctx, "rbd_header." + image.id())
        return self

    def __exit__(self, *exc):
        self.ioctx.close()

    def _image(self):
        try:
            return rbd.Image(self.ioctx, self.where.image, read_only=True)
        except rbd.ImageNotFound:
            raise errors.VolumeDoesNotExist("image %s does not exist" % self.where.spec)

    def watchers(self):
        """Addresses of the clients watching the image (a read-only open adds none)."""
        with self._image() as image:
            return set(watcher["addr"] for watcher in image.watchers_list())

    def holder(self):
        """(record or None, the guard for changing it) of the activation record."""
        # By key only: the header's other omap values are librbd's, in binary.
        values, guard = self.index.read_for_update([FIELD])
        raw = values.get(FIELD)
        return (json.loads(raw) if raw else None), guard

    def _change(self, change):
        """Apply change(record) -> new record, None to remove, or False to leave
        alone, until no other host changed the record in between."""
        retry = bounds.Retry(bounds.CHANGE_RETRY)
        while True:
            record, guard = self.holder()
            new = change(record)
            if new is False:
                return record
            try:
                if new is None:
                    self.index.write(remove=[FIELD], guard=guard)
                else:
                    self.index.write({FIELD: dumps(new)}, guard=guard)
                return new
            except Conflict:
                if not retry.again():
                    raise errors.Busy("the activation of %s changed constantly for %d s: try "
                        "again" % (self.where.spec, retry.seconds))

    def acquire(self, me):
        """Make this host the holder, fencing a dead holder first; raise
        ActivatedOnAnotherHost while the holder (even this host, in an
        earlier life) still has a client watching the image."""
        def claim(holder):
            if holder is not None:
                self._take_over(holder)
            return dict(me, since=now(), clients=[])
        self._change(claim)

    def _take_over(self, holder):
        watching = self.watchers()
        clients = holder.get("clients", [])
        # With no recorded clients (an activation that died half-way), any
        # watcher may be the holder's: only an unwatched image is free.
        alive = watching.intersection(clients) if clients else watching
        if alive:
            raise _held_elsewhere(self.where, holder, alive)
        for address in clients:
            ceph_client.blocklist(self.connection.rados, address)
        log.warning("%s: taking over from host %s (%s), whose clients %s no longer watch "
                    "the image and are now blocklisted", self.where.spec, holder["host"],
                    holder.get("hostname", "?"), ", ".join(clients) or "(none)")

    def record_clients(self, me, before):
        """Record as our clients the watchers added since `before` (by the data
        process that activate just started); returns them."""
        clients = sorted(self.watchers() - before)

        def update(holder):
            if holder is None or holder["host"] != me["host"]:
                raise errors.ActivationLost(
                    "the activation of %s was taken over while it "
                    "was activated here" % self.where.spec)
            return dict(holder, clients=clients)
        self._change(update)
        return clients

    def release(self, me, fence=()):
        """Drop this host's record, blocklisting `fence` first (clients of a data
        process that died or was killed, which must never write again). A record
        of another host (which took over from us) is left alone."""
        for address in fence:
            ceph_client.blocklist(self.connection.rados, address)

        def drop(holder):
            if holder is None or holder["host"] != me["host"]:
                return False
            return None
        self._change(drop)
