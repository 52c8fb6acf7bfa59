"""Plugin.Query and the Datapath.* commands (smapiv3-spec sections 4.6, 6.5,
6.6, 9.2): a volume's life on one host, the same for both backends.

- attach: tapdisk's Xen device, and what the backend prepares; opens nothing
  (it runs on a live migration's destination while the source writes).
  Returns XenDisk (vbd3 on the tapdisk device), BlockDevice (the same path, for
  qemu-emulated disks and dom0 users) and the backend's own (qemu: Nbd).
- activate: the activation lock (activation), then the backend opens the image
  and gives a dom0 block device, and tapdisk opens that device.
  activate_readonly (feature VDI_ACTIVATE_READONLY of the volume plugin: xapi's
  read-only users, its NBD server's readers): the same without the lock, the
  image opened read-only; so is every snapshot.
- deactivate: the reverse, flushing on the way; the lock is released last.
  A storage migration's mirror (mirror) ends before the image closes.
  Each step is recorded in the volume's state as it is done or undone, so
  every command can be repeated: XAPI deactivates twice per shutdown.
- detach: whatever is left, then the state itself; it never fails.

Several domains use one volume on one host at once (xapi-flows sections 3.3, 4.2,
5): a localhost migration's old and new domain, one dom0 domain per NBD reader,
a storage migration's MIR... datapath, the VMs of a sharable disk. The state
keeps the set of attached domains and the active ones (with their mode), and
the volume stays open while one is active and attached while one is attached.
"""

import json

from xcp_rbd import bounds, cluster, errors, location, log, protocol
from xcp_rbd.datapath import host, mirror, qemu, rbd_nbd, state

VERSION = "1.0.0"
BACKENDS = {backend.name: backend for backend in (rbd_nbd.RbdNbd(), qemu.Qemu())}


def query(dbg):
    return {
        "plugin": location.DATAPATH_SCHEME,
        "name": "RBD through tapdisk",
        "description": "RBD images for Xen guests: tapdisk over rbd-nbd (default) or over "
                       "qemu's rbd driver and NBD, one writer host at a time",
        "vendor": "xcp-rbd developers",
        "copyright": "(C) the xcp-rbd developers, GPLv2",
        "version": VERSION,
        "required_api_version": "5.0",
        "features": [],
        "configuration": {},
        "required_cluster_stack": [],
    }


def diagnostics(dbg):
    """The volumes this host's datapath holds and their data processes (report)."""
    from xcp_rbd.datapath import report
    return json.dumps({"plugin": location.DATAPATH_SCHEME, "version": VERSION,
                       "volumes": report.report()}, indent=2, sort_keys=True)


def _volume(uri):
    where = location.VolumeLocation.parse(uri)
    return where, BACKENDS[where.backend]


def _usable(uri):
    """_volume, for the calls that give a VM the data (not for the teardown ones)."""
    where, backend = _volume(uri)
    if where.data_destroyed:
        raise errors.VolumeDataDestroyed(
            "%s: its data was destroyed (Volume.data_destroy), "
            "only its changed-block tracking metadata is left" % where.spec)
    return where, backend


def attach(dbg, uri, domain):
    where, backend = _usable(uri)
    with state.Attachment(where) as att:
        if "tapdisk" not in att.values:
            tapdisk = host.tapdisk_create(att.volume_id)
            att.values.update(uri=uri, volume=where.spec, backend=backend.name,
                              tapdisk=tapdisk)
        att.values["domains"] = sorted(set(att.values.get("domains", [])) | {domain})
        att.save()
        backend.attach(att, where)
        log.info("%s attached (domain %r)", where.spec, domain)
        tapdev = att.values["tapdisk"]["path"]
        return {"implementations": [
            ["XenDisk", {"backend_type": "vbd3", "params": tapdev, "extra": {}}],
            ["BlockDevice", {"path": tapdev}],
        ] + backend.implementations(att, where)}


def activate(dbg, uri, domain):
    _activate(uri, domain, read_only=False)


def activate_readonly(dbg, uri, domain):
    _activate(uri, domain, read_only=True)


def _active(att):
    """{domain: "rw" or "ro"} of the domains the volume is active for (a state
    written before there were several named one `active_domain`)."""
    values = att.values
    active = values.setdefault("active", {})
    if "active_domain" in values:
        active[values.pop("active_domain")] = "ro" if values.get("read_only") else "rw"
    return active


def _activate(uri, domain, read_only):
    where, backend = _usable(uri)
    read_only = read_only or where.snap is not None  # a snapshot never changes
    with state.Attachment(where) as att:
        if "tapdisk" not in att.values:
            raise errors.NotAttached("%s is not attached on this host: "
                                     "Datapath.attach comes first" % where.spec)
        active = _active(att)
        if not host.running(att.values["tapdisk"]["pid"]):
            raise errors.TapdiskDied(
                "%s: its tapdisk (pid %d) died, and with it the disk of "
                "every domain using it (%s): shut them down, which detaches it, and start "
                "them again" % (where.spec, att.values["tapdisk"]["pid"],
                                ", ".join(att.values.get("domains", []))))
        if att.values.get("tapdisk_open"):
            if backend.alive(att):
                if att.values.get("read_only") and not read_only:
                    raise errors.VolumeActiveReadOnly(
                        "%s is open read-only on this host "
                        "for %s: it can be written once they deactivate it"
                        % (where.spec, ", ".join(sorted(active)) or "a reader"))
                active[domain] = "ro" if read_only else "rw"
                att.save()
                return None
            # The data process died under the domains using the volume: a new one,
            # with tapdisk moved onto it (their VBDs stay).
            log.error("%s: its %s died: starting another, then tapdisk moves onto it",
                      where.spec, backend.name)
            read_only = att.values.get("read_only", read_only)
            _close_backend(att, where, backend)
        host.free_nbd_device()  # refused before anything is set up: both need one
        try:
            if read_only:  # no writer to exclude, and none excluded
                _open(att, where, backend, True)
            else:
                with cluster.Connection(where.cluster) as connection:
                    with _activation_lock(connection, where) as lock:
                        _open_exclusive(att, where, backend, lock)
        except Exception:
            _undo(att, where, backend)
            raise
        active[domain] = "ro" if read_only else "rw"
        att.save()
    log.info("%s active (domain %r%s)", where.spec, domain, ", read-only" if read_only else "")
    return None


