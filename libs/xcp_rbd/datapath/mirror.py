"""Data.mirror and Data.stat (smapiv3-spec sections 4.7, 6.9): the source side of
a storage migration, on both backends.

Data.mirror(uri, domain, remote) mirrors the active volume to the NBD target
`remote` (nbd+unix:///<export>?socket=<path>, xapi's proxy to the
destination's export) while the guest keeps writing; a target that fails a
write fails the mirror, never the guest's write.

- qemu backend: qemu's own mirror job in the qemu that serves the volume: the
  target becomes a block node, and blockdev-mirror copies the whole image to it
  (sync=full). copy-mode=write-blocking: from the start a guest write is
  acknowledged only once the target has it too, so once the job is ready
  every acknowledged write is on the target, and deactivate, in the
  migration's downtime, has next to nothing left to copy.
- rbd-nbd backend: tapdisk's mirror mode, as SMAPIv1's migrations use it. A
  relay of ours (relay.py, a data process) holds the connection to the target
  and becomes tapdisk's secondary (host.tapdisk_mirror), which gets every
  guest write before the image; the relay meanwhile copies what the image
  held. In sync once that copy is done; deactivate closes tapdisk, and the
  relay then flushes the target and ends.

Data.stat receives only the operation, ["MirrorV1", <id>]: RUN_DIR/mirror/<id>
holds the volume's uri, and the volume's state (`mirror` in attachment.json)
and its qemu or relay tell the rest: `progress` while copying, `complete` once
in sync, `failed` once the job or relay failed or is gone. The record stays
until detach, so the last word on a mirror can still be read after deactivate.

finish() runs in Datapath.deactivate before the image closes. A ready qemu
job is cancelled without force: qemu then copies whatever is still dirty,
flushes the target and ends without pivoting, which leaves a target holding
every acknowledged write. (job-complete would pivot the export onto the
target, which deactivate closes right after: nothing to gain.) A mirror not in
sync yet cannot finish within the downtime: it is stopped and reported failed,
as XAPI expects when a VM stops during a migration. If XAPI was told the
mirror was complete and it then fails at the end, deactivate closes the source
and fails: the migration must not go on with a target that misses writes.
"""

import json
import os
import select
import subprocess
import sys
import time
from urllib.parse import parse_qsl, unquote, urlsplit

import xcp_rbd
from xcp_rbd import errors, location, log
from xcp_rbd.datapath import host, qemu, rbd_nbd, state

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
RELAY_SOCKET = "mirror.sock"  # the relay's, for tapdisk's secondary
RELAY_STATUS = "mirror.json"
RELAY_LOG = "mirror.log"


def _target(remote):
    """(export, socket path) of nbd+unix:///<export>?socket=<path>, as XAPI gives it."""
    split = urlsplit(remote)
    socket_path = dict(parse_qsl(split.query)).get("socket")
    if split.scheme != "nbd+unix" or split.netloc or not socket_path:
        raise errors.InvalidParameters(
            "remote must be nbd+unix:///<export>?socket=<path>, not %r" % remote)
    return unquote(split.path[1:]), socket_path


def _index(operation_id):
    """RUN_DIR/mirror/<id>, or None for what is not one of our ids (32 hex digits)."""
    if len(operation_id) != 32 or not all(c in "0123456789abcdef" for c in operation_id):
        return None
    return os.path.join(state.RUN_DIR, "mirror", operation_id)


