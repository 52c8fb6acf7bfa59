"""Plugin.* commands of the volume plugin: what it is, and how its SRs are doing."""

import json

from xcp_rbd import cluster, gc, location, sr
from xcp_rbd.attached import open_sr

VERSION = "1.0.0"

FEATURES = [
    "SR_ATTACH", "SR_DETACH", "SR_CREATE", "SR_PROBE", "SR_UPDATE",
    "VDI_CREATE", "VDI_DESTROY", "VDI_SNAPSHOT", "VDI_CLONE", "VDI_RESIZE",
    "THIN_PROVISIONING", "VDI_MIRROR", "VDI_CONFIG_CBT",
]


def query(dbg):
    configuration = dict(sr.SR_DOC)
    configuration.update(cluster.ClusterConfig.DOC)
    return {
        "plugin": location.SR_SCHEME,
        "name": "Ceph RBD",
        "description": "Every VDI an RBD image, every snapshot an RBD snapshot: "
                       "snapshot, clone, revert and delete at Ceph speed",
        "vendor": "xcp-rbd developers",
        "copyright": "(C) the xcp-rbd developers, GPLv2",
        "version": VERSION,
        "required_api_version": "5.0",
        "features": list(FEATURES),
        "configuration": configuration,
        "required_cluster_stack": [],
    }


def diagnostics(dbg):
    """The SRs attached on this host: where they are, what they hold, what waits."""
    reports = []
    for attached_sr in sr.attached_srs():
        where = location.SrLocation.parse(attached_sr)
        try:
            with open_sr(attached_sr) as attached:
                report = gc.status(attached)
        except Exception as exc:  # one broken SR must not hide the others
            report = {"error": str(exc)}
        report.update(sr_uuid=where.sr_uuid, pool=where.pool, namespace=where.namespace,
                      cluster=where.cluster.describe(), datapath=where.datapath)
        reports.append(report)
    return json.dumps({"plugin": "rbd", "version": VERSION, "srs": reports},
                      indent=2, sort_keys=True)
