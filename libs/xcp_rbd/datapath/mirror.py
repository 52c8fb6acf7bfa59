"""Data.mirror and Data.stat (smapiv3-spec sections 4.7, 6.9): the source side of
a storage migration out of an SR whose datapath backend is qemu.

Data.mirror(uri, domain, remote) starts qemu's own mirror job in the qemu that
serves the active volume: the NBD target `remote` (nbd+unix:///<export>?socket=
<path>, xapi's proxy to the destination's export) becomes a block node, and
blockdev-mirror copies the whole image to it (sync=full) while the guest keeps
writing. copy-mode=write-blocking: from the start a guest write is acknowledged
only once the target has it too, so once the job is ready every acknowledged
write is on the target (as with tapdisk's mirror in SMAPIv1 migrations), and
deactivate, in the migration's downtime, has next to nothing left to copy. A
target that fails a write fails the job, never the guest's write.

Data.stat receives only the operation, ["MirrorV1", <id>]: RUN_DIR/mirror/<id>
holds the volume's uri, and the volume's state (`mirror` in attachment.json) and
its qemu tell the rest: `progress` while copying, `complete` once the job is
ready, `failed` once the job failed or qemu is gone. The record stays until
detach, so the last word on a mirror can still be read after deactivate.

finish() runs in Datapath.deactivate before the image closes. A ready job is
cancelled without force: qemu then copies whatever is still dirty, flushes the
target and ends without pivoting, which leaves a target holding every
acknowledged write. (job-complete would pivot the export onto the target, which
deactivate closes right after: nothing to gain.) A job not in sync yet cannot
finish within the downtime: it is stopped and the mirror reported failed, as
XAPI expects when a VM stops during a migration. If XAPI was told the mirror
was complete and it then fails at the end, deactivate closes the source and
fails: the migration must not go on with a target that misses writes.
"""

import os
import time
from urllib.parse import parse_qsl, unquote, urlsplit

from xcp_rbd import location, log, protocol
from xcp_rbd.datapath import qemu, state

JOB = "mirror"  # at most one mirror per volume, in a qemu of its own: fixed ids
TARGET = "mirror-target"
READY = ("ready", "standby")  # standby: ready, and paused for a moment (a drain)
# blockdev-add of the target runs the NBD handshake with xapi's proxy to the
# destination while qemu's monitor waits.
QMP_BOUND = 30
# How long the end of a mirror at deactivate may take: the last writes and the
# target's flush. write-blocking leaves next to nothing to copy by then, so a
# target that takes longer counts as hung.
END_TIMEOUT = 30
POLL = 0.05


def _target(remote):
    """(export, socket path) of nbd+unix:///<export>?socket=<path>, as XAPI gives it."""
    split = urlsplit(remote)
    socket_path = dict(parse_qsl(split.query)).get("socket")
    if split.scheme != "nbd+unix" or split.netloc or not socket_path:
        raise protocol.failure("Invalid_parameters", "remote must be "
                               "nbd+unix:///<export>?socket=<path>, not %r" % remote)
    return unquote(split.path[1:]), socket_path


def _index(operation_id):
    """RUN_DIR/mirror/<id>, or None for what is not one of our ids (32 hex digits)."""
    if len(operation_id) != 32 or not all(c in "0123456789abcdef" for c in operation_id):
        return None
    return os.path.join(state.RUN_DIR, "mirror", operation_id)


def _unknown(operation):
    return protocol.failure("Unknown_operation", "%s is not a mirror of this host, or it "
                            "ended (its volume was detached or mirrored again)"
                            % " ".join(operation))


def forget(att):
    """Make the volume's mirror id name nothing (detach, or a new mirror)."""
    record = att.values.get("mirror")
    if record:
        try:
            os.unlink(_index(record["id"]))
        except OSError:
            pass  # already forgotten


def _job(qmp):
    for job in qmp.execute("query-jobs"):
        if job["id"] == JOB:
            return job
    return None


def _remove(qmp):
    """Remove what a mirror left in qemu: its job (stopped first) and the target node."""
    job = _job(qmp)
    if job is not None:
        if job["status"] != "concluded":
            qmp.execute("block-job-cancel", {"device": JOB, "force": True})
            while _job(qmp)["status"] != "concluded":
                time.sleep(POLL)  # bounded by the Monitor's kill timer
        qmp.execute("job-dismiss", {"id": JOB})
    if any(node["node-name"] == TARGET for node in qmp.execute("query-named-block-nodes")):
        qmp.execute("blockdev-del", {"node-name": TARGET})


def _check_sizes(qmp, where, remote):
    """Refuse a target of another size here, where XAPI shows the reason (the job
    would fail on it at once, and Data.stat can only say `failed`)."""
    sizes = {node["node-name"]: node["image"]["virtual-size"]
             for node in qmp.execute("query-named-block-nodes")}
    if sizes[TARGET] != sizes[qemu.NODE]:
        raise protocol.failure(
            "Mirror_target_size", "%s: the target %s has %d bytes, the volume %d"
            % (where.spec, remote, sizes[TARGET], sizes[qemu.NODE]))


