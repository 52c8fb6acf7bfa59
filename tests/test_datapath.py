"""The rbd+tapdisk datapath with the qemu backend, end to end: the installed
scripts as XAPI runs them, a real cluster, real qemu-storage-daemon, and a
real NBD client (libnbd) on the export. Only tap-ctl and nbd-client are
stand-ins (FakeHost: no Xen and no kernel NBD here).

Two hosts are two identities (XCP_RBD_HOST_UUID) with two state directories
(XCP_RBD_RUN_DIR) driving the same cluster.
"""

import json
import os
import random
import re
import signal
import threading

import nbd
import pytest

from hosts import alive, blocklist, kill, nbd_client, until

MiB = 1 << 20
BLOCK = 64 * 1024


def pattern(seed, size):
    return random.Random(seed).randbytes(size)


def refusal(host, command, uri, domain, logged=None):
    """The params of the error that `command` fails with (and what it logged
    appended to the list `logged`, if given)."""
    try:
        host.datapath(command, uri, domain)
    except Exception as exc:  # xcp_rbd.xapi.PluginError
        if logged is not None:
            logged.append(exc.stderr)
        return exc.params
    raise AssertionError("%s was not refused" % command)


def test_install_has_one_link_per_command(plugin_root, xapi):
    from xcp_rbd.datapath_plugin import COMMANDS
    directory = os.path.join(plugin_root, "datapath", "rbd+tapdisk")
    links = {name for name in os.listdir(directory)
             if os.path.islink(os.path.join(directory, name))}
    assert links == set(COMMANDS) == {
        "Plugin.Query", "Plugin.diagnostics", "Datapath.attach", "Datapath.activate",
        "Datapath.activate_readonly",
        "Datapath.deactivate", "Datapath.detach", "Data.mirror", "Data.stat"}
    query = xapi.datapath("Plugin.Query")
    assert query["plugin"] == "rbd+tapdisk" and query["required_api_version"] == "5.0"
    assert "NONPERSISTENT" not in query["features"]


def test_pattern_survives_shutdown_and_restart(xapi, qemu_sr, host_a,
                                               fake_host, image_io):
    """VM start, writes through the export, VM shutdown (deactivate twice, detach),
    VM start again: the pattern reads back, and nothing is left in between."""
    vdi = xapi.vdi_create(qemu_sr, "64M")
    backend = host_a.plug(qemu_sr, vdi["key"], domain="7")
    kinds = [impl[0] for impl in backend["implementations"]]
    assert kinds == ["XenDisk", "BlockDevice", "Nbd"]
    xendisk = backend["implementations"][0][1]
    assert xendisk["backend_type"] == "vbd3"
    assert xendisk["params"] == backend["implementations"][1][1]["path"]
    data = pattern(1, 3 * MiB)
    with nbd_client(backend) as client:
        assert client.get_size() == 64 * MiB
        client.pwrite(data, 5 * MiB)
        client.flush()
    qemu_pid = host_a.qemu_pid()
    tap_open = [c for c in fake_host.commands() if c[:2] == ["tap-ctl", "open"]][-1]
    assert tap_open[-1] in ["aio:" + device for device in fake_host.connected()]

    host_a.unplug(qemu_sr, vdi["key"], domain="7")  # deactivate twice, detach
    assert not alive(qemu_pid)
    assert host_a.attachments() == []
    assert os.listdir(os.path.join(host_a.run_dir, "datapath")) == []
    assert fake_host.connected() == {}
    assert image_io.read(vdi, 5 * MiB, len(data)) == data  # it reached the cluster

    backend = host_a.plug(qemu_sr, vdi["key"], domain="12")
    with nbd_client(backend) as client:
        assert client.pread(len(data), 5 * MiB) == data
        assert client.pread(MiB, 0) == bytes(MiB)
    host_a.unplug(qemu_sr, vdi["key"], domain="12")
    xapi.vdi_destroy(qemu_sr, vdi["key"])


