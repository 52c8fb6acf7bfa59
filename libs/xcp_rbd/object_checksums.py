"""Which 64 KiB chunks of RADOS objects hold anything but zeros, asked of the OSDs
(a checksum per chunk) so that no data crosses the network.

What it is for: RBD's diff reports an object that did not exist at the older
snapshot from its start to its end, so a thin disk's first write at the end of a
4 MiB object makes the whole front of the object look changed (up to 64 times
what changed, in changed-block tracking). Where that object was all zeros at the
older snapshot, the chunks that still read as zeros did not change.

No Python binding of librados has the checksum op (`rados_read_op_checksum`,
in librados' C API since Luminous, so in every client we support), so this
module calls the C API through ctypes, on a connection of its own made with the
same settings as cluster.Connection's (the keyring's path, never a key). The
questions go out IN_FLIGHT at a time, as asynchronous read ops.
"""

import ctypes
import ctypes.util
import struct

CHUNK = 64 << 10
# crc32c (Ceph's: seed -1, no final inversion) of CHUNK zero bytes; a test checks it.
ZERO_CHUNK_CRC32C = 2369731419
IN_FLIGHT = 32
_CRC32C = 2  # LIBRADOS_CHECKSUM_TYPE_CRC32C
_SEED = struct.pack("<I", 0xFFFFFFFF)
_NOSNAP = 0xFFFFFFFFFFFFFFFE  # CEPH_NOSNAP: the head
_ENOENT = 2


class ChecksumError(Exception):
    """librados refused or failed a call."""

    def __init__(self, what, code):
        super(ChecksumError, self).__init__("%s failed (error %d)" % (what, -code))


def _library():
    lib = ctypes.CDLL(ctypes.util.find_library("rados") or "librados.so.2")
    pointer = ctypes.c_void_p
    lib.rados_create_read_op.restype = pointer
    lib.rados_release_read_op.argtypes = [pointer]
    lib.rados_read_op_checksum.argtypes = [
        pointer, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64,
        ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int)]
    lib.rados_aio_create_completion.argtypes = [pointer, pointer, pointer,
                                                ctypes.POINTER(pointer)]
    lib.rados_aio_read_op_operate.argtypes = [pointer, pointer, pointer,
                                              ctypes.c_char_p, ctypes.c_int]
    lib.rados_aio_wait_for_complete.argtypes = [pointer]
    lib.rados_aio_get_return_value.argtypes = [pointer]
    lib.rados_aio_release.argtypes = [pointer]
    lib.rados_ioctx_snap_set_read.argtypes = [pointer, ctypes.c_uint64]
    return lib


class ObjectChecksums(object):
    """A librados connection for checksums in one pool and namespace (a context
    manager)."""

    def __init__(self, config, pool, namespace):
        self.config = config
        self.pool = pool
        self.namespace = namespace
        self._lib = _library()
        self._cluster = ctypes.c_void_p()
        self._ioctx = ctypes.c_void_p()

    def __enter__(self):
        lib, config = self._lib, self.config
        self._check("rados_create2", lib.rados_create2(
            ctypes.byref(self._cluster), config.cluster.encode(),
            ("client." + config.user).encode(), ctypes.c_uint64(0)))
        self._check("reading %s" % config.conf, lib.rados_conf_read_file(
            self._cluster, config.conf.encode()))
        for name, value in sorted(config.rados_options().items()):
            self._check("setting %s" % name, lib.rados_conf_set(
                self._cluster, name.encode(), value.encode()))
        self._check("connecting", lib.rados_connect(self._cluster))
        self._check("opening pool %s" % self.pool, lib.rados_ioctx_create(
            self._cluster, self.pool.encode(), ctypes.byref(self._ioctx)))
        lib.rados_ioctx_set_namespace(self._ioctx, self.namespace.encode())
        return self

    def __exit__(self, *exc):
        if self._ioctx:
            self._lib.rados_ioctx_destroy(self._ioctx)
        if self._cluster:
            self._lib.rados_shutdown(self._cluster)

    @staticmethod
    def _check(what, code):
        if code < 0:
            raise ChecksumError(what, code)
        return code

    def zero_chunks(self, objects, snap_id=None):
        """{name: set of the indexes of its whole CHUNKs that read as zeros} for
        `objects`, {name: bytes to ask about} (a multiple of CHUNK, at most the
        object's size), at RBD snapshot id `snap_id`, else at the head. An object
        that does not exist reads as zeros: all its chunks."""
        self._lib.rados_ioctx_snap_set_read(self._ioctx, _NOSNAP if snap_id is None
                                            else snap_id)
        found = {}
        names = sorted(name for name, length in objects.items() if length >= CHUNK)
        for first in range(0, len(names), IN_FLIGHT):
            batch = [self._ask(name, objects[name]) for name in names[first:first + IN_FLIGHT]]
            for asked in batch:
                found[asked[0]] = self._answer(*asked)
        return found

    def _ask(self, name, length):
        lib = self._lib
        count = length // CHUNK
        sums = ctypes.create_string_buffer(4 + 4 * count)
        result = ctypes.c_int()
        op = lib.rados_create_read_op()
        lib.rados_read_op_checksum(op, _CRC32C, _SEED, len(_SEED), 0, count * CHUNK,
                                   CHUNK, sums, len(sums), ctypes.byref(result))
        completion = ctypes.c_void_p()
        lib.rados_aio_create_completion(None, None, None, ctypes.byref(completion))
        self._check("checksums of %s" % name, lib.rados_aio_read_op_operate(
            op, self._ioctx, completion, name.encode(), 0))
        return name, count, sums, result, op, completion

    def _answer(self, name, count, sums, result, op, completion):
        lib = self._lib
        try:
            lib.rados_aio_wait_for_complete(completion)
            code = lib.rados_aio_get_return_value(completion)
        finally:
            lib.rados_aio_release(completion)
            lib.rados_release_read_op(op)
        if code == -_ENOENT:
            return set(range(count))
        self._check("checksums of %s" % name, code)
        self._check("checksums of %s" % name, result.value)
        values = struct.unpack_from("<%dI" % count, sums.raw, 4)
        return {n for n, value in enumerate(values) if value == ZERO_CHUNK_CRC32C}
