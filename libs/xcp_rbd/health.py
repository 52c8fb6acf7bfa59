"""What SR.stat says about an SR's pool: its capacity and its health, from what the
cluster reports about that pool, saying what it could not know.

Health is the SR's, not the cluster's: xapi fails every sr-scan of an SR whose
health is `Unavailable` ("try reboot"), so an unrelated HEALTH_ERR (a CephFS without
MDS, another pool's lost PGs) must not make our SR unusable. From the monitors'
`health detail`:
- `Unavailable`: I/O cannot be served in this pool: some of its PGs are inactive,
  or the cluster pauses reads or writes (`pauserd`, `pausewr`);
- `Healthy` otherwise, with what concerns the pool in the message: full (quota or
  OSDs: writes wait until space is freed, and a scan must still work to free it),
  nearly full, degraded PGs (data is served while Ceph recovers);
- `Unreachable` (SR.stat's own answer) when the monitors do not answer.

Capacity: the pool's quota if it has one (from the OSD map, which the monitors
always have), else what the manager's statistics say the pool can still store plus
what it stores. A pool the statistics do not list yet (created seconds ago, or a
manager that just restarted) gets the cluster's raw capacity, and says so.
"""

import re

from xcp_rbd import errors

_PG_OF_POOL = re.compile(r"\bpg (\d+)\.[0-9a-f]+\b")
_CLUSTER_WIDE_FULL = ("OSD_FULL",)
_PAUSED = re.compile(r"\bpause(rd|wr)\b")


def capacity(connection, pool):
    """(total bytes, free bytes, what could not be known or "")."""
    quota = next((p.get("quota_max_bytes", 0) for p in connection.mon_command(
        "osd pool ls", detail="detail") if p["pool_name"] == pool), 0)
    stats, unknown = _pool_statistics(connection, pool)
    if stats is None:
        raw = connection.rados.get_cluster_stats()
        total, free = raw["kb"] * 1024, raw["kb_avail"] * 1024
        if quota:
            return quota, min(quota, free), unknown
        return total, free, unknown + ": the cluster's raw capacity is shown"
    used = stats.get("stored", stats.get("bytes_used", 0))
    if quota:
        return quota, max(quota - used, 0), ""
    return used + stats["max_avail"], stats["max_avail"], ""


def _pool_statistics(connection, pool):
    """(the pool's `ceph df` statistics or None, why there are none)."""
    try:
        report = connection.mon_command("df", detail="detail")
    except errors.StorageError as exc:
        return None, "the cluster gave no pool statistics (%s)" % exc.params[-1]
    for entry in report.get("pools", []):
        if entry["name"] == pool:
            return entry["stats"], ""
    return None, ("pool '%s' is not in the manager's statistics yet (a new pool, or a "
                  "manager that just started)" % pool)


def health(connection, pool):
    """[status, message] of the SR's pool (see the module's docstring)."""
    report = connection.mon_command("health", detail="detail")
    pool_id = str(connection.rados.pool_lookup(pool))
    unavailable, concerns = [], []
    for name, check in sorted(report.get("checks", {}).items()):
        summary = check.get("summary", {}).get("message", name)
        details = [d.get("message", "") for d in check.get("detail", [])]
        ours = [d for d in details if _names_pool(d, pool, pool_id)]
        if name == "PG_AVAILABILITY" and ours:
            unavailable.append("%s: %s" % (summary, "; ".join(ours[:3])))
        elif name == "OSDMAP_FLAGS" and _PAUSED.search(summary):
            unavailable.append(summary)
        elif ours or name in _CLUSTER_WIDE_FULL:
            concerns.append("%s: %s" % (summary, "; ".join(ours[:3])) if ours else summary)
    if unavailable:
        return ["Unavailable", "; ".join(unavailable + concerns)]
    return ["Healthy", "; ".join(concerns)]


def _names_pool(message, pool, pool_id):
    if "pool '%s'" % pool in message:
        return True
    return any(match == pool_id for match in _PG_OF_POOL.findall(message))
