"""Cluster access: how to reach Ceph (ClusterConfig) and a bounded connection.

Every call into librados/librbd made by a plugin script goes through a
`Connection`, whose timeouts make an unreachable cluster a clear error within a
bounded time instead of a hung XAPI operation.
"""

import os

from xcp_rbd import bounds, errors, protocol

DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_TIMEOUT = 10

# librbd image features of every image we create: object-map and fast-diff
# make rollback, diff and usage cost what is allocated, not the image size.
# (Default Pacific features, spelled out so that a host's config cannot drop them.)
IMAGE_FEATURES = ("layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten")


class ClusterConfig(object):
    """The device-config keys that say how to reach the cluster."""

    # Documented to administrators by Plugin.Query (device-config keys).
    DOC = {
        "conf": "Ceph configuration file (default %s)" % DEFAULT_CONF,
        "cluster": "Ceph cluster name (default ceph)",
        "user": "cephx user id, without 'client.' (default admin; recommended: a user "
                "with mon 'profile rbd', osd/mgr 'profile rbd pool=<pool>')",
        "keyring": "path of that user's keyring file on every host (default: Ceph's "
                   "own lookup for that user); never the key itself",
        "mon_host": "monitor addresses, overriding those of the conf file",
        "timeout": "seconds after which a cluster that does not answer makes a call "
                   "fail (default %d)" % DEFAULT_TIMEOUT,
    }
    FIELDS = ("conf", "cluster", "user", "keyring", "mon_host", "timeout")

    def __init__(self, conf=DEFAULT_CONF, cluster="ceph", user="admin", keyring="",
                 mon_host="", timeout=DEFAULT_TIMEOUT):
        self.conf = conf
        self.cluster = cluster
        self.user = user
        self.keyring = keyring
        self.mon_host = mon_host
        self.timeout = timeout

    @classmethod
    def from_mapping(cls, mapping):
        """From device-config or a URI's query; raise a clear error on bad values."""
        values = {k: mapping[k] for k in cls.FIELDS if mapping.get(k)}
        if "timeout" in values:
            try:
                values["timeout"] = int(values["timeout"])
                if values["timeout"] <= 0:
                    raise ValueError()
            except ValueError:
                raise errors.InvalidConfiguration(
                    "timeout must be a positive number of seconds, not %r"
                    % mapping["timeout"])
        if values.get("user", "").startswith("client."):
            values["user"] = values["user"][len("client."):]
        return cls(**values)

    def to_mapping(self):
        """The non-default settings, as strings (for device-config and URIs)."""
        default = ClusterConfig()
        return {field: str(getattr(self, field)) for field in self.FIELDS
                if getattr(self, field) != getattr(default, field)}

    def describe(self):
        return "cluster '%s' (monitors %s, as client.%s)" % (
            self.cluster, self.mon_host or "from %s" % self.conf, self.user)

    def rados_options(self):
        """librados settings: bounded waits, clone v2, nothing on stdout."""
        timeout = str(self.timeout)
        options = {
            "client_mount_timeout": timeout,
            "rados_mon_op_timeout": timeout,
            "rados_osd_op_timeout": timeout,
            "rbd_default_clone_format": "2",
            "log_to_stderr": "false",
            "err_to_stderr": "false",
        }
        if self.keyring:
            options["keyring"] = self.keyring
        if self.mon_host:
            options["mon_host"] = self.mon_host
        return options


