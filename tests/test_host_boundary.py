"""The host boundary (xcp_rbd.datapath.host): the tap-ctl, nbd-client and rbd-nbd
steps that need Xen or kernel NBD, which this machine has not.

With stand-ins for those three tools (hosts.FakeHost), the tests check the
commands each datapath step runs, in order, and the state the datapath keeps;
everything behind the boundary is real (cluster, scripts, locks).
"""

import json
import os

import pytest

from conftest import new_uuid
from hosts import alive, nbd_server, until


def _since(host, mark):
    return host.commands()[mark:]


def _scoped(command, role):
    """The command inside `systemd-run --scope` (a data process), and its unit."""
    assert command[:3] == ["systemd-run", "--scope", "--slice=vm.slice"]
    unit = command[3].split("=", 1)[1]
    assert unit.startswith("xcp-rbd-%s-" % role)
    return command[command.index("--") + 1:], unit


def test_rbd_nbd_lifecycle_runs_these_commands(xapi, sr_uuid, fake_host, cluster):
    """The default backend through the installed scripts: the host commands of each
    step, the state kept between calls, and none of it left after detach."""
    vdi = xapi.vdi_create(sr_uuid, "16M")
    uri = vdi["uri"][0]
    assert "backend=rbd-nbd" in uri
    mark = len(fake_host.commands())
    backend = xapi.datapath("Datapath.attach", uri=uri, domain="7")
    scoped_spawn, spawn, allocate, attach = _since(fake_host, mark)  # attach maps nothing
    assert _scoped(scoped_spawn, "tapdisk")[0] == spawn == ["tap-ctl", "spawn"]
    assert allocate == ["tap-ctl", "allocate"]
    pid = attach[attach.index("-p") + 1]
    minor = attach[attach.index("-m") + 1]
    tapdev = "/dev/xen/blktap-2/tapdev%s" % minor
    assert attach == ["tap-ctl", "attach", "-m", minor, "-p", pid]
    assert fake_host.tapdisks() == [int(pid)]
    socket_path = os.path.join(fake_host.blktap_control, "nbd%s.%s" % (pid, minor))
    assert backend == {"implementations": [
        ["XenDisk", {"backend_type": "vbd3", "params": tapdev, "extra": {}}],
        ["BlockDevice", {"path": tapdev}],
        ["Nbd", {"uri": "nbd:unix:%s:exportname=%s" % (socket_path, vdi["key"])}]]}

    mark = len(fake_host.commands())
    xapi.datapath("Datapath.activate", uri=uri, domain="7")
    scoped_map, rbd_map, tap_open = _since(fake_host, mark)
    assert _scoped(scoped_map, "rbd-nbd")[0] == rbd_map
    spec = "%s/%s/%s" % (cluster.pool, xapi._state()["device_config"][sr_uuid]["namespace"],
                         vdi["key"])
    assert rbd_map[:4] == ["rbd-nbd", "map", "--timeout", "120"] and rbd_map[-1] == spec
    options = dict(zip(rbd_map[4:-1:2], rbd_map[5:-1:2]))
    assert options["--id"] == cluster.user and options["-c"] == cluster.conf
    assert options["--keyring"] == cluster.keyring and options["--rbd_cache"] == "false"
    [device] = fake_host.connected()
    assert tap_open == ["tap-ctl", "open", "-m", minor, "-p", pid, "-a", "aio:" + device]

    # idempotent, and the state survives between the calls
    mark = len(fake_host.commands())
    xapi.datapath("Datapath.activate", uri=uri, domain="7")
    assert _since(fake_host, mark) == []
    [state_dir] = os.listdir(os.path.join(os.environ["XCP_RBD_RUN_DIR"], "datapath"))
    with open(os.path.join(os.environ["XCP_RBD_RUN_DIR"], "datapath", state_dir,
                           "attachment.json")) as stream:
        kept = json.load(stream)
    assert kept["device"] == device and kept["tapdisk"]["path"] == tapdev
    assert kept["rbd_nbd"]["pid"] == fake_host.connected()[device]
    assert kept["claimed"] and len(kept["clients"]) == 1  # the rbd-nbd daemon's client

    mark = len(fake_host.commands())
    xapi.datapath("Datapath.deactivate", uri=uri, domain="7")
    assert _since(fake_host, mark) == [["tap-ctl", "close", "-m", minor, "-p", pid],
                                       ["rbd-nbd", "unmap", device]]
    assert not alive(kept["rbd_nbd"]["pid"])  # unmap returns first: the datapath waits
    mark = len(fake_host.commands())
    xapi.datapath("Datapath.deactivate", uri=uri, domain="7")
    xapi.datapath("Datapath.detach", uri=uri, domain="7")
    assert _since(fake_host, mark) == [["tap-ctl", "destroy", "-m", minor, "-p", pid]]
    assert fake_host.connected() == {}
    assert until("tapdisk to exit", lambda: fake_host.tapdisks() == [])
    assert os.listdir(os.path.join(os.environ["XCP_RBD_RUN_DIR"], "datapath")) == []
    xapi.vdi_destroy(sr_uuid, vdi["key"])


