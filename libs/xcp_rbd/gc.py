"""The garbage collector: reclaims in the background what a destroy could not.

Volume.destroy only removes records and does constant-time Ceph operations
(snapshot removal, trash move). What remains is found here from two truths, the
SR index and the cluster, never from a list of pending work that could be lost:
- an image of the SR that no record references (its disk and snapshots were
  destroyed, or a crash left it) is moved to the trash;
- a user snapshot that no record references is removed;
- a trashed image of the SR is removed once nothing depends on it any more
  (its clone children are gone);
- index entries of volumes that no longer exist are dropped.
An image whose disk was destroyed but whose snapshots live on (a "zombie",
as after XAPI's revert) stays until its last snapshot goes, and may be adopted
by the next clone of one of its snapshots (see revert.adopt). The collector also
runs the flatten jobs (see flatten).

Every image is handled under its cluster lock, as the Volume commands do, and
only one collector runs per SR (cluster lock "gc"), from any host. A collector
is started detached by the commands that leave work (`start`); `collect` is
also what `xcp-rbd-xapi gc` runs in the foreground.
"""

import json
import os
import struct
import sys
import time

import rados
import rbd

from xcp_rbd import bounds, errors, flatten, log, metadata, protocol
from xcp_rbd.attached import USAGE_REFRESH, open_sr
from xcp_rbd.records import (GC_LAST_FULL, GC_STATS, JOB, KEYS, SR_RECORD, USAGE, VOLUME,
                             owner, references, usage_field, volumes)

GC_LOCK = "gc"
GC_LEASE = 60
FULL_SWEEP_EVERY = 3600  # seconds between full sweeps (see Collector)


def _user_snapshots(image):
    return [snap["name"] for snap in image.list_snaps()
            if snap.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER)
            == rbd.RBD_SNAP_NAMESPACE_TYPE_USER]


# cls_rbd's TrashImageState, the last field of a trash entry (see trash_state)
TRASH_STATE_NORMAL = 0
TRASH_STATE_MOVING = 1


def encoded_string(text):
    """A string as Ceph encodes it for cls_rbd's calls: its length, then its bytes."""
    data = text.encode("ascii")
    return struct.pack("<I", len(data)) + data


def trash_state(ioctx, image_id):
    """The state of trash entry `image_id` (cls_rbd trash_get: an encoded
    TrashImageSpec: version, compat and length, then source, name, deletion and
    deferment times, and the state, which entries written by clients older than
    Nautilus lack); None if the entry is gone."""
    try:
        _, spec = ioctx.execute("rbd_trash", "rbd", "trash_get", encoded_string(image_id))
    except rados.ObjectNotFound:
        return None
    name_at = 2 + 4 + 1  # version and compat (u8 each), length (u32); source (u8)
    name_length = struct.unpack_from("<I", spec, name_at)[0]
    state_at = name_at + 4 + name_length + 2 * 8  # the name, then two utime_t
    return spec[state_at] if state_at < len(spec) else TRASH_STATE_NORMAL


def release_image(sr, name):
    """The writable volume on image `name` was destroyed (caller holds its lock).

    Without snapshots the image goes to the trash now (constant time; the
    collector removes it); with snapshots it stays, hidden, for them. An image whose
    exclusive lock librbd cannot take (trash_move's EBUSY: held by a call killed
    while it wrote, until its watch ends) is left to the collector, which trashes
    what no record references: the destroy itself is done once the record is gone."""
    try:
        with sr.image(name) as image:
            has_snapshots = bool(_user_snapshots(image))
        if not has_snapshots:
            sr.rbd.trash_move(sr.ioctx, name, 0)
    except rbd.ImageNotFound:
        return
    except rbd.ImageBusy as exc:
        log.info("image %s: its exclusive lock is held elsewhere (%s): the collector "
                 "trashes it", name, exc)
        start(sr)


def release_snapshot(sr, name, snap):
    """The snapshot volume `snap` of image `name` was destroyed (caller holds the
    lock). With clone v2, a snapshot that still has clones moves to the trash
    namespace and Ceph deletes it with its last clone."""
    try:
        with sr.image(name) as image:
            image.remove_snap(snap)
    except (rbd.ImageNotFound, rbd.ObjectNotFound):
        pass


