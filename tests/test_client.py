"""What an XCP-ng 8.3 host has: whichever Ceph client it runs (this suite runs on
Pacific's bindings and, in scripts/old-client, on Nautilus'), a missing package,
and the diagnostics that say why something does not work there."""

import json
import os
import re
import subprocess
import sys

import rados

from xcp_rbd.location import SrLocation
from xcp_rbd.metadata import Omap, index_object


def test_diagnostics_report_this_host_and_write_nothing(xapi, sr_uuid, sr, cluster,
                                                        image_io, tmp_path, monkeypatch):
    smapiv1 = tmp_path / "sm"
    smapiv1.mkdir()
    (smapiv1 / "RBDSR.py").write_text("# an old SMAPIv1 driver of SR type rbd\n")
    (smapiv1 / "LVMSR.py").write_text("")
    monkeypatch.setenv("XCP_RBD_SMAPIV1_DIR", str(smapiv1))

    report = json.loads(xapi.volume("Plugin.diagnostics"))
    client = report["client"]
    assert client["python"] == subprocess.check_output(
        ["/usr/bin/python3", "-c", "import platform; print(platform.python_version())"]
    ).decode().strip()
    assert rados.__file__ in client["rados_binding"]
    assert "librados.so" in client["librados"] and "librbd.so" in client["librbd"]
    assert ("rados.WriteOp.omap_cmp" in client["lacks"]) == (
        not hasattr(rados.WriteOp, "omap_cmp"))
    assert report["sr_type_clash"] == [str(smapiv1 / "RBDSR.py")]
    mine, = [s for s in report["srs"] if s["sr_uuid"] == sr_uuid]
    assert mine["cluster_version"].startswith("ceph version 16.")  # the test cluster

    # An SR whose index is gone is reported as such, and not made again.
    where = SrLocation.parse(sr)
    ioctx = image_io.handle.open_ioctx(where.pool)
    ioctx.set_namespace(where.namespace)
    index = Omap(ioctx, index_object(sr_uuid))
    saved = index.read()
    try:
        ioctx.remove_object(index_object(sr_uuid))
        mine, = [s for s in json.loads(xapi.volume("Plugin.diagnostics"))["srs"]
                 if s["sr_uuid"] == sr_uuid]
        assert "SR_does_not_exist" in mine["error"]
        try:
            ioctx.stat(index_object(sr_uuid))
            recreated = True
        except rados.ObjectNotFound:
            recreated = False
        assert not recreated
    finally:
        index.write(saved)  # for the SR's teardown
        ioctx.close()


def test_a_missing_ceph_binding_is_named_with_its_package(plugin_root):
    """A host without the Ceph bindings (here: an interpreter that does not see its
    site packages) gets the package to install, in the protocol's shape."""
    script = os.path.join(plugin_root, "volume", "org.xen.xapi.storage.rbd", "SR.ls")
    process = subprocess.Popen(["/usr/bin/python3", "-S", script, "--json"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    out, _ = process.communicate(b'{"dbg": "t", "sr": "rbd://x"}\n')
    error = json.loads(out.decode())
    assert process.returncode == 1
    assert error["code"] == "SR_BACKEND_FAILURE"
    assert error["params"][0] == "Missing_dependency"
    binding = re.search(r"install .* python3-(rados|rbd) .* python36-(rados|rbd) ",
                        error["params"][1])
    assert binding and binding.group(1) == binding.group(2), error["params"][1]


def test_eight_processes_on_one_index_bucket_lose_no_update(cluster, tmp_path):
    """Eight scripts at once (as XAPI runs them, from several hosts), each adding and
    then updating volumes whose fields all share one bucket of one SR's index."""
    program = r'''
import sys
sys.path.insert(0, sys.argv[1])
import rados
from xcp_rbd.metadata import SrIndex
conf, keyring, pool, sr_uuid, keys = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
handle = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
handle.connect()
index = SrIndex(handle.open_ioctx(pool), sr_uuid)
for key in keys:
    index.write({"v." + key: "{}", "k.%s.vdi-type" % key: "user"})
    index.update("v." + key, lambda record: dict(record, updated=True))
handle.shutdown()
'''
    from xcp_rbd.metadata import SrIndex, bucket_of, new_key
    libs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libs")
    handle = rados.Rados(conffile=cluster.conf, rados_id="admin",
                         conf={"keyring": cluster.admin_keyring})
    handle.connect()
    sr_uuid = new_key()
    index = SrIndex(handle.open_ioctx(cluster.pool), sr_uuid)
    index.create({"sr": "{}"})
    bucket = bucket_of("v.x")
    keys = [k for k in (new_key() for _ in range(20000)) if bucket_of(k) == bucket][:40]
    try:
        workers = [subprocess.Popen([sys.executable, "-c", program, libs, cluster.conf,
                                     cluster.admin_keyring, cluster.pool, sr_uuid]
                                    + keys[n::8]) for n in range(8)]
        assert [worker.wait() for worker in workers] == [0] * 8
        entries = index.read()
        assert {f for f in entries if f.startswith("v.")} == {"v." + k for k in keys}
        assert all(entries["v." + k] == '{"updated":true}' for k in keys)
        assert len([f for f in entries if f.startswith("k.")]) == 40
    finally:
        index.remove()
        handle.shutdown()
