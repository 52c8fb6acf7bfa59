"""The rbd-nbd backend (the default on XCP-ng): `rbd-nbd map` at activate gives
a kernel NBD device served by a daemon of rbd-nbd's own, which opens the
image with librbd; `rbd-nbd unmap` at deactivate flushes and closes it.
Nothing is opened at attach. Every step is a host step (kernel NBD).

The daemon runs with librbd's cache off, as qemu's rbd driver does here
(cache.direct): a write tapdisk was told is done is on the OSDs, where any
other client (a mirror's relay, another host after a failover) reads it.

The `Nbd` export is tapdisk's own NBD server for the VBD (host.nbd_socket),
listening while the volume is active: xapi's NBD server and a storage
migration into this SR write through it.

A daemon that dies (OOM, crash, a Ceph client upgrade) leaves its device
dead on kernel 4.19: the VM's I/O fails until the volume is deactivated and
activated again (the VM restarted). Octopus' rbd-nbd has no `attach` to give
the device a new daemon, and 4.19's NBD driver no reconnect for ioctl-made
devices. alive() tells it, and the datapath's answers and diagnostics say it.
"""

import os

from xcp_rbd.datapath import client_options, host


class RbdNbd(object):
    name = "rbd-nbd"

    def attach(self, att, where):
        """Nothing to prepare: the daemon starts with the mapping."""

    def implementations(self, att, where):
        return [["Nbd", {"uri": "nbd:unix:%s:exportname=%s" % (
            host.nbd_socket(att.values["tapdisk"]), where.export)}]]

    def alive(self, att):
        daemon = att.values.get("rbd_nbd")
        if not daemon:
            return True  # mapped by a version that did not record its daemon
        return host.running(daemon["pid"]) and \
            host.nbd_client_pid(att.values["device"]) == daemon["pid"]

    def open(self, att, where, read_only):
        config = where.cluster
        options = ["--cluster", config.cluster, "--id", config.user, "--rbd_cache", "false"]
        if os.path.isfile(config.conf):
            options += ["-c", config.conf]
        mapped = host.rbd_nbd_map(where.spec, options + client_options(config), read_only,
                                  att.volume_id)
        att.values["rbd_nbd"] = {"pid": mapped["pid"], "unit": mapped["unit"]}
        return mapped["device"]

    def close(self, att, where):
        """Unmap; True when the daemon had died: its Ceph client must be fenced."""
        dead = not self.alive(att)
        host.rbd_nbd_unmap(att.values["device"], att.values.get("rbd_nbd", {}).get("pid"))
        att.values.pop("rbd_nbd", None)
        return dead

    def detach(self, att, where):
        """Nothing left once unmapped."""