class Collector(object):
    """One collection pass over an SR (the caller holds the SR's gc lock).

    `full` also sweeps the images of live volumes for snapshots that no record
    references (left by a crash inside Volume.snapshot or Volume.clone)."""

    def __init__(self, sr, lock, full):
        self.sr = sr
        self.lock = lock
        self.full = full
        self.renewed = time.time()
        self.actions = []

    def keep_lock(self):
        """At each step of progress: the watchdog follows the progress (a step
        may take a bound), and the lease is renewed once a third of it is gone."""
        protocol.arm_watchdog(bounds.call(self.sr.location.cluster.timeout),
                              "the collector stopped making progress")
        if time.time() - self.renewed > GC_LEASE / 3:
            self.lock.renew()
            self.renewed = time.time()

    def progress(self, done, total):
        """librbd's progress callback for long operations: keep lock and watchdog."""
        self.keep_lock()
        return 0  # go on

    def run(self):
        """Collect until nothing more can be done; return what was done."""
        self.refresh_usage()
        while True:
            done = len(self.actions)
            live, snapshots = references(self.sr.index.read(prefix=VOLUME))
            for entry in self.sr.rbd.list2(self.sr.ioctx):
                name = entry["name"]
                if name in live and not self.full:
                    continue  # the common case: a disk in use, nothing to reclaim
                self.keep_lock()
                ours = name in live or name in snapshots or self.is_ours(name)
                if ours:
                    self.collect_image(name)
                elif ours is None and self.sr.owns_namespace():
                    self.collect_headless(name, entry.get("id"))
            self.collect_trash()
            self.collect_index()
            flatten.run_jobs(self)
            if len(self.actions) == done:
                break
        if self.full:
            # Once, after the passes: each pass takes image locks, whose xattrs
            # this removes; inside the loop that would be progress for ever.
            self.collect_lock_xattrs()
        return self.actions

    def refresh_usage(self, limit=200):
        """Measure the usage SR.ls and Volume.stat report where it is missing or
        older than USAGE_REFRESH (Volume.stat starts a collector for such a volume;
        the measure costs an object-map diff, which XAPI's calls must not wait for)."""
        entries = self.sr.index.read()
        stale_before = time.time() - USAGE_REFRESH
        refreshed = 0
        for key, record in sorted(volumes(entries).items()):
            if refreshed >= limit:
                break
            cached = json.loads(entries.get(usage_field(key), "{}"))
            if cached.get("at", 0) > stale_before:
                continue
            self.keep_lock()
            try:
                usage = self.sr.allocated_bytes(record.image, record.snap)
            except rbd.ImageNotFound:
                continue
            self.sr.cache_usage(key, usage, cached)
            refreshed += 1
        if refreshed:
            self.actions.append("measured the usage of %d volumes" % refreshed)

    def is_ours(self, name):
        """Whether image `name` is this SR's; None if it cannot be opened (a create
        killed inside librbd leaves a directory entry with no header)."""
        try:
            with self.sr.image(name, read_only=True) as image:
                return self.sr.owns(image)
        except rbd.ImageNotFound:
            return None

    def collect_headless(self, name, image_id):
        """Remove what a create cut short left of image `name` in the SR's own
        namespace: a directory entry whose header object does not exist (librbd's
        remove takes it), unless its create still holds the image's lock. An image
        that failed to open for another reason (a clone whose parent was going away
        at that moment) has its header, and is left alone."""
        if not image_id:
            return
        lock = self.sr.image_lock(name)
        if not lock.try_acquire():
            return
        try:
            try:
                self.sr.ioctx.stat("rbd_header." + image_id)
                return  # a real image: not for this
            except rados.ObjectNotFound:
                pass
            self.sr.rbd.remove(self.sr.ioctx, name)
            self.actions.append("removed what a cut-short create left of image %s" % name)
        except rbd.ImageNotFound:
            pass
        except (rbd.ImageBusy, rbd.ImageHasSnapshots, rbd.Timeout) as exc:
            log.info("remains of image %s not removable yet: %s", name, exc)
        finally:
            lock.release()

    def collect_image(self, name):
        lock = self.sr.image_lock(name)
        if not lock.try_acquire():
            return  # in use by a command (or being created): next time
        try:
            live, snapshots = references(self.sr.index.read(prefix=VOLUME))
            referenced = snapshots.get(name, set())
            with self.sr.image(name, read_only=True) as image:
                stale = [snap for snap in _user_snapshots(image) if snap not in referenced]
                watched = bool(list(image.watchers_list()))
                zombie = name not in live and referenced and not watched
                if zombie:
                    try:
                        image.parent_id()
                        zombie = False  # discarding a clone's head would mask its parent
                    except rbd.ImageNotFound:
                        zombie = image.stat()["num_objs"] > 0
            if stale or zombie:
                with self.sr.image(name) as image:
                    for snap in stale:
                        image.remove_snap(snap)
                        self.actions.append("removed snapshot %s@%s" % (name, snap))
                    if zombie and self.discard_head(image):
                        self.actions.append("freed the head of hidden image %s" % name)
            if name not in live and not referenced:
                self.sr.rbd.trash_move(self.sr.ioctx, name, 0)
                self.actions.append("moved image %s to the trash" % name)
        except rbd.ImageNotFound:
            pass
        except (rbd.ImageBusy, rbd.Timeout) as exc:
            # e.g. still held by a client that died (its watch lasts
            # osd_client_watch_timeout): the next collection gets it.
            log.info("image %s not collectable yet: %s", name, exc)
        finally:
            lock.release()

    @staticmethod
    def discard_head(image):
        """Free what only the head of a zombie holds: its snapshots keep theirs, and
        an adoption rolls the head back from one of them anyway."""
        used = []
        image.diff_iterate(0, image.size(), None,
                           lambda offset, length, exists: used.append(exists) if exists
                           else None, include_parent=False, whole_object=True)
        if not used:
            return False
        image.discard(0, image.size())
        return True

    def collect_trash(self):
        for entry in self.sr.rbd.trash_list(self.sr.ioctx):
            self.keep_lock()
            if trash_state(self.sr.ioctx, entry["id"]) == TRASH_STATE_MOVING \
                    and not self.finish_move(entry):
                continue
            try:
                with rbd.Image(self.sr.ioctx, image_id=entry["id"]) as image:
                    if not self.sr.owns(image):
                        continue
                    for snap in _user_snapshots(image):
                        image.remove_snap(snap)
                self.sr.rbd.trash_remove(self.sr.ioctx, entry["id"], True,
                                         on_progress=self.progress)
                self.actions.append("removed image %s" % entry["name"])
            except rbd.ImageNotFound:
                if self.sr.owns_namespace():
                    self.collect_headless_trash(entry)
            except (rbd.ImageHasSnapshots, rbd.ImageBusy) as exc:
                log.info("trashed image %s not removable yet: %s", entry["name"], exc)

    def finish_move(self, entry):
        """Finish a move to the trash that a crash cut short, as librbd would have.

        librbd's trash_move first adds the trash entry in state MOVING, then removes
        the image's directory entry and id object, then sets the state to NORMAL;
        librbd removes no entry in state MOVING (EBUSY or EUCLEAN, for ever). Under
        the image's lock, which the destroy doing the move held: once taken, the
        move is dead, not running. Each step may be repeated after a crash of its
        own. Returns whether the move is finished."""
        name, image_id = entry["name"], entry["id"]
        if not self.sr.owns_trashed(image_id):
            return False
        lock = self.sr.image_lock(name)
        if not lock.try_acquire():
            return False
        try:
            try:
                self.sr.ioctx.execute("rbd_directory", "rbd", "dir_remove_image",
                                      encoded_string(name) + encoded_string(image_id))
            except rados.ObjectNotFound:
                pass  # removed before the crash
            try:
                if self.sr.ioctx.read("rbd_id." + name) == encoded_string(image_id):
                    self.sr.ioctx.remove_object("rbd_id." + name)
            except rados.ObjectNotFound:
                pass
            self.sr.ioctx.execute("rbd_trash", "rbd", "trash_state_set",
                                  encoded_string(image_id) + bytes([TRASH_STATE_NORMAL,
                                                              TRASH_STATE_MOVING]))
        finally:
            lock.release()
        self.actions.append("finished the cut-short move of image %s to the trash" % name)
        return True

    def collect_headless_trash(self, entry):
        """A trash entry of the SR's own namespace whose image cannot be opened: a
        removal cut short after the header went (or a killed create's orphan).
        Only an entry whose header object is really missing; librbd's own removal
        when it accepts that, else the trash directory's entry itself (cls_rbd
        trash_remove)."""
        try:
            self.sr.ioctx.stat("rbd_header." + entry["id"])
            return  # it has a header: it failed to open for a passing reason
        except rados.ObjectNotFound:
            pass
        try:
            self.sr.rbd.trash_remove(self.sr.ioctx, entry["id"], True)
        except rbd.ImageNotFound:
            try:
                self.sr.ioctx.execute("rbd_trash", "rbd", "trash_remove",
                                      encoded_string(entry["id"]))
            except rados.ObjectNotFound:
                return  # gone meanwhile
        self.actions.append("removed the headless trash entry of image %s" % entry["name"])

    def collect_lock_xattrs(self):
        """The image locks' xattrs that releases left on the index object (cls_lock's
        unlock keeps them: one per image ever used): each free one is taken and
        removed (metadata.ClusterLock.forget). Here, not at every release: that
        would cost every Volume call a round trip."""
        removed = 0
        for name in self.sr.index.lock_names():
            if name.startswith("img."):
                self.keep_lock()
                lock = self.sr.index.lock(name, wait=0)
                if lock.try_acquire():
                    lock.forget()
                    removed += 1
        if removed:
            self.actions.append("removed %d unused image lock records" % removed)

    def collect_index(self):
        entries = self.sr.index.read()
        records = volumes(entries)
        images = {record.image for record in records.values()}
        dangling = [f for f in entries if f.startswith((KEYS, USAGE))
                    and owner(f) not in records]
        dangling += [f for f in entries if f.startswith(JOB) and owner(f) not in images]
        if dangling:
            self.sr.index.write(remove=dangling)
            self.actions.append("dropped %d index entries of destroyed volumes"
                                % len(dangling))

    def add_stat(self, name, amount):
        def change(stats):
            stats[name] = stats.get(name, 0) + amount
            return stats
        if self.sr.index.update(GC_STATS, change) is None:
            self.sr.index.write({GC_STATS: metadata.dumps({name: amount})})