def _unknown(operation):
    return errors.UnknownOperation("%s is not a mirror of this host, or it ended (its "
                                   "volume was detached or mirrored again)"
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
        raise errors.MirrorTargetSize(
            "%s: the target %s has %d bytes, the volume %d"
            % (where.spec, remote, sizes[TARGET], sizes[qemu.NODE]))


def mirror(dbg, uri, domain, remote):
    where = location.VolumeLocation.parse(uri)
    export, socket_path = _target(remote)
    with state.Attachment(where) as att:
        if not att.values.get("opened") or not att.values.get("tapdisk_open"):
            raise errors.NotActive("%s is not active on this host: only a "
                                   "disk in use is mirrored" % where.spec)
        engine = _engine(att)
        engine.remove(att)  # what an earlier, failed migration left
        forget(att)
        record = {"id": os.urandom(16).hex(), "remote": remote}
        path = _index(record["id"])
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as stream:
            stream.write(uri)
        att.values["mirror"] = record  # recorded first: a half-started mirror is undone too
        att.save()
        engine.start(att, where, export, socket_path, remote)
    log.info("%s: mirroring to %s (operation %s, domain %r)", where.spec, remote,
             record["id"], domain)
    return ["MirrorV1", record["id"]]


def _engine(att):
    return _QemuJob if att.values.get("backend") == qemu.Qemu.name else _Relay


class _QemuJob(object):
    """The mirror of the qemu backend: qemu's mirror job (see the module's doc)."""

    @staticmethod
    def start(att, where, export, socket_path, remote):
        with qemu.Monitor(att, QMP_BOUND) as qmp:
            try:
                qmp.execute("blockdev-add", {
                    "driver": "nbd", "node-name": TARGET, "export": export,
                    "server": {"type": "unix", "path": socket_path}})
                _check_sizes(qmp, where, remote)
                qmp.execute("blockdev-mirror", {
                    "job-id": JOB, "device": qemu.NODE, "target": TARGET, "sync": "full",
                    "copy-mode": "write-blocking", "auto-dismiss": False})
            except errors.StorageError:
                _remove(qmp)  # no connection to the proxy may linger
                raise

    @staticmethod
    def remove(att):
        with qemu.Monitor(att, QMP_BOUND) as qmp:
            _remove(qmp)

    @staticmethod
    def status(att, record):
        """Data.stat's answer, or why the mirror failed."""
        try:
            with qemu.Monitor(att, QMP_BOUND) as qmp:
                job = _job(qmp)
        except errors.QemuFailed as exc:
            return str(exc)
        if job is not None and job["status"] in READY:
            return {"failed": False, "complete": True, "progress": 1.0}
        if job is not None and job["status"] != "concluded":
            total = job["total-progress"]
            return {"failed": False, "complete": False,
                    "progress": min(1.0, float(job["current-progress"]) / total)
                    if total else 0.0}
        return job.get("error", "the job ended") if job else "the mirror job is gone"

    @staticmethod
    def end(att):
        return _end(att)


class _Relay(object):
    """The mirror under tapdisk (rbd-nbd): our relay as tapdisk's secondary (see
    the module's doc and relay.py)."""

    @staticmethod
    def start(att, where, export, socket_path, remote):
        status_path = att.path(RELAY_STATUS)
        if os.path.exists(status_path):
            os.unlink(status_path)
        argv, unit, preexec_fn = host.data_process(
            [sys.executable, "-m", "xcp_rbd.datapath.relay", att.values["uri"], socket_path,
             export, att.socket_path(RELAY_SOCKET), status_path], "mirror", att.volume_id)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(xcp_rbd.__file__)))
        log_fd = os.open(att.path(RELAY_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd,
                env=dict(os.environ, PYTHONPATH=package_root), start_new_session=True,
                preexec_fn=preexec_fn)
        finally:
            os.close(log_fd)
        att.values["mirror"]["relay"] = {"pid": process.pid, "unit": unit}
        att.save()
        ready, _, _ = select.select([process.stdout], [], [], QMP_BOUND)
        said = process.stdout.readline() if ready else b""
        process.stdout.close()
        try:
            if said != b"ready\n":
                raise _relay_failure(att, where, remote)
            host.tapdisk_mirror(att.values["tapdisk"], "nbd:" + att.socket_path(RELAY_SOCKET))
        except errors.StorageError:
            host.kill(process.pid)
            raise

    @staticmethod
    def remove(att):
        relay = (att.values.get("mirror") or {}).get("relay")
        if relay and host.running(relay["pid"]):
            host.tapdisk_mirror(att.values["tapdisk"], "null")
            host.kill(relay["pid"])

    @staticmethod
    def status(att, record):
        status = _relay_status(att)
        if status.get("state") == "failed":
            return status["error"]
        if not rbd_nbd.RbdNbd().alive(att):  # the source's own writes fail: no migration
            return "the volume's rbd-nbd daemon died"
        if not host.running(record["relay"]["pid"]) and status.get("state") != "ended":
            return "the mirror's relay (pid %d) died" % record["relay"]["pid"]
        try:
            if host.tapdisk_stats(att.values["tapdisk"]).get("nbd_mirror_failed"):
                return "tapdisk dropped the mirror after a write to it failed"
        except errors.StorageError as exc:
            return str(exc)
        if status.get("in_sync"):
            return {"failed": False, "complete": True, "progress": 1.0}
        total = status.get("total") or 0
        return {"failed": False, "complete": False,
                "progress": min(1.0, float(status.get("copied", 0)) / total) if total else 0.0}

    @staticmethod
    def end(att):
        """tapdisk is closed by now: the relay flushes the target and ends."""
        relay = att.values["mirror"].get("relay")
        if not relay:
            return "the mirror's relay never started"
        deadline = time.time() + END_TIMEOUT
        while host.running(relay["pid"]):
            if time.time() > deadline:
                host.kill(relay["pid"])
                return "the mirror did not end within %d s (a hung target?)" % END_TIMEOUT
            time.sleep(POLL)
        status = _relay_status(att)
        if status.get("state") != "ended":
            return status.get("error", "the mirror's relay died")
        return status.get("error")  # set when it was not in sync


def _relay_status(att):
    try:
        with open(att.path(RELAY_STATUS)) as stream:
            return json.load(stream)
    except (IOError, ValueError):
        return {}


def _relay_failure(att, where, remote):
    status = _relay_status(att)
    if status.get("reason") == "target_size":
        return errors.MirrorTargetSize("%s: %s" % (where.spec, status["error"]))
    return errors.MirrorFailed("%s: the mirror to %s did not start: %s" % (
        where.spec, remote, status.get("error", "its relay did not answer")))


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
    status = _engine(att).status(att, record)
    if isinstance(status, dict):
        return status
    record["error"] = status
    log.error("%s: the mirror to %s failed: %s", att.where.spec, record["remote"], status)
    return {"failed": True, "complete": False}


def finish(att):
    """Datapath.deactivate, before the image closes: end the volume's mirror (see
    the module's doc). Returns the error deactivate must raise once it has closed
    the source, or None."""
    record = att.values.get("mirror")
    if not record or record.get("closed"):
        return None
    try:
        error = _engine(att).end(att)
    except errors.StorageError as exc:  # qemu is gone or does not answer
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
    return errors.MirrorFailed(
        "%s: the mirror to %s failed after it was in sync (%s): the "
        "target misses writes; the volume is deactivated here all the same"
        % (att.where.spec, record["remote"], record["error"]))


def _end(att):
    """Let qemu's job end (see the module's doc) and remove it and the target from
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
    except errors.QemuFailed as exc:
        # A hung NBD target holds the job's requests, and cancelling does not
        # abort them: the Monitor ends qemu. tapdisk is closed by now and qemu
        # writes through to the OSDs, so no acknowledged write is lost; closing
        # the image then fences qemu's client.
        return "the mirror did not end within %d s (a hung target?): %s" % (
            END_TIMEOUT, exc)
    return reason or (job.get("error") if job else "the mirror job is gone")
