"""The rbd-nbd backend (the default on XCP-ng): `rbd-nbd map` at activate gives
a kernel NBD device served by a daemon of rbd-nbd's own, which opens the
image with librbd; `rbd-nbd unmap` at deactivate flushes and closes it.
Nothing is opened at attach. Every step is a host step (kernel NBD)."""

import os

from xcp_rbd.datapath import client_options, host


class RbdNbd(object):
    name = "rbd-nbd"

    def attach(self, att, where):
        """Nothing to prepare: the daemon starts with the mapping."""

    def implementations(self, att, where):
        return []

    def alive(self, att):
        return True  # the kernel device outlives a crashed daemon: unmap cleans up

    def open(self, att, where, read_only):
        config = where.cluster
        options = ["--cluster", config.cluster, "--id", config.user]
        if os.path.isfile(config.conf):
            options += ["-c", config.conf]
        return host.rbd_nbd_map(where.spec, options + client_options(config), read_only)

    def close(self, att, where):
        host.rbd_nbd_unmap(att.values["device"])
        return False

    def detach(self, att, where):
        """Nothing left once unmapped."""