def collect(sr, wait=0.0, full=False):
    """Run one collection on an open Sr unless another collector runs it.

    Returns the list of actions, or None if another collector holds the SR."""
    lock = sr.index.lock(GC_LOCK, what="the collector of %s" % sr.describe(),
                         wait=wait, lease=GC_LEASE)
    if not wait and not lock.try_acquire():
        return None
    if wait:
        lock.__enter__()
    try:
        last_full = json.loads(sr.index.read_keys([GC_LAST_FULL]).get(GC_LAST_FULL, "0"))
        full = full or time.time() - last_full > FULL_SWEEP_EVERY
        actions = Collector(sr, lock, full).run()
        if full:
            sr.index.write({GC_LAST_FULL: str(int(time.time()))})
    finally:
        lock.release()
    for action in actions:
        log.info("gc %s: %s", sr.location.sr_uuid, action)
    return actions


def destroy_everything(sr):
    """SR.destroy: drop every volume record, then collect until the SR is empty."""
    entries = sr.index.read()
    sr.index.write(remove=[f for f in entries if f != SR_RECORD])
    collect(sr, wait=2 * GC_LEASE, full=True)
    left = sr.remains()
    if left:
        raise errors.SrNotEmpty(
            "%s still holds images %s: clones in another SR, open by a VM, or what a "
            "killed operation left, which the collector removes once its lock runs out "
            "(retry in %d s)" % (sr.describe(), ", ".join(sorted(left)),
                                 metadata.LOCK_LEASE))