def mirror(dbg, uri, domain, remote):
    where = location.VolumeLocation.parse(uri)
    if where.backend != qemu.Qemu.name:
        raise protocol.failure(
            "Mirror_unsupported", "%s: the %s datapath backend cannot mirror a disk in "
            "use (storage migration); SRs created with device-config:datapath=qemu can"
            % (where.spec, where.backend))
    export, socket_path = _target(remote)
    with state.Attachment(where) as att:
        if not att.values.get("opened"):
            raise protocol.failure("Not_active", "%s is not active on this host: only a "
                                   "disk in use is mirrored" % where.spec)
        forget(att)
        record = {"id": os.urandom(16).hex(), "remote": remote}
        path = _index(record["id"])
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as stream:
            stream.write(uri)
        att.values["mirror"] = record  # recorded first: a half-started mirror is undone too
        att.save()
        with qemu.Monitor(att, QMP_BOUND) as qmp:
            _remove(qmp)  # what an earlier, failed migration left
            try:
                qmp.execute("blockdev-add", {
                    "driver": "nbd", "node-name": TARGET, "export": export,
                    "server": {"type": "unix", "path": socket_path}})
                _check_sizes(qmp, where, remote)
                qmp.execute("blockdev-mirror", {
                    "job-id": JOB, "device": qemu.NODE, "target": TARGET, "sync": "full",
                    "copy-mode": "write-blocking", "auto-dismiss": False})
            except protocol.StorageError:
                _remove(qmp)  # no connection to the proxy may linger
                raise
    log.info("%s: mirroring to %s (operation %s, domain %r)", where.spec, remote,
             record["id"], domain)
    return ["MirrorV1", record["id"]]


def stat(dbg, operation):
    kind, operation_id = operation
    path = _index(operation_id) if kind == "MirrorV1" else None
    if path is None:
        raise _unknown(operation)
    try:
        with open(path) as stream:
            uri = stream.read()
    except IOError:
        raise _unknown(operation)
    with state.Attachment(location.VolumeLocation.parse(uri)) as att:
        record = att.values.get("mirror")
        if not record or record["id"] != operation_id:
            raise _unknown(operation)
        status = _status(att, record)
        told = "failed" if status["failed"] else "complete" if status["complete"] else None
        if told and record.get("told") != told:
            record["told"] = told  # what finish() must honour
            att.save()
        return status


def _status(att, record):
    if "error" in record:
        return {"failed": True, "complete": False}
    if record.get("closed"):
        return {"failed": False, "complete": True, "progress": 1.0}
    try:
        with qemu.Monitor(att, QMP_BOUND) as qmp:
            job = _job(qmp)
    except qemu.QemuFailed as exc:
        error = str(exc)
    else:
        if job is not None and job["status"] in READY:
            return {"failed": False, "complete": True, "progress": 1.0}
        if job is not None and job["status"] != "concluded":
            total = job["total-progress"]
            return {"failed": False, "complete": False,
                    "progress": min(1.0, float(job["current-progress"]) / total)
                    if total else 0.0}
        error = job.get("error", "the job ended") if job else "the mirror job is gone"
    record["error"] = error
    log.error("%s: the mirror to %s failed: %s", att.where.spec, record["remote"], error)
    return {"failed": True, "complete": False}


def finish(att):
    """Datapath.deactivate, before the image closes: end the volume's mirror (see
    the module's doc). Returns the error deactivate must raise once it has closed
    the source, or None."""
    record = att.values.get("mirror")
    if not record or record.get("closed"):
        return None
    try:
        error = _end(att)
    except protocol.StorageError as exc:  # qemu is gone or does not answer
        error = str(exc)
    record["closed"] = True
    if error and "error" not in record:
        record["error"] = error
        log.error("%s: the mirror to %s did not complete: %s", att.where.spec,
                  record["remote"], error)
    unreported = "error" in record and record.get("told") == "complete"
    if unreported:
        record["told"] = "failed"  # by deactivate's error
    att.save()
    if not unreported:
        return None
    return protocol.failure(
        "Mirror_failed", "%s: the mirror to %s failed after it was in sync (%s): the "
        "target misses writes; the volume is deactivated here all the same"
        % (att.where.spec, record["remote"], record["error"]))


def _end(att):
    """Let the job end (see the module's doc) and remove it and the target from
    qemu; returns why the target may miss writes, or None."""
    reason = None
    try:
        with qemu.Monitor(att, END_TIMEOUT) as qmp:
            job = _job(qmp)
            if job is not None and job["status"] != "concluded":
                if job["status"] not in READY:
                    reason = "the volume was deactivated before the mirror was in sync"
                qmp.execute("block-job-cancel", {"device": JOB, "force": reason is not None})
                while job["status"] != "concluded":
                    time.sleep(POLL)
                    job = _job(qmp)
            _remove(qmp)
    except qemu.QemuFailed as exc:
        # A hung NBD target holds the job's requests, and cancelling does not
        # abort them: the Monitor ends qemu. tapdisk is closed by now and qemu
        # writes through to the OSDs, so no acknowledged write is lost; closing
        # the image then fences qemu's client.
        return "the mirror did not end within %d s (a hung target?): %s" % (
            END_TIMEOUT, exc)
    return reason or (job.get("error") if job else "the mirror job is gone")
