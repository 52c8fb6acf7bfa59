"""Several domains on one volume on one host, in xapi's real orders (xapi-flows
sections 3.3, 4.2, 5): a localhost migration's two domains, one read-only dom0
domain per client of xapi's NBD server, the VMs of a sharable disk, a storage
migration's MIR... datapath. The volume stays open while one domain is active.

Each flow runs on both backends (backend_sr), the data checked through the
export each gives (qemu's, or tapdisk's under the stand-ins); what rbd-nbd
maps is checked too."""

import itertools

import pytest

from hosts import FakeHost, nbd_client

MiB = 1 << 20


def pattern(seed, size):
    return bytes((seed * 31 + n) % 251 for n in range(size))


def write(backend, data, offset):
    with nbd_client(backend) as client:
        client.pwrite(data, offset)
        if client.can_flush():  # tapdisk's server has no flush: its writes are done
            client.flush()


def read(backend, length, offset):
    with nbd_client(backend) as client:
        return client.pread(length, offset)


def only_attachment(host):
    [attachment] = host.attachments()
    return attachment


@pytest.mark.parametrize("early_attach", [False, True], ids=["legacy", "split+early"])
def test_localhost_migration_keeps_the_disk_of_the_running_vm(xapi, backend_sr, host_a,
                                                              early_attach):
    vdi = xapi.vdi_create(backend_sr, "32M")
    old = host_a.plug(backend_sr, vdi["key"], domain="7")
    before = pattern(1, MiB)
    write(old, before, 0)
    after = pattern(2, MiB)

    def running(new):   # the VM writes on its new domain before the old one detaches
        write(new, after, 8 * MiB)

    new = host_a.run("vm_migrate_localhost", backend_sr, vdi["key"], "7", "8",
                     early_attach=early_attach, running=running)
    assert read(new, MiB, 0) == before and read(new, MiB, 8 * MiB) == after
    state = only_attachment(host_a)
    assert state["domains"] == ["8"] and state["active"] == {"8": "rw"}
    host_a.unplug(backend_sr, vdi["key"], domain="8")
    assert host_a.attachments() == []
    xapi.vdi_destroy(backend_sr, vdi["key"])


def test_nbd_readers_of_a_snapshot_end_in_every_order(xapi, backend_sr, host_a, image_io):
    vdi = xapi.vdi_create(backend_sr, "16M")
    data = pattern(3, MiB)
    image_io.write(vdi, 4 * MiB, data)
    snapshot = xapi.vdi_snapshot(backend_sr, vdi["key"], xapi_keys=False)
    for order in itertools.permutations(range(3)):
        readers = [host_a.run("nbd_connect", backend_sr, snapshot["key"], "xvd%s" % "bcd"[n])
                   for n in range(3)]
        assert only_attachment(host_a)["active"] == {
            domain: "ro" for domain, _ in readers}
        for left, n in enumerate(order):
            domain, _ = readers[n]
            host_a.run("nbd_disconnect", backend_sr, snapshot["key"], domain)
            for other in order[left + 1:]:   # the others still read the snapshot
                assert read(readers[other][1], MiB, 4 * MiB) == data
        assert host_a.attachments() == []
    xapi.vdi_destroy(backend_sr, snapshot["key"])
    xapi.vdi_destroy(backend_sr, vdi["key"])


def test_sharable_disk_serves_two_vms_until_the_last_goes(xapi, backend_sr, host_a):
    vdi = xapi.vdi_create(backend_sr, "16M", sharable=True)
    first = host_a.plug(backend_sr, vdi["key"], domain="7")
    second = host_a.plug(backend_sr, vdi["key"], domain="9")
    write(first, pattern(4, MiB), 0)
    host_a.unplug(backend_sr, vdi["key"], domain="7")
    write(second, pattern(5, MiB), MiB)
    assert read(second, MiB, 0) == pattern(4, MiB)
    assert read(second, MiB, MiB) == pattern(5, MiB)
    host_a.unplug(backend_sr, vdi["key"], domain="9")
    assert host_a.attachments() == []
    xapi.vdi_destroy(backend_sr, vdi["key"])