def _activation_lock(connection, where):
    from xcp_rbd.datapath.activation import ActivationLock  # rados: only calls to Ceph pay
    return ActivationLock(connection, where)


def _open_exclusive(att, where, backend, lock):
    me = state.identity()
    lock.acquire(me)
    att.values["claimed"] = True
    att.save()
    before = lock.watchers()
    _open(att, where, backend, False, lambda: att.values.update(
        clients=lock.record_clients(me, before)))


def _open(att, where, backend, read_only, opened=None):
    """The backend opens the image, `opened()` runs, tapdisk opens the device;
    each step recorded once done."""
    protocol.arm_watchdog(bounds.call(where.cluster.timeout), "%s: the cluster did not "
                          "answer while activating" % where.spec)
    att.values.update(opened=True, read_only=read_only)  # first: a half-open backend
    att.save()                                           # is undone too
    att.values["device"] = backend.open(att, where, read_only)
    att.save()
    if opened:
        opened()
        att.save()
    if att.values.get("tapdisk_open"):  # on a dead device: moved to the new one
        host.tapdisk_reopen(att.values["tapdisk"], att.values["device"])
    else:
        host.tapdisk_open(att.values["tapdisk"], att.values["device"], read_only)
    att.values["tapdisk_open"] = True
    att.save()


def _undo(att, where, backend):
    try:
        _deactivate(att, where, backend)
    except Exception as exc:  # the activation's own error is the one to report
        log.error("%s: undoing a failed activation: %s", where.spec, exc)


def _deactivate(att, where, backend):
    """Undo whatever activate did, in reverse order, saving after each step."""
    values = att.values
    if values.pop("tapdisk_open", False):
        try:
            host.tapdisk_close(values["tapdisk"])
        except errors.StorageError as exc:
            # A dead tapdisk writes nothing: go on, or the VM could never stop.
            log.warning("%s: %s", where.spec, exc)
        att.save()
    _close_backend(att, where, backend)


def _close_backend(att, where, backend):
    """The backend's part of _deactivate: the mirror, the image, the lock."""
    values = att.values
    dead = False
    unfinished = None
    if values.get("opened"):
        # Before the image closes: the mirror target must get every write.
        unfinished = mirror.finish(att)
        dead = backend.close(att, where)
        for key in ("opened", "device", "read_only"):
            values.pop(key, None)
        att.save()
    if values.get("claimed"):
        with cluster.Connection(where.cluster) as connection:
            with _activation_lock(connection, where) as lock:
                lock.release(state.identity(), values.get("clients", []) if dead else ())
        for key in ("claimed", "clients"):
            values.pop(key, None)
        att.save()
    if unfinished:
        raise unfinished


def deactivate(dbg, uri, domain):
    """The volume closes when the last active domain deactivates it; for a domain
    that is not active (never was, or the call repeats) with others active, nothing."""
    where, backend = _volume(uri)
    with state.Attachment(where) as att:
        active = _active(att)
        active.pop(domain, None)
        if active:
            att.save()
            log.info("%s stays active for %s (deactivate for %r)", where.spec,
                     ", ".join(sorted(active)), domain)
            return None
        _deactivate(att, where, backend)
        att.values.pop("active", None)
        att.save()
    log.info("%s inactive (domain %r)", where.spec, domain)


def detach(dbg, uri, domain):
    """The volume is torn down when its last attached domain detaches it (closed
    already when no domain is active any more). Never fails: what cannot be undone
    is logged and forgotten."""
    where, backend = _volume(uri)
    with state.Attachment(where) as att:
        active = _active(att)
        active.pop(domain, None)
        att.values["domains"] = [d for d in att.values.get("domains", []) if d != domain]
        if att.values["domains"]:
            if not active:
                _leave(where, [("deactivate", lambda: _deactivate(att, where, backend))])
                att.values.pop("active", None)
            att.save()
            log.info("%s stays attached for %s (detach for %r)", where.spec,
                     ", ".join(att.values["domains"]), domain)
            return None
        tapdisk = att.values.get("tapdisk")
        steps = [("deactivate", lambda: _deactivate(att, where, backend)),
                 ("end the backend", lambda: backend.detach(att, where))]
        if tapdisk:
            steps.append(("destroy tapdisk", lambda: host.tapdisk_destroy(tapdisk)))
        _leave(where, steps)
        mirror.forget(att)
        att.values = {}
    log.info("%s detached (domain %r)", where.spec, domain)


def _leave(where, steps):
    """Run teardown steps, logging (not raising) what fails: detach never fails."""
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            log.error("%s: detach could not %s (left behind): %s", where.spec, what, exc)
