"""Fixtures: a real one-node Ceph cluster, the plugins installed with CMake, the
XAPI-playing tool driving the installed scripts, and simulated hosts (hosts.py)
for the datapath; for the unit layer (tests/test_units_*.py), an in-memory
cluster instead (fake_rados.py).

Run with /usr/bin/python3 or a venv made from it (Debian's rados and rbd bindings
are built for it).
"""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
# Tests use the library from the source tree; the plugin scripts under test run
# from the installed tree (see `install`).
sys.path.insert(0, os.path.join(ROOT, "libs"))

from ceph_cluster import LocalCluster  # noqa: E402
from install_tree import install as install_tree  # noqa: E402
from hosts import FakeHost, simulated_host  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also the tests marked long (scripts/test --long)")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: too long for CI; run by scripts/test --long")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long: scripts/test --long runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The test cluster: started here, or the one XCP_RBD_TEST_CLUSTER names (the
    old-client run: scripts/old-client starts it outside the root)."""
    started_elsewhere = os.environ.get("XCP_RBD_TEST_CLUSTER")
    if started_elsewhere:
        yield LocalCluster.attach(started_elsewhere)
        return
    with LocalCluster(str(tmp_path_factory.mktemp("ceph"))) as running:
        yield running


@pytest.fixture
def fake_cluster(monkeypatch):
    """The unit layer's cluster (fake_rados.py), on the test's clock; compare-and-set
    by this binding's path."""
    import fake_rados  # rados: only tests that use it pay for it
    return fake_rados.install(monkeypatch)


@pytest.fixture(params=["omap_cmp", "assert_version"])
def cas_cluster(request, monkeypatch):
    """fake_cluster, once on each compare-and-set path of ceph_client: by omap
    value (newer bindings) and by object version (Nautilus, Octopus)."""
    import fake_rados
    return fake_rados.install(monkeypatch, omap_cmp=request.param == "omap_cmp")


@pytest.fixture(scope="module")
def fragile_cluster(tmp_path_factory):
    """A cluster of the module's own, for tests that freeze and stop its daemons
    (with a standby manager, for failovers): the shared one stays as it was."""
    with LocalCluster(str(tmp_path_factory.mktemp("fragile")), managers=2) as running:
        yield running


@pytest.fixture(scope="session")
def install(tmp_path_factory):
    """The project installed with cmake + make install into a fresh prefix, its
    scripts run by /usr/bin/python3 as on a dom0: with what the system and our own
    tree give it, not what the test runner's environment has."""
    prefix = str(tmp_path_factory.mktemp("prefix"))
    install_tree(prefix, python="/usr/bin/python3")
    return prefix


@pytest.fixture(scope="session")
def plugin_root(install):
    return os.path.join(install, "libexec", "xapi-storage-script")


@pytest.fixture(autouse=True, scope="session")
def run_dir(tmp_path_factory):
    """Host state of the plugins (normally under /var/run/nonpersistent)."""
    path = str(tmp_path_factory.mktemp("run"))
    os.environ["XCP_RBD_RUN_DIR"] = path
    return path


@pytest.fixture
def xapi(plugin_root, tmp_path):
    from xcp_rbd.xapi import Xapi
    return Xapi(plugin_root, str(tmp_path / "xapi-state.json"))


@pytest.fixture
def device_config(cluster):
    """device-config for an SR as the least-privilege user client.xcp."""
    return {"pool": cluster.pool, "conf": cluster.conf, "user": cluster.user,
            "keyring": cluster.keyring}


@pytest.fixture
def sr_uuid(xapi, device_config):
    """A fresh SR, destroyed after the test (if the test did not)."""
    sr_uuid = xapi.sr_create(device_config, name="test SR", description="pytest")
    yield sr_uuid
    if sr_uuid in xapi._state()["device_config"]:
        xapi.sr_destroy(sr_uuid)


