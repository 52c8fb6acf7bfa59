"""SR.* commands.

An SR is a pool (and a namespace in it) plus its index object (see metadata).
The SR keeps no state on hosts except the list of SRs attached on this host,
which only Plugin.diagnostics reads.
"""

import json
import os

import rados
import rbd

from xcp_rbd import cluster, errors, gc, health, location, log, metadata, protocol, volume
from xcp_rbd.attached import open_sr
from xcp_rbd.metadata import Omap, SrIndex, dumps
from xcp_rbd.records import SR_RECORD

RUN_DIR = os.environ.get("XCP_RBD_RUN_DIR", "/var/run/nonpersistent/xcp-rbd")
OWNED_NAMESPACE_PREFIX = "xcp-"

SR_DOC = {
    "pool": "RBD pool of the SR (required)",
    "namespace": "RBD namespace inside the pool (default: a namespace of the SR's own, "
                 "so that several SRs can share one pool)",
    "datapath": "how VMs reach the disks: rbd-nbd (default) or qemu",
    "max_chain_depth": "clone chains longer than this are flattened in the background "
                       "(default %d)" % location.DEFAULT_MAX_CHAIN_DEPTH,
    "sr_uuid": "set by SR.create: the SR's uuid",
}


def _location_from_config(configuration, sr_uuid=None):
    pool = configuration.get("pool")
    if not pool:
        raise errors.InvalidConfiguration(
            "device-config:pool (the RBD pool of the SR) is required")
    return location.SrLocation.from_mapping(
        pool, configuration.get("namespace", ""),
        sr_uuid or configuration.get("sr_uuid", ""), configuration)


def _check_rbd_pool(connection, where):
    ioctx = connection.open_pool(where.pool)
    try:
        if "rbd" not in ioctx.application_list():
            raise errors.CephPoolNotRbd(
                "pool '%s' is not an RBD pool (enable it with "
                "'rbd pool init %s')" % (where.pool, where.pool))
    finally:
        ioctx.close()


def _permission_denied(where, doing):
    return errors.CephPermissionDenied(
        "client.%s may not %s in %s: give it osd and mgr "
        "'profile rbd pool=%s'" % (where.cluster.user, doing, where.describe(), where.pool,))


def create(dbg, uuid, configuration, name, description):
    where = _location_from_config(configuration, uuid)
    owned = not where.namespace
    if owned:
        where.namespace = OWNED_NAMESPACE_PREFIX + uuid
    with cluster.Connection(where.cluster) as connection:
        _check_rbd_pool(connection, where)
        default_ns = connection.open_pool(where.pool)
        ioctx = connection.open_pool(where.pool, where.namespace)
        created_namespace = False
        try:
            rbd_api = rbd.RBD()
            if not rbd_api.namespace_exists(default_ns, where.namespace):
                if not owned:
                    raise errors.CephNamespaceMissing(
                        "namespace '%s' does not exist in pool "
                        "'%s' (create it with 'rbd namespace create %s/%s', or leave "
                        "device-config:namespace out)" % (
                            where.namespace, where.pool, where.pool, where.namespace))
                rbd_api.namespace_create(default_ns, where.namespace)
                created_namespace = True
            record = {"uuid": uuid, "name": name, "description": description,
                      "namespace_owned": owned, "created": metadata.now()}
            SrIndex(ioctx, uuid).create({SR_RECORD: dumps(record)})
            Omap(default_ns, metadata.REGISTRY).write(
                {uuid: dumps({"namespace": where.namespace})})
        except rados.PermissionError:
            if created_namespace:
                rbd_api.namespace_remove(default_ns, where.namespace)
            raise _permission_denied(where, "write")
        finally:
            ioctx.close()
            default_ns.close()
    result = dict(configuration)
    result.update(where.cluster.to_mapping())
    result.update(sr_uuid=uuid, namespace=where.namespace)
    return result


def attach(dbg, configuration):
    where = _location_from_config(configuration)
    if not where.sr_uuid:
        raise errors.InvalidConfiguration(
            "device-config:sr_uuid is missing: it is set by SR.create")
    sr = str(where)
    with open_sr(sr) as attached:
        attached.record()
    _remember_attached(where.sr_uuid, sr)
    return sr


def detach(dbg, sr):
    _forget_attached(location.SrLocation.parse(sr).sr_uuid)


def _attached_path(sr_uuid):
    return os.path.join(RUN_DIR, "attached", sr_uuid)


def _remember_attached(sr_uuid, sr):
    path = _attached_path(sr_uuid)
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path), mode=0o700)
    with open(path + ".tmp", "w") as stream:
        stream.write(sr)
    os.rename(path + ".tmp", path)


