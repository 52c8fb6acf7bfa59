"""Where an SR and its volumes live, written as the strings XAPI keeps for us.

- The `sr` string that SR.attach returns and XAPI passes to every later call:
  rbd://<pool>/<namespace>/<sr uuid>?<cluster settings>
- The volume `uri` the datapath plugin receives (its scheme picks the plugin):
  rbd+tapdisk://<pool>/<namespace>/<image>?snap=<snapshot>&<cluster settings>

Both carry everything needed to reach the cluster from any host (paths to the
conf and keyring files, never a key), so no call depends on host state.
"""

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from xcp_rbd import errors
from xcp_rbd.cluster import ClusterConfig

SR_SCHEME = "rbd"
DATAPATH_SCHEME = "rbd+tapdisk"
DATAPATH_BACKENDS = ("rbd-nbd", "qemu")
DEFAULT_DATAPATH = "rbd-nbd"
# Clone chains longer than this are flattened in the background (krbd's hard
# limit is 16 parents; Cinder's default is 5).
DEFAULT_MAX_CHAIN_DEPTH = 5
MAX_CHAIN_DEPTH_LIMIT = 14


def _format(scheme, parts, query):
    path = "/".join(quote(part, safe="") for part in parts)
    text = "%s://%s" % (scheme, path)
    query = {k: v for k, v in query.items() if v}
    return text + ("?" + urlencode(sorted(query.items())) if query else "")


def _parse(scheme, text, count, what):
    split = urlsplit(text)
    parts = ([split.netloc] + split.path.split("/")[1:]) if split.netloc else []
    if split.scheme != scheme or len(parts) != count or not all(
            parts[:1] + parts[2:]):
        raise errors.InvalidParameters(
            "%r is not a %s of this plugin (%s://...)" % (text, what, scheme))
    return [unquote(p) for p in parts], dict(parse_qsl(split.query))


class SrLocation(object):
    """An attached SR: the pool, namespace and uuid, and how to reach the cluster."""

    def __init__(self, pool, namespace, sr_uuid, cluster, datapath=DEFAULT_DATAPATH,
                 max_chain_depth=DEFAULT_MAX_CHAIN_DEPTH):
        self.pool = pool
        self.namespace = namespace
        self.sr_uuid = sr_uuid
        self.cluster = cluster
        self.datapath = datapath
        self.max_chain_depth = max_chain_depth

    def __str__(self):
        query = self.cluster.to_mapping()
        if self.datapath != DEFAULT_DATAPATH:
            query["datapath"] = self.datapath
        if self.max_chain_depth != DEFAULT_MAX_CHAIN_DEPTH:
            query["max_chain_depth"] = str(self.max_chain_depth)
        return _format(SR_SCHEME, [self.pool, self.namespace, self.sr_uuid], query)

    @classmethod
    def parse(cls, text):
        (pool, namespace, sr_uuid), query = _parse(SR_SCHEME, text, 3, "SR")
        return cls.from_mapping(pool, namespace, sr_uuid, query)

    @classmethod
    def from_mapping(cls, pool, namespace, sr_uuid, mapping):
        """From device-config or the sr string's query; a clear error on bad values."""
        datapath = mapping.get("datapath") or DEFAULT_DATAPATH
        if datapath not in DATAPATH_BACKENDS:
            raise errors.InvalidConfiguration(
                "datapath must be one of %s, not %r"
                % (", ".join(DATAPATH_BACKENDS), datapath))
        depth = mapping.get("max_chain_depth") or str(DEFAULT_MAX_CHAIN_DEPTH)
        if not depth.isdigit() or not 1 <= int(depth) <= MAX_CHAIN_DEPTH_LIMIT:
            raise errors.InvalidConfiguration(
                "max_chain_depth must be a whole number from 1 to %d, not %r"
                % (MAX_CHAIN_DEPTH_LIMIT, depth))
        return cls(pool, namespace, sr_uuid, ClusterConfig.from_mapping(mapping),
                   datapath, int(depth))

    def volume_uri(self, image, snap=None, data_destroyed=False):
        query = self.cluster.to_mapping()
        query.update(snap=snap or "", backend=self.datapath,
                     data_destroyed="1" if data_destroyed else "")
        return _format(DATAPATH_SCHEME, [self.pool, self.namespace, image], query)

    def describe(self):
        return "pool '%s'%s" % (self.pool, " namespace '%s'" % self.namespace
                                if self.namespace else "")


class VolumeLocation(object):
    """What the datapath plugin needs to reach one image (parsed from its uri)."""

    def __init__(self, pool, namespace, image, snap, backend, cluster, data_destroyed=False):
        self.pool = pool
        self.namespace = namespace
        self.image = image
        self.snap = snap
        self.backend = backend
        self.cluster = cluster
        # Volume.data_destroy kept only the volume's CBT metadata: nothing to attach.
        self.data_destroyed = data_destroyed

    @classmethod
    def parse(cls, uri):
        (pool, namespace, image), query = _parse(DATAPATH_SCHEME, uri, 3, "volume uri")
        backend = query.get("backend", DEFAULT_DATAPATH)
        if backend not in DATAPATH_BACKENDS:
            raise errors.InvalidParameters(
                "unknown datapath backend %r in %r (one of %s)"
                % (backend, uri, ", ".join(DATAPATH_BACKENDS)))
        return cls(pool, namespace, image, query.get("snap") or None, backend,
                   ClusterConfig.from_mapping(query), query.get("data_destroyed") == "1")

    @property
    def export(self):
        """The name of the volume's NBD exports: image[@snap] (no ':', which xapi's
        parser of nbd: uris splits on)."""
        return self.image + ("@" + self.snap if self.snap else "")

    @property
    def spec(self):
        """pool/[namespace/]image[@snap], as the rbd CLI and rbd-nbd spell it."""
        spec = "/".join(p for p in (self.pool, self.namespace, self.image) if p)
        return spec + ("@" + self.snap if self.snap else "")