@pytest.fixture
def sr(xapi, sr_uuid):
    """The attached `sr` string."""
    return xapi.sr(sr_uuid)


def run_script(plugin_root, command, stdin, kind="volume",
               plugin="org.xen.xapi.storage.rbd", args=("--json",)):
    """Run a plugin script with raw stdin; return (exit status, parsed stdout, stderr)."""
    script = os.path.join(plugin_root, kind, plugin, command)
    process = subprocess.Popen([script] + list(args), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(stdin.encode("utf-8"))
    return process.returncode, json.loads(out.decode("utf-8")), err.decode("utf-8")


def new_uuid():
    return str(uuid.uuid4())


class ImageIO(object):
    """Reads and writes a volume's data straight through librbd (as the admin),
    to check what the plugin's operations did to the bytes."""

    def __init__(self, cluster):
        import rados
        self.handle = rados.Rados(conffile=cluster.conf, rados_id="admin",
                                  conf={"keyring": cluster.admin_keyring})
        self.handle.connect()

    def _image(self, volume):
        import rbd
        from xcp_rbd.location import VolumeLocation
        where = VolumeLocation.parse(volume["uri"][0])
        ioctx = self.handle.open_ioctx(where.pool)
        ioctx.set_namespace(where.namespace)
        return ioctx, rbd.Image(ioctx, where.image, snapshot=where.snap,
                                read_only=where.snap is not None)

    def write(self, volume, offset, data):
        ioctx, image = self._image(volume)
        try:
            image.write(data, offset)
            image.flush()
        finally:
            image.close()
            ioctx.close()

    def read(self, volume, offset, length):
        return self.read_at(volume, [offset], length)[0]

    def read_at(self, volume, offsets, length):
        """`length` bytes at each offset, the volume opened once."""
        ioctx, image = self._image(volume)
        try:
            return [image.read(offset, length) for offset in offsets]
        finally:
            image.close()
            ioctx.close()

    def close(self):
        self.handle.shutdown()


@pytest.fixture(scope="session")
def image_io(cluster, install):
    io = ImageIO(cluster)
    yield io
    io.close()


@pytest.fixture
def fake_host(tmp_path):
    """The host boundary's stand-ins on PATH, fresh for each test (see hosts.FakeHost):
    a test that simulates a vanished host leaves its devices connected."""
    host = FakeHost(str(tmp_path / "fakehost"))
    saved = {key: os.environ.get(key) for key in host.environ()}
    os.environ.update(host.environ())
    os.environ.setdefault("XCP_RBD_HOST_UUID", new_uuid())
    yield host
    host.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def host_a(xapi, fake_host):
    """A simulated host; host_b is another one, on the same cluster."""
    with simulated_host(xapi) as host:
        yield host


@pytest.fixture
def host_b(xapi, fake_host):
    with simulated_host(xapi) as host:
        yield host


@pytest.fixture
def short_watch_timeout(cluster):
    """Ceph drops the watch of a dead client after 10 s instead of 30 (still above
    the 5 s at which live clients ping their watches)."""
    cluster.ceph("config", "set", "osd", "osd_client_watch_timeout", "10")
    yield 10
    cluster.ceph("config", "rm", "osd", "osd_client_watch_timeout")


@pytest.fixture
def qemu_sr(xapi, device_config):
    """A fresh SR whose datapath is the qemu backend (skipped where no qemu opens
    RBD images, as on XCP-ng 8.3 and in the old-client root)."""
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("no qemu-storage-daemon here")
    sr_uuid = xapi.sr_create(dict(device_config, datapath="qemu"), name="qemu SR")
    yield sr_uuid
    xapi.sr_destroy(sr_uuid)


@pytest.fixture(params=["rbd-nbd", "qemu"])
def backend_sr(request, sr_uuid):
    """An SR of each datapath backend (qemu: skipped where no qemu opens RBD)."""
    return sr_uuid if request.param == "rbd-nbd" else request.getfixturevalue("qemu_sr")