def test_rbd_nbd_second_host_is_refused(xapi, sr_uuid, fake_host, tmp_path):
    """The activation lock with rbd-nbd's client: refused while mapped on host A."""
    vdi = xapi.vdi_create(sr_uuid, "16M")
    uri = vdi["uri"][0]
    host_a = os.environ["XCP_RBD_HOST_UUID"]
    xapi.datapath("Datapath.attach", uri=uri, domain="3")
    xapi.datapath("Datapath.activate", uri=uri, domain="3")
    saved = os.environ["XCP_RBD_RUN_DIR"], host_a
    os.environ["XCP_RBD_RUN_DIR"], os.environ["XCP_RBD_HOST_UUID"] = str(tmp_path), new_uuid()
    try:
        xapi.datapath("Datapath.attach", uri=uri, domain="9")
        with pytest.raises(Exception) as refused:
            xapi.datapath("Datapath.activate", uri=uri, domain="9")
        assert refused.value.params[:2] == ["Activated_on_another_host", host_a]
        xapi.datapath("Datapath.detach", uri=uri, domain="9")
    finally:
        os.environ["XCP_RBD_RUN_DIR"], os.environ["XCP_RBD_HOST_UUID"] = saved
    xapi.datapath("Datapath.deactivate", uri=uri, domain="3")
    xapi.datapath("Datapath.detach", uri=uri, domain="3")
    assert fake_host.connected() == {}


def test_tapdisk_create_frees_what_it_got_when_attach_fails(fake_host, install, tmp_path):
    """A tap-ctl attach that fails leaves no minor allocated (host.tapdisk_create)."""
    from xcp_rbd import errors
    from xcp_rbd.datapath import host
    failing = tmp_path / "bin"
    failing.mkdir()
    (failing / "tap-ctl").write_text(
        "#!/bin/sh\necho \"$*\" >> %s/calls\ncase $1 in spawn) echo 123456789;; "
        "allocate) echo /dev/xen/blktap-2/tapdev5;; attach) exit 1;; esac\n" % tmp_path)
    (failing / "tap-ctl").chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = str(failing) + os.pathsep + path
    try:
        with pytest.raises(errors.StorageError):
            host.tapdisk_create("0123456789abcdef")
    finally:
        os.environ["PATH"] = path
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["spawn", "allocate", "attach -m 5 -p 123456789", "free -m 5"]


def test_nbd_connect_takes_the_first_free_device(fake_host, install, tmp_path):
    from xcp_rbd.datapath import host
    with nbd_server(str(fake_host.run + "/a.sock")) as a, \
            nbd_server(str(fake_host.run + "/b.sock")) as b:
        first = host.nbd_connect(a, "a")
        second = host.nbd_connect(b, "b")
        assert (first, second) == ("/dev/nbd0", "/dev/nbd1")
        assert fake_host.commands()[-1] == [
            "nbd-client", "-unix", b, "/dev/nbd1", "-name", "b", "-block-size", "512",
            "-timeout", "120"]
        host.nbd_disconnect(first)
        assert host.nbd_connect(a, "c") == "/dev/nbd0"
        host.nbd_disconnect("/dev/nbd0")
        host.nbd_disconnect(second)
    assert fake_host.connected() == {}


def test_host_command_failure_is_clear(fake_host, install):
    from xcp_rbd import errors
    from xcp_rbd.datapath import host
    with pytest.raises(errors.StorageError) as failed:
        host.tapdisk_close({"pid": 999999, "minor": 0})
    assert failed.value.params[0] == "Host_command_failed"
    assert "tap-ctl close -m 0 -p 999999 failed" in failed.value.params[1]
    assert "couldn't connect to tapdisk 999999" in failed.value.params[1]