def _forget_attached(sr_uuid):
    try:
        os.unlink(_attached_path(sr_uuid))
    except OSError:
        pass


def attached_srs():
    """The `sr` strings of the SRs attached on this host."""
    directory = os.path.join(RUN_DIR, "attached")
    srs = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        with open(os.path.join(directory, name)) as stream:
            srs.append(stream.read())
    return srs


def destroy(dbg, sr):
    with open_sr(sr) as attached:
        record = attached.record()
        gc.destroy_everything(attached)
        default_ns = attached.connection.open_pool(attached.location.pool)
        try:
            Omap(default_ns, metadata.REGISTRY).write(remove=[attached.location.sr_uuid])
            attached.index.remove()
            if record.get("namespace_owned"):
                rbd.RBD().namespace_remove(default_ns, attached.location.namespace)
        finally:
            default_ns.close()
    _forget_attached(location.SrLocation.parse(sr).sr_uuid)


def stat(dbg, sr):
    """SR.stat: the SR's record, capacity and health (see health): an answer also
    when the cluster does not say everything, and `Unreachable` when it does not
    answer in time (also when the watchdog ends the call)."""
    where = location.SrLocation.parse(sr)
    protocol.answer_on_timeout(lambda explanation: _unreachable(sr, where, explanation))
    return _stat(sr, where)


def _stat(sr, where):
    try:
        with open_sr(sr) as attached:
            record = attached.record()
            total, free, unknown = health.capacity(attached.connection, where.pool)
            status, message = health.health(attached.connection, where.pool)
    except errors.CephUnreachable as exc:
        return _unreachable(sr, where, exc.params[-1])
    return _stat_result(sr, record, total, free,
                        [status, "; ".join(text for text in (message, unknown) if text)])


def _unreachable(sr, where, explanation):
    record = {"uuid": where.sr_uuid, "name": "", "description": ""}
    return _stat_result(sr, record, 0, 0, ["Unreachable", explanation])


def _stat_result(sr, record, total, free, state):
    return {
        "sr": sr, "uuid": record["uuid"], "name": record["name"],
        "description": record["description"], "total_space": total,
        "free_space": free, "datasources": [], "clustered": False, "health": state,
    }


def _set_field(sr, field, value):
    with open_sr(sr) as attached:
        attached.record()

        def change(record):
            record[field] = value
            return record
        attached.index.update(SR_RECORD, change)


def set_name(dbg, sr, new_name):
    _set_field(sr, "name", new_name)


def set_description(dbg, sr, new_description):
    _set_field(sr, "description", new_description)


def ls(dbg, sr):
    with open_sr(sr) as attached:
        entries = attached.index.read()
        if SR_RECORD not in entries:
            raise errors.SrDoesNotExist(attached.describe())
        return volume.views(attached, entries)


def probe(dbg, configuration):
    """The SRs of device-config:pool, or without a pool the RBD pools to choose from;
    with sr_uuid, that SR wherever it is (xapi refuses an answer whose results carry
    sr_uuid without being complete)."""
    if configuration.get("pool"):
        return _probe_pool(dbg, configuration)
    pools = _rbd_pools(configuration)
    if configuration.get("sr_uuid"):
        return [found for pool in pools
                for found in _probe_pool(dbg, dict(configuration, pool=pool))]
    return [{"configuration": dict(configuration, pool=pool), "complete": False,
             "extra_info": {}} for pool in pools]


def _probe_pool(dbg, configuration):
    where = _location_from_config(configuration)
    with cluster.Connection(where.cluster) as connection:
        default_ns = connection.open_pool(where.pool)
        try:
            registry = Omap(default_ns, metadata.REGISTRY).read()
        finally:
            default_ns.close()
    results = []
    for sr_uuid, value in sorted(registry.items()):
        if where.sr_uuid and sr_uuid != where.sr_uuid:
            continue
        found = location.SrLocation(where.pool, json.loads(value)["namespace"], sr_uuid,
                                    where.cluster, where.datapath)
        config = dict(configuration)
        config.update(sr_uuid=sr_uuid, namespace=found.namespace)
        try:
            sr_stat = _stat(str(found), found)
        except errors.StorageError as exc:
            log.warning("probe: SR %s is registered but unreadable: %s", sr_uuid, exc)
            continue
        results.append({"configuration": config, "complete": True, "sr": sr_stat,
                        "extra_info": {}})
    return results


def _rbd_pools(configuration):
    config = cluster.ClusterConfig.from_mapping(configuration)
    pools = []
    with cluster.Connection(config) as connection:
        for pool in connection.rados.list_pools():
            ioctx = connection.open_pool(pool)
            try:
                if "rbd" in ioctx.application_list():
                    pools.append(pool)
            finally:
                ioctx.close()
    return pools
