"""The rbd+tapdisk datapath: how a VM on this host reads and writes an RBD image.

- commands: Plugin.Query and the Datapath.* commands (attach, activate,
  deactivate, detach): the lifecycle, the same for both backends;
- state: this host's identity and its per-volume state under RUN_DIR;
- activation: the cross-host lock that lets one host at a time write a volume;
- qemu, rbd_nbd: the two backends, chosen per SR (device-config `datapath`);
- mirror: Data.mirror and Data.stat, with qemu's mirror job or, under tapdisk
  (rbd-nbd), a relay process of ours (relay, speaking NBD with nbd_wire);
- report: what this host's datapath holds, for Plugin.diagnostics;
- host: the steps that need Xen or the kernel's NBD driver (tap-ctl,
  nbd-client, rbd-nbd map/unmap), which run only on an XCP-ng dom0.
"""


def data_client_options(config):
    """Ceph options for a data client (qemu's librbd, rbd-nbd, a mirror's relay)
    beyond its conf file and user: paths and bounds only, never a key.

    No OSD or monitor operation timeout: a data client must wait for an OSD
    that restarts rather than fail the VM's I/O; only connecting is bounded.
    """
    options = {"client_mount_timeout": str(config.timeout)}
    if config.keyring:
        options["keyring"] = config.keyring
    if config.mon_host:
        options["mon_host"] = config.mon_host
    return options


def client_options(config):
    """data_client_options as command-line options."""
    return [item for key, value in sorted(data_client_options(config).items())
            for item in ("--" + key, value)]