def test_a_read_only_reader_never_opens_a_disk_for_writing(xapi, backend_sr, host_a):
    """activate_readonly takes no activation lock and gives a read-only export; a
    writer comes in only once the readers are gone."""
    vdi = xapi.vdi_create(backend_sr, "16M")
    domain, backend = host_a.run("nbd_connect", backend_sr, vdi["key"], "xvdb")
    state = only_attachment(host_a)
    assert state["read_only"] and "claimed" not in state
    with nbd_client(backend) as client:
        assert client.is_read_only()
    with pytest.raises(Exception) as refused:
        host_a.plug(backend_sr, vdi["key"], domain="7")
    assert refused.value.params[0] == "Volume_active_read_only"
    host_a.run("nbd_disconnect", backend_sr, vdi["key"], domain)
    host_a.unplug(backend_sr, vdi["key"], domain="7")   # the refused VM's teardown
    write(host_a.plug(backend_sr, vdi["key"], domain="7"), b"w" * 512, 0)
    host_a.unplug(backend_sr, vdi["key"], domain="7")
    assert host_a.attachments() == []
    xapi.vdi_destroy(backend_sr, vdi["key"])


@pytest.mark.parametrize("early_attach", [False, True], ids=["legacy", "split+early"])
def test_rbd_nbd_device_follows_the_domains(xapi, sr_uuid, host_a, fake_host,
                                            early_attach):
    """The default backend: one device for the volume, mapped while a domain is
    active, through a localhost migration and NBD readers; gone with the last."""
    vdi = xapi.vdi_create(sr_uuid, "16M")
    host_a.plug(sr_uuid, vdi["key"], domain="7")
    [device] = fake_host.connected()
    reader, _ = host_a.run("nbd_connect", sr_uuid, vdi["key"], "xvdb")  # shares it
    assert list(fake_host.connected()) == [device]
    host_a.run("vm_migrate_localhost", sr_uuid, vdi["key"], "7", "8",
               early_attach=early_attach)
    assert len(fake_host.connected()) == 1
    state = only_attachment(host_a)
    assert sorted(state["domains"]) == ["8", reader]
    assert state["active"] == {"8": "rw", reader: "ro"}
    host_a.unplug(sr_uuid, vdi["key"], domain="8")
    assert len(fake_host.connected()) == 1   # the reader still reads
    host_a.run("nbd_disconnect", sr_uuid, vdi["key"], reader)
    assert fake_host.connected() == {} and host_a.attachments() == []
    xapi.vdi_destroy(sr_uuid, vdi["key"])


def test_storage_migration_destination_datapath_ends_after_the_vm_attaches(
        xapi, sr_uuid, host_a, fake_host):
    """Into an rbd SR: the MIR... datapath writes the disk, the VM's new domain
    attaches early, then the MIR datapath is destroyed, then the VM activates."""
    vdi = xapi.vdi_create(sr_uuid, "16M")
    host_a.plug(sr_uuid, vdi["key"], domain="MIR1a2b3c")
    uri = xapi.volume("Volume.stat", sr=xapi.sr(sr_uuid), key=vdi["key"])["uri"][0]
    host_a.datapath("Datapath.attach", uri, "12")
    host_a.run("nbd_disconnect", sr_uuid, vdi["key"], "MIR1a2b3c")   # DP.destroy
    assert fake_host.connected() == {}
    assert only_attachment(host_a)["domains"] == ["12"]
    host_a.datapath("Datapath.activate", uri, "12")
    assert len(fake_host.connected()) == 1
    host_a.unplug(sr_uuid, vdi["key"], domain="12")
    assert host_a.attachments() == []
    xapi.vdi_destroy(sr_uuid, vdi["key"])


def test_running_out_of_nbd_devices_is_refused_before_anything_is_set_up(
        xapi, sr_uuid, host_a, tmp_path, monkeypatch):
    """A host whose nbd module made 2 devices: the third disk's activate says what
    to change, and takes neither the activation lock nor a device."""
    small = FakeHost(str(tmp_path / "two-devices"), nbd_devices=2)
    for key, value in small.environ().items():
        monkeypatch.setenv(key, value)
    disks = [xapi.vdi_create(sr_uuid, "16M") for _ in range(3)]
    try:
        for disk in disks[:2]:
            host_a.plug(sr_uuid, disk["key"], domain="7")
        with pytest.raises(Exception) as refused:
            host_a.plug(sr_uuid, disks[2]["key"], domain="7")
        assert refused.value.params[0] == "No_nbd_device"
        assert "nbds_max=128" in refused.value.params[1]
        assert "/etc/modprobe.d/nbd.conf" in refused.value.params[1]
        third, = [a for a in host_a.attachments() if disks[2]["key"] in a["volume"]]
        assert "claimed" not in third and "opened" not in third
        assert len(small.connected()) == 2
        host_a.unplug(sr_uuid, disks[0]["key"], domain="7")   # a device is free again
        host_a.plug(sr_uuid, disks[2]["key"], domain="7")
    finally:
        for disk in disks:
            host_a.unplug(sr_uuid, disk["key"], domain="7")
        small.close()
    assert host_a.attachments() == []
