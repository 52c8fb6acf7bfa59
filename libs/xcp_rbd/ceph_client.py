"""What the installed Ceph client can do: the one module that knows how client
versions differ.

The client floor is Nautilus 14.2 (what an XCP-ng 8.3 dom0 can install: the CentOS
Storage SIG's Nautilus, or Octopus 15.2.17; Pacific and later have no EL7 packages).
Every other module asks for an operation here and never for a version: each
difference is detected on the installed modules (`hasattr`), never from a version
number, and where a binding lacks a call this module does the same with what every
supported binding has, with the same guarantee.

| what                         | newer bindings              | Nautilus / Octopus          |
|------------------------------|-----------------------------|-----------------------------|
| compare-and-set on an omap   | `WriteOp.omap_cmp` on each  | `WriteOp.assert_version`:   |
|                              | key read (16.2.11 and up)   | the object is unchanged     |
|                              |                             | since the read              |
| a snapshot's id              | `Image.snap_get_id`         | `Image.list_snaps`          |
| blocklisting a client        | `Rados.blocklist_add`       | `Rados.blacklist_add`       |
| object-map diff from offset  | extents as asked            | Nautilus' librbd shifts the |
| > 0 (`whole_object=True`)    |                             | extents by the offset: asked|
|                              |                             | from 0, clipped here        |

Compare-and-set by object version is coarser than by value (any write to the
object, a cls_lock taken on it included, makes a concurrent update retry), never
weaker: an update is applied only to the state it was computed from. The version
comes from `Ioctx.get_last_version`, which is the last operation's on that ioctx in
any thread, so within a process every guarded read and write and every lock call
of `metadata` holds `serialised()`; a process with other threads of its own
operating on the same ioctx meanwhile must give the index an ioctx of its own.
"""

import errno
import sys
import threading

import rados
import rbd

_HAS_OMAP_CMP = hasattr(rados.WriteOp, "omap_cmp")
# omap_cmp fails with ECANCELED; assert_version with ERANGE (the object is newer)
# or EOVERFLOW (older: it was removed and made again).
_CONFLICT_ERRNOS = (errno.ECANCELED, errno.ERANGE, errno.EOVERFLOW)
_ioctx_operations = threading.RLock()

# Calls newer bindings have that this project can do without, for diagnostics.
_OPTIONAL = (
    ("rados.WriteOp.omap_cmp", rados.WriteOp, "omap_cmp",
     "omap compare-and-set by value (index updates compare the object's version instead)"),
    ("rados.Rados.blocklist_add", rados.Rados, "blocklist_add",
     "blocklist_add (blacklist_add is used)"),
    ("rbd.Image.snap_get_id", rbd.Image, "snap_get_id",
     "snapshot ids by name (read from the snapshot list instead)"),
)


class OmapGuard(object):
    """What a guarded write must still find on its object: the omap values read
    (absent ones as "") or, where the binding has no omap_cmp, the object version
    at the read. An object that did not exist at the read is not written."""

    def __init__(self, name, values, version):
        self.name = name
        self.values = values
        self.version = version

    def apply(self, op):
        if self.version is None:
            raise rados.ObjectNotFound("%s did not exist when it was read" % self.name)
        if _HAS_OMAP_CMP:
            for key, value in self.values.items():
                op.omap_cmp(key, value, rados.LIBRADOS_CMPXATTR_OP_EQ)
        else:
            op.assert_version(self.version)


def serialised():
    """Held around every operation whose version a guard may read (see above)."""
    return _ioctx_operations


def read_guarded(ioctx, name, op, keys, values):
    """Run read op `op` on object `name`; `values()` gives what it read as
    {key: text}. Returns (those values, the OmapGuard of `keys` for a later write).
    An object that does not exist reads as {}, with a guard that refuses to write."""
    with _ioctx_operations:
        try:
            ioctx.operate_read_op(op, name)
        except rados.ObjectNotFound:
            return {}, OmapGuard(name, {}, None)
        version = ioctx.get_last_version()
    read = values()
    return read, OmapGuard(name, {key: read.get(key, "") for key in keys}, version)


def operate_guarded(ioctx, name, op):
    """Run write op `op`; True if it applied, False if a guard in it failed
    (someone changed the object meanwhile)."""
    with _ioctx_operations:
        try:
            ioctx.operate_write_op(op, name)
        except rados.Error as exc:  # ObjectNotFound (ENOENT) goes on to the caller
            if getattr(exc, "errno", None) in _CONFLICT_ERRNOS:
                return False
            raise
    return True


def snap_id(image, name):
    """The id of snapshot `name` of an open image (rbd.ImageNotFound if none)."""
    if hasattr(image, "snap_get_id"):
        return image.snap_get_id(name)
    for snap in image.list_snaps():
        if snap["name"] == name:
            return snap["id"]
    raise rbd.ImageNotFound("no snapshot %s" % name)


def object_diff(image, offset, length, from_snap, callback):
    """callback(offset, length, exists) for each object-map extent that changed since
    from_snap in [offset, offset + length) (whole objects, clipped to the range).

    Always asked from byte 0 (what a range costs is the object map's walk, in
    memory): Nautilus' librbd reports a whole-object diff that starts past 0 at
    offsets shifted by that start (14.2.21 reports the object at 320 KiB at 640 KiB
    when asked from 320 KiB), with no attribute to detect it by."""
    end = offset + length

    def clipped(extent_offset, extent_length, exists):
        first, last = max(offset, extent_offset), min(end, extent_offset + extent_length)
        if first < last:
            callback(first, last - first, exists)
    image.diff_iterate(0, end, from_snap, clipped, whole_object=True)


def blocklist(handle, address):
    """Blocklist a client address (renamed from blacklist in Pacific)."""
    add = getattr(handle, "blocklist_add", None) or handle.blacklist_add
    add(address)


def report():
    """The client side, for Plugin.diagnostics: Python, the bindings and the
    packages they come from, and the calls newer bindings have that this one lacks."""
    return {
        "python": sys.version.split()[0],
        "rados_binding": _origin(rados.__file__),
        "rbd_binding": _origin(rbd.__file__),
        "librados": _origin(_loaded("librados.so")),
        "librbd": _origin(_loaded("librbd.so")),
        "librbd_api": "%d.%d.%d" % rbd.RBD().version(),
        "lacks": {name: what for name, owner, attribute, what in _OPTIONAL
                  if not hasattr(owner, attribute)},
    }


def _loaded(library):
    """The path of the shared library this process loaded under that name."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/" + library in path:
                    return path
    except IOError:
        pass
    return library + " (not found in this process)"


def _origin(path):
    """`path (package version)`, from the host's package manager when it knows."""
    import subprocess  # only diagnostics pay for it
    for query in (["rpm", "-qf", "--qf", "%{NAME} %{VERSION}-%{RELEASE}", path],
                  ["dpkg-query", "-S", path]):
        try:
            out = subprocess.check_output(query, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError):
            continue
        package = out.decode("utf-8", "replace").strip().split(":")[0]
        if query[0] == "dpkg-query":
            try:
                package += " " + subprocess.check_output(
                    ["dpkg-query", "-W", "-f", "${Version}", package],
                    stderr=subprocess.DEVNULL).decode("utf-8", "replace")
            except (OSError, subprocess.CalledProcessError):
                pass
        return "%s (%s)" % (path, package)
    return path