def test_clone_of_snapshot_reads_what_was_written_before_it(xapi, qemu_sr, host_a):
    vdi = xapi.vdi_create(qemu_sr, "32M")
    backend = host_a.plug(qemu_sr, vdi["key"])
    before, after = pattern(2, MiB), pattern(3, MiB)
    with nbd_client(backend) as client:
        client.pwrite(before, 0)
        client.flush()
        snapshot = xapi.vdi_snapshot(qemu_sr, vdi["key"])  # while the disk is active
        client.pwrite(after, 0)
        client.flush()
    clone = xapi.vdi_clone(qemu_sr, snapshot["key"])
    clone_backend = host_a.plug(qemu_sr, clone["key"], domain="8")
    snapshot_backend = host_a.plug(qemu_sr, snapshot["key"], domain="9")  # read-only
    with nbd_client(clone_backend) as client:
        assert client.pread(MiB, 0) == before
    with nbd_client(snapshot_backend) as client:
        assert client.is_read_only()
        assert client.pread(MiB, 0) == before
    with nbd_client(backend) as client:
        assert client.pread(MiB, 0) == after
    for key, domain in ((snapshot["key"], "9"), (clone["key"], "8"), (vdi["key"], "7")):
        host_a.unplug(qemu_sr, key, domain)
    assert host_a.attachments() == []


def test_second_host_activates_only_after_the_first_deactivates(
        xapi, qemu_sr, host_a, host_b, cluster):
    vdi = xapi.vdi_create(qemu_sr, "32M")
    backend_a = host_a.plug(qemu_sr, vdi["key"])
    with nbd_client(backend_a) as client:
        client.pwrite(pattern(4, MiB), 0)
        client.flush()
    uri = vdi["uri"][0]

    # live migration: the destination attaches early, which opens nothing
    with host_b.current():
        backend_b = xapi.datapath("Datapath.attach", uri=uri, domain="3")
    logged = []
    refused = refusal(host_b, "Datapath.activate", uri, "3", logged)
    # exactly this: the shape on which xapi-storage-script redirects to host A
    assert refused == ["Activated_on_another_host", host_a.uuid]
    assert "deactivate it there first" in logged[0]
    with nbd_client(backend_a) as client:  # host A was not disturbed
        client.pwrite(pattern(5, MiB), MiB)
        client.flush()

    [state_a] = host_a.attachments()
    host_a.datapath("Datapath.deactivate", uri, "7")  # downtime: source deactivates,
    host_b.datapath("Datapath.activate", uri, "3")    # then the destination activates
    with nbd_client(backend_b) as client:
        assert client.pread(2 * MiB, 0) == pattern(4, MiB) + pattern(5, MiB)
    refused = refusal(host_a, "Datapath.activate", uri, "7")
    assert refused[:2] == ["Activated_on_another_host", host_b.uuid]
    host_a.datapath("Datapath.deactivate", uri, "7")  # DP.destroy on the source
    host_a.datapath("Datapath.detach", uri, "7")
    host_b.unplug(qemu_sr, vdi["key"], domain="3")
    assert host_a.attachments() == host_b.attachments() == []
    assert state_a["clients"] and not any(  # a clean handover fences nobody
        address in blocklist(cluster) for address in state_a["clients"])


def test_killed_qemu_is_recovered_on_its_host(xapi, qemu_sr, host_a, host_b, cluster,
                                              short_watch_timeout):
    vdi = xapi.vdi_create(qemu_sr, "32M")
    backend = host_a.plug(qemu_sr, vdi["key"])
    with nbd_client(backend) as client:
        client.pwrite(pattern(6, MiB), 0)
        client.flush()
    [state] = host_a.attachments()
    kill(state["qemu_pid"])
    until("qemu to die", lambda: not alive(state["qemu_pid"]))
    uri = vdi["uri"][0]
    # Host B cannot tell a dead qemu from a live one while Ceph keeps its watch.
    host_b.datapath("Datapath.attach", uri, "3")
    refused = refusal(host_b, "Datapath.activate", uri, "3")
    assert refused[:2] == ["Activated_on_another_host", host_a.uuid]
    host_b.datapath("Datapath.detach", uri, "3")

    # Host A knows: shutdown works and fences the dead client, start works again.
    host_a.unplug(qemu_sr, vdi["key"])
    assert host_a.attachments() == []
    for client_address in state["clients"]:
        assert client_address in blocklist(cluster)
    backend = host_a.plug(qemu_sr, vdi["key"])
    with nbd_client(backend) as client:
        assert client.pread(MiB, 0) == pattern(6, MiB)
    host_a.unplug(qemu_sr, vdi["key"])


