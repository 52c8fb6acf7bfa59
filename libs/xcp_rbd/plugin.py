"""Plugin.* commands of the volume plugin: what it is, and how its SRs are doing."""

import json
import os

from xcp_rbd import bounds, ceph_client, cluster, gc, location, protocol, sr
from xcp_rbd.attached import open_sr

VERSION = "1.0.0"

FEATURES = [
    "SR_ATTACH", "SR_DETACH", "SR_CREATE", "SR_PROBE", "SR_UPDATE",
    "VDI_CREATE", "VDI_DESTROY", "VDI_SNAPSHOT", "VDI_CLONE", "VDI_RESIZE",
    "THIN_PROVISIONING", "VDI_MIRROR", "VDI_CONFIG_CBT", "VDI_REVERT",
    "VDI_ACTIVATE_READONLY",
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


# SMAPIv1 drivers live here as <Type>SR / <Type>SR.py: an RBDSR claims type `rbd` too.
SMAPIV1_DRIVERS = os.environ.get("XCP_RBD_SMAPIV1_DIR", "/opt/xensource/sm")


def diagnostics(dbg):
    """Why it does (not) work here: this host's Ceph client and Python, any SMAPIv1
    driver that claims the SR type too, the SRs attached on this host (their
    cluster's version, what they hold, what waits) and the volumes its datapath
    holds with their data processes (datapath.report). Reads only: it writes nothing
    to any cluster."""
    from xcp_rbd.datapath import report
    reports = []
    document = {"plugin": "rbd", "version": VERSION, "client": ceph_client.report(),
                "sr_type_clash": sr_type_clash(), "srs": reports,
                "datapath": report.report()}
    protocol.answer_on_timeout(lambda explanation: _diagnostics_text(dict(
        document, unfinished="stopped at an SR whose cluster did not answer: %s"
        % explanation)))
    attached_srs = sr.attached_srs()
    # One bound for the call, whatever the number of SRs (each connection would
    # otherwise bring a bound of its own): the largest one SR would have.
    bound = bounds.call(max([location.SrLocation.parse(text).cluster.timeout
                             for text in attached_srs] or [cluster.DEFAULT_TIMEOUT]))
    protocol.limit_call(bound, "Plugin.diagnostics took its whole bound of %d s" % bound)
    for attached_sr in attached_srs:
        where = location.SrLocation.parse(attached_sr)
        report = {"sr_uuid": where.sr_uuid, "pool": where.pool,
                  "namespace": where.namespace, "cluster": where.cluster.describe(),
                  "datapath": where.datapath}
        reports.append(report)  # what the watchdog shows, should this SR hang
        try:
            with open_sr(attached_sr) as attached:
                report.update(gc.status(attached),
                              cluster_version=attached.connection.cluster_version())
        except Exception as exc:  # one broken SR must not hide the others
            report["error"] = str(exc)
    return _diagnostics_text(document)


def _diagnostics_text(document):
    return json.dumps(document, indent=2, sort_keys=True)


def sr_type_clash():
    """SMAPIv1 drivers installed on this host that also claim SR type `rbd` (see the
    README: one of the two must go), as paths."""
    try:
        names = os.listdir(SMAPIV1_DRIVERS)
    except OSError:
        return []
    return sorted(os.path.join(SMAPIV1_DRIVERS, name) for name in names
                  if name.lower() in ("rbdsr", "rbdsr.py"))
