"""The SR index on a real cluster: listings past the OSDs' per-reply cap."""

import rados

from xcp_rbd.metadata import Index, new_key


def test_read_returns_every_entry_past_the_reply_cap(cluster):
    handle = rados.Rados(conffile=cluster.conf, rados_id="admin",
                         conf={"keyring": cluster.admin_keyring})
    handle.connect()
    ioctx = handle.open_ioctx(cluster.pool)
    try:
        index = Index(ioctx, "xcp_rbd.test-index")
        expected = {"sr": "{}", "gc.stats": "{}"}
        for n in range(2500):   # spread over the slices
            key = new_key()
            expected["v." + key] = str(n)
            expected["k.%s.vdi-type" % key] = "user"
        for n in range(1500):   # and 1 500 in a single slice, past a reply's 1 024
            expected["u.0%07d" % n] = str(n)
        items = sorted(expected.items())
        for first in range(0, len(items), 500):
            index.write(dict(items[first:first + 500]))
        assert index.read() == expected
        assert index.read(prefix="u.") == {k: v for k, v in expected.items()
                                           if k.startswith("u.")}
        assert index.read(prefix="v.") == {k: v for k, v in expected.items()
                                           if k.startswith("v.")}
    finally:
        Index(ioctx, "xcp_rbd.test-index").remove()
        ioctx.close()
        handle.shutdown()
