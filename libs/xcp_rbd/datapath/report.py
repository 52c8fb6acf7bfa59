"""What this host's datapath holds, for Plugin.diagnostics (of both plugins):
every volume attached here, its domains, and each of its data processes
(tapdisk, rbd-nbd's daemon, qemu, a mirror's relay) with whether it runs, its
systemd unit and cgroup, and its OOM shield. A process that died under a
running VM shows in `dead`. It reads the state files without their locks: a
moment's picture, changing nothing."""

import json
import os

from xcp_rbd.datapath import host, state


def processes(values):
    """[(role, pid, unit)] of the data processes a volume's state names."""
    found = []
    if values.get("tapdisk"):
        found.append(("tapdisk", values["tapdisk"]["pid"], values["tapdisk"].get("unit")))
    if values.get("rbd_nbd"):
        found.append(("rbd-nbd", values["rbd_nbd"]["pid"], values["rbd_nbd"].get("unit")))
    if values.get("qemu_pid"):
        found.append(("qemu", values["qemu_pid"], values.get("qemu_unit")))
    relay = (values.get("mirror") or {}).get("relay")
    if relay and not values["mirror"].get("closed"):
        found.append(("mirror relay", relay["pid"], relay.get("unit")))
    return found


def _cgroup(pid):
    try:
        with open("/proc/%d/cgroup" % pid) as stream:
            for line in stream:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "name=systemd":
                    return path
    except IOError:
        pass
    return None


def _describe(values):
    described, dead = [], []
    for role, pid, unit in processes(values):
        running = host.running(pid)
        described.append({"role": role, "pid": pid, "unit": unit, "running": running,
                          "cgroup": _cgroup(pid) if running else None,
                          "oom_score_adj": host.oom_score_adj(pid) if running else None})
        if not running:
            dead.append(role)
    return {"volume": values.get("volume"), "backend": values.get("backend"),
            "domains": values.get("domains", []), "active": values.get("active", {}),
            "device": values.get("device"), "processes": described, "dead": dead}


def report():
    root = os.path.join(state.RUN_DIR, "datapath")
    volumes = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, name, state.Attachment.FILE)) as stream:
                volumes.append(_describe(json.load(stream)))
        except (IOError, ValueError):
            continue  # being created or removed
    return volumes