def test_vanished_host_is_fenced_before_another_takes_over(
        xapi, qemu_sr, host_a, host_b, cluster, short_watch_timeout):
    """Host A hangs (its qemu stops, its state is lost): host B is refused while
    Ceph still sees A's client, then takes over after blocklisting it; when A
    wakes up, it cannot write any more."""
    vdi = xapi.vdi_create(qemu_sr, "32M")
    backend_a = host_a.plug(qemu_sr, vdi["key"])
    uri = vdi["uri"][0]
    [state] = host_a.attachments()
    with nbd_client(backend_a) as zombie:
        zombie.pwrite(pattern(7, MiB), 0)
        zombie.flush()
        os.kill(state["qemu_pid"], signal.SIGSTOP)
        try:
            backend_b = host_b.datapath("Datapath.attach", uri, "4")
            assert refusal(host_b, "Datapath.activate", uri, "4")[1] == host_a.uuid

            def take_over():
                try:
                    host_b.datapath("Datapath.activate", uri, "4")
                    return True
                except Exception as exc:  # xcp_rbd.xapi.PluginError
                    assert exc.params[:2] == ["Activated_on_another_host", host_a.uuid]
                    return False
            until("host A's watch to expire", take_over)
            for client_address in state["clients"]:
                assert client_address in blocklist(cluster)
            with nbd_client(backend_b) as client:
                assert client.pread(MiB, 0) == pattern(7, MiB)
                client.pwrite(pattern(8, MiB), 0)
                client.flush()
        finally:
            os.kill(state["qemu_pid"], signal.SIGCONT)
        with pytest.raises(nbd.Error):
            zombie.pwrite(pattern(9, MiB), 0)
            zombie.flush()
    kill(state["qemu_pid"])
    with nbd_client(backend_b) as client:
        assert client.pread(MiB, 0) == pattern(8, MiB)
    host_b.unplug(qemu_sr, vdi["key"], domain="4")


def test_osd_restart_during_writes_loses_no_acknowledged_write(xapi, qemu_sr, host_a,
                                                               cluster, image_io):
    vdi = xapi.vdi_create(qemu_sr, "16M")
    backend = host_a.plug(qemu_sr, vdi["key"])
    blocks = 16 * MiB // BLOCK
    last = {}  # offset -> seed of the last write acknowledged there
    written = [0]
    failures = []
    stop = threading.Event()

    def write():
        try:
            with nbd_client(backend) as client:
                while not stop.is_set():
                    seed = written[0]
                    client.pwrite(pattern(seed, BLOCK), seed % blocks * BLOCK)
                    last[seed % blocks * BLOCK] = seed
                    written[0] += 1
        except Exception as exc:  # reported by the main thread
            failures.append(exc)
    writer = threading.Thread(target=write)
    writer.start()
    try:
        until("the first writes", lambda: written[0] >= 32)
        cluster.stop_osd()
        stopped = written[0]
        cluster.start_osd()
        until("writes after the restart", lambda: failures or written[0] > stopped + 32)
    finally:
        stop.set()
        writer.join(300)
    assert failures == [] and written[0] > blocks  # every block written at least once
    host_a.unplug(qemu_sr, vdi["key"])
    for offset, seed in last.items():
        assert image_io.read(vdi, offset, BLOCK) == pattern(seed, BLOCK), (offset, seed)


