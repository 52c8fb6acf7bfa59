"""Flattening, its whole life: clone chains kept short in the background.

- Volume.clone measures the new clone's chain (`chain_depth`) and, past the SR's
  max_chain_depth, queues a job in the same index write as the clone's record
  (`job`: field j.<image>), so a crash leaves the clone with its job or neither.
- The collector (gc) runs the jobs (`run_jobs`): Ceph's manager (rbd_support)
  flattens when it can, its task queue persistent and resumable, one task at a
  time; without it (no mgr caps, an old cluster) the collector flattens itself.
  A job ends when its image has no parent any more.
- Volume.snapshot and the reverts wait for a running flatten of their image
  first (`wait_for_flatten`): librbd's flatten does not see a snapshot taken
  while it runs.
- Diagnostics show the jobs and the chains (`status`).
"""

import json
import time

import rbd

from xcp_rbd import bounds, errors, log, metadata
from xcp_rbd.records import JOB, job_field, owner, volumes


def job(image, depth):
    """The index change that asks the collector to flatten `image` (see run_jobs)."""
    return {job_field(image): metadata.dumps(
        {"action": "flatten", "depth": depth, "queued": metadata.now()})}


def chain_depth(sr, name):
    """How many ancestors image `name` has, trashed ones included (opened by id); a
    chain that ends while it is walked (a flatten finishing, the image destroyed)
    ends there."""
    depth = 0
    try:
        image = sr.image(name, read_only=True)
    except rbd.ImageNotFound:
        return depth
    try:
        while True:
            try:
                parent = image.parent_id()
                image.close()
                image = rbd.Image(sr.ioctx, image_id=parent, read_only=True)
            except rbd.ImageNotFound:
                return depth
            depth += 1
    finally:
        image.close()


def wait_for_flatten(sr, name):
    """Before a snapshot of image `name` is taken or rolled back (the caller holds the
    image's lock, under which the collector queues flattens): wait until no
    background flatten of the image runs or waits in Ceph's manager.

    librbd's flatten does not see a snapshot taken while it runs: that snapshot's
    object map misses what the flatten copies afterwards, and once the parent is
    detached those blocks of the snapshot read as zeros (Pacific 16.2.15; see
    tests/test_collector.py). Cancelling is no way out: the manager drops a
    cancelled task at once while the flatten goes on, possibly in the librbd of the
    VM that holds the image's exclusive lock.

    A manager that does not answer (restarting, failing over, busy) says nothing
    about its tasks: the snapshot waits as for a listed task, and fails with Busy
    if it still cannot know at the bound. Only an image that has no parent any more
    is known to be flattened without asking."""
    value = sr.index.read_keys([job_field(name)]).get(job_field(name))
    task = json.loads(value).get("task") if value else None
    if not task:
        return
    retry = bounds.Retry(bounds.wait(sr.location.cluster.timeout))
    while chain_depth(sr, name):
        listed, unknown = _mgr_task_listed(sr, task)
        if not listed and not unknown:
            return
        if not retry.again():
            raise errors.Busy("disk image %s is being flattened in the background (Ceph manager "
                "task %s) and cannot be snapshotted until that ends%s: try again in a "
                "moment" % (name, task, " (the manager does not say whether it runs: %s)"
                            % unknown if unknown else ""))


def _mgr_task_listed(sr, task):
    """(whether Ceph's manager still lists task `task`, queued or running; why that
    could not be known, or "")."""
    try:
        tasks = sr.connection.mgr_command("rbd task list")
    except errors.StorageError as exc:
        return False, exc.params[-1]
    return any(t["id"] == task for t in tasks), ""


def run_jobs(collector):
    """Flatten the images whose clone chain grew past the SR's limit (a step of
    gc.Collector, whose lock, watchdog, actions and statistics it uses)."""
    sr = collector.sr
    for field, value in sorted(sr.index.read(prefix=JOB).items()):
        name = owner(field)
        flatten_job = json.loads(value)
        collector.keep_lock()
        try:
            with sr.image(name, read_only=True) as image:
                image.parent_id()
                size = image.size()
        except rbd.ImageNotFound:  # flattened (or gone): done
            sr.index.write(remove=[field])
            collector.actions.append("flattened image %s (clone chain of %d)"
                                     % (name, flatten_job["depth"]))
            collector.add_stat("flattened_bytes", flatten_job.get("size", 0))
            continue
        if flatten_job.get("task") and any(_mgr_task_listed(sr, flatten_job["task"])):
            continue  # running, or the manager cannot say: never a second flatten
        # Queued under the image's lock, so that a snapshot of the image sees it
        # (see wait_for_flatten).
        lock = sr.image_lock(name)
        if not lock.try_acquire():
            continue  # a command on the image: next time
        try:
            task = _queue_in_manager(sr, name)
            if task is None:
                _flatten_here(collector, name, lock)
                continue
            flatten_job.update(task=task, size=size)
            sr.index.write({field: metadata.dumps(flatten_job)})
        finally:
            lock.release()
        collector.actions.append("queued a flatten of image %s in Ceph's manager" % name)


def _queue_in_manager(sr, name):
    spec = "/".join(p for p in (sr.location.pool, sr.location.namespace, name) if p)
    try:
        return sr.connection.mgr_command("rbd task add flatten", image_spec=spec)["id"]
    except errors.StorageError as exc:
        log.info("Ceph's manager cannot flatten %s (%s): flattening here", name, exc)
        return None


def _flatten_here(collector, name, lock):
    """Flatten in this process, holding the image's lock throughout."""
    renewed = [time.time()]

    def progress(done, total):
        if time.time() - renewed[0] > metadata.LOCK_LEASE / 3:
            lock.renew()
            renewed[0] = time.time()
        return collector.progress(done, total)
    with collector.sr.image(name) as image:
        image.flatten(on_progress=progress)


def status(sr, entries, images):
    """(the flatten jobs with their progress in Ceph's manager, {clone image: its
    chain depth} of the clones among `images`), for diagnostics."""
    try:
        tasks = {t["id"]: t for t in sr.connection.mgr_command("rbd task list")}
    except errors.StorageError:
        tasks = {}
    jobs = []
    for field, value in sorted(entries.items()):
        if field.startswith(JOB):
            flatten_job = json.loads(value)
            task = tasks.get(flatten_job.get("task"), {})
            flatten_job.update(image=owner(field), running=bool(task.get("in_progress")),
                               progress=task.get("progress", 0.0))
            jobs.append(flatten_job)
    clones = sorted({record.image for record in volumes(entries).values() if record.depth})
    return jobs, {name: chain_depth(sr, name) for name in clones if name in images}