class Connection(object):
    """A connected rados handle, with clear errors and a watchdog on the call."""

    def __init__(self, config):
        self.config = config
        self.rados = None

    def __enter__(self):
        # Imported here, not at the top, for the datapath plugin and the xapi tool:
        # they import this module for ClusterConfig, and only their calls that reach
        # Ceph load librados. (The volume plugin's modules import it anyway.)
        import rados
        config = self.config
        protocol.arm_watchdog(
            bounds.call(config.timeout), "%s did not answer within %d seconds" % (
                config.describe(), bounds.call(config.timeout)))
        if not os.path.isfile(config.conf) and not config.mon_host:
            raise errors.InvalidConfiguration(
                "Ceph configuration file %s does not exist and no mon_host is given"
                % config.conf)
        if config.keyring and not os.path.isfile(config.keyring):
            raise errors.InvalidConfiguration(
                "keyring file %s does not exist" % config.keyring)
        handle = rados.Rados(
            rados_id=config.user, clustername=config.cluster,
            conffile=config.conf if os.path.isfile(config.conf) else "",
            conf=config.rados_options())
        try:
            handle.connect(timeout=config.timeout)
        except rados.PermissionDeniedError:
            handle.shutdown()
            raise errors.CephPermissionDenied(
                "%s refused client.%s: check the user and its keyring"
                % (config.describe(), config.user))
        except (rados.TimedOut, rados.Error) as exc:
            handle.shutdown()
            raise errors.CephUnreachable(
                "cannot connect to %s: %s" % (config.describe(), exc))
        self.rados = handle
        return self

    def __exit__(self, exc_type, exc, tb):
        import rados
        import rbd
        timed_out = exc_type is not None and issubclass(exc_type, (rados.TimedOut, rbd.Timeout))
        full = self._full() if timed_out else []
        self.rados.shutdown()
        if full:
            raise errors.CephPoolFull(
                "%s is full, so its writes wait: %s. Add capacity or raise the pool's "
                "quota (ceph osd pool set-quota <pool> max_bytes ...); then VDIs can be "
                "destroyed to free space" % (
                    self.config.describe(), "; ".join(full)))
        if timed_out:
            raise errors.CephUnreachable(
                "%s did not answer within %d seconds (%s)"
                % (self.config.describe(), self.config.timeout, exc))
        if exc_type is not None and issubclass(exc_type, (rados.PermissionError,
                                                          rbd.PermissionError)):
            raise errors.CephPermissionDenied(
                "client.%s is not allowed to do this on %s (%s)"
                % (self.config.user, self.config.describe(), exc))

    def _full(self):
        """What the monitors say is full (a pool at its quota, full OSDs), where an
        operation timed out: librados holds writes to a full pool until they time
        out, which would otherwise read as a cluster that does not answer."""
        try:
            health = self.mon_command("health", detail="detail")
        except (errors.StorageError, ValueError):
            return []  # the monitors do not answer either: unreachable it is
        checks = (health or {}).get("checks", {})
        found = []
        for name in ("POOL_FULL", "OSD_FULL"):
            check = checks.get(name)
            if check:
                found += [item["message"] for item in check.get("detail", [])] or [
                    check["summary"]["message"]]
        return found

    def open_pool(self, pool, namespace=""):
        """An ioctx on pool/namespace; a clear error if the pool does not exist."""
        import rados
        try:
            ioctx = self.rados.open_ioctx(pool)
        except rados.ObjectNotFound:
            raise errors.CephPoolMissing(
                "pool '%s' does not exist in %s"
                % (pool, self.config.describe()))
        ioctx.set_namespace(namespace)
        return ioctx

    def mon_command(self, prefix, **args):
        """A monitor command returning JSON; a clear error on failure."""
        return self._command(self.rados.mon_command, prefix, args)

    def mgr_command(self, prefix, **args):
        """A manager command (e.g. rbd_support's task queue) returning JSON."""
        return self._command(self.rados.mgr_command, prefix, args)

    def cluster_version(self):
        """The monitors' Ceph version (e.g. "ceph version 16.2.15 (...) pacific
        (stable)"), or why it could not be read."""
        try:
            return self.mon_command("version")["version"]
        except (errors.StorageError, KeyError, TypeError) as exc:
            return "unknown (%s)" % exc

    def _command(self, send, prefix, args):
        import json
        args.update(prefix=prefix, format="json")
        ret, out, err = send(json.dumps(args), b"", timeout=self.config.timeout)
        if ret != 0:
            raise errors.CephCommandFailed(
                "'%s' failed on %s: %s (error %d)"
                % (prefix, self.config.describe(), err or os.strerror(-ret), -ret))
        return json.loads(out.decode("utf-8")) if out else None