def start(sr):
    """Start a detached collector for this SR (it exits at once if one runs)."""
    import subprocess  # only the calls that leave work pay for it
    library = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [library] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(os.devnull, "r+b") as devnull:
        subprocess.Popen([sys.executable, "-m", "xcp_rbd.gc", str(sr.location)],
                         stdin=devnull, stdout=devnull, stderr=devnull, env=env,
                         close_fds=True, start_new_session=True)


def status(sr):
    """What the SR holds and what waits for the collector (diagnostics, the tool)."""
    entries = sr.index.read()
    if SR_RECORD not in entries:
        raise errors.SrDoesNotExist(sr.describe())
    live, snapshots = references(entries)
    names = [entry["name"] for entry in sr.rbd.list2(sr.ioctx)]
    trash = [entry["name"] for entry in sr.rbd.trash_list(sr.ioctx)]
    running = sr.index.lock(GC_LOCK, lease=GC_LEASE).is_held()
    jobs, chain_depths = flatten.status(sr, entries, names)
    return {
        "volumes": len(live),
        "snapshots": sum(len(s) for s in snapshots.values()),
        "hidden_images": sorted(i for i in names if i not in live and i in snapshots),
        "awaiting_collection": sorted(
            [i for i in names if i not in live and i not in snapshots] + trash),
        "chain_depths": chain_depths,
        "jobs": jobs,
        "usage_measured_seconds_ago": _oldest_usage_age(entries),
        "collector_running": running,
        "collected": json.loads(entries.get(GC_STATS, "{}")),
    }


def _oldest_usage_age(entries):
    """How fresh SR.ls's physical_utilisation is: the age of its oldest measure."""
    measured = [json.loads(entries.get(usage_field(key), '{"at": 0}'))["at"]
                for key in volumes(entries)]
    return int(time.time() - min(measured)) if measured else 0


def main():
    """python -m xcp_rbd.gc <sr>: the detached collector."""
    log.setup()
    log.set_context("gc", "")
    protocol.enable_watchdog()  # a hung cluster must not leave collectors hanging
    try:
        with open_sr(sys.argv[1]) as sr:
            collect(sr)
    except Exception:  # a background process: log it, there is nobody else to tell
        log.error("collector failed", exc_info=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