def test_keys_stay_in_the_keyring(xapi, qemu_sr, host_a, fake_host, cluster):
    with open(cluster.keyring) as stream:
        key = re.search(r"key\s*=\s*(\S+)", stream.read()).group(1).encode()
    vdi = xapi.vdi_create(qemu_sr, "16M")
    host_a.plug(qemu_sr, vdi["key"])
    pid = host_a.qemu_pid()
    for name in ("cmdline", "environ"):
        with open("/proc/%d/%s" % (pid, name), "rb") as stream:
            assert key not in stream.read()
    state_dirs = os.path.join(host_a.run_dir, "datapath")
    for directory, _, files in os.walk(state_dirs):
        if directory != state_dirs:
            assert os.stat(directory).st_mode & 0o077 == 0
        for name in files:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                assert os.stat(path).st_mode & 0o077 == 0, path
                with open(path, "rb") as stream:
                    assert key not in stream.read(), path
    assert key.decode() not in json.dumps(fake_host.commands())
    host_a.unplug(qemu_sr, vdi["key"])


def test_detach_of_an_active_volume_leaves_nothing(xapi, qemu_sr, host_a, host_b):
    """Detach never fails: even straight after activate, it flushes, releases the
    activation and ends qemu."""
    vdi = xapi.vdi_create(qemu_sr, "16M")
    backend = host_a.plug(qemu_sr, vdi["key"])
    with nbd_client(backend) as client:
        client.pwrite(pattern(10, MiB), 0)
    pid = host_a.qemu_pid()
    host_a.datapath("Datapath.detach", vdi["uri"][0], "7")
    host_a.datapath("Datapath.detach", vdi["uri"][0], "7")
    assert not alive(pid) and host_a.attachments() == []
    backend = host_b.plug(qemu_sr, vdi["key"], domain="2")
    with nbd_client(backend) as client:
        assert client.pread(MiB, 0) == pattern(10, MiB)
    host_b.unplug(qemu_sr, vdi["key"], domain="2")


def test_data_destroyed_volume_is_refused(xapi, qemu_sr, host_a):
    from xcp_rbd.location import VolumeLocation
    sr_uuid = qemu_sr
    sr = xapi.sr(sr_uuid)
    disk = xapi.vdi_create(sr_uuid, "8M")
    xapi.volume("Volume.enable_cbt", sr=sr, key=disk["key"])
    old = xapi.vdi_snapshot(sr_uuid, disk["key"])
    xapi.vdi_snapshot(sr_uuid, disk["key"])
    xapi.volume("Volume.data_destroy", sr=sr, key=old["key"])
    uri = xapi.volume("Volume.stat", sr=sr, key=old["key"])["uri"][0]
    assert VolumeLocation.parse(uri).data_destroyed
    for command in ("Datapath.attach", "Datapath.activate"):
        with pytest.raises(Exception) as refused:
            xapi.datapath(command, uri=uri, domain="7")
        assert refused.value.params[0] == "Volume_data_destroyed"
    xapi.datapath("Datapath.detach", uri=uri, domain="7")  # teardown never refuses


def test_second_attachment_for_dom0_leaves_the_vm_disk_alone(xapi, qemu_sr, host_a):
    """Storage migration attaches the running VM's disk again for dom0 (u0_...) and,
    after a failed migration, destroys that datapath while the VM runs on."""
    vdi = xapi.vdi_create(qemu_sr, "16M")
    backend = host_a.plug(qemu_sr, vdi["key"], domain="7")
    uri = xapi.volume("Volume.stat", sr=xapi.sr(qemu_sr), key=vdi["key"])["uri"][0]
    host_a.datapath("Datapath.attach", uri, "u0_mirror_dp")
    host_a.datapath("Datapath.deactivate", uri, "u0_mirror_dp")
    host_a.datapath("Datapath.detach", uri, "u0_mirror_dp")
    data = pattern(7, MiB)
    with nbd_client(backend) as client:   # the VM's disk still works
        client.pwrite(data, 0)
        client.flush()
        assert client.pread(len(data), 0) == data
    host_a.unplug(qemu_sr, vdi["key"], domain="7")
    assert host_a.attachments() == []
    xapi.vdi_destroy(qemu_sr, vdi["key"])
