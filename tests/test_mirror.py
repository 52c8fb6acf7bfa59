"""Storage migration out of an SR of either backend (Data.mirror, Data.stat, and
the end of the mirror at Datapath.deactivate), through the installed scripts: a
real cluster, real NBD targets (a second SR's export on another host, a plain
qemu-nbd) while a guest writes through the source export with libnbd, and the
bytes compared at the end. On the qemu backend qemu-storage-daemon's mirror job
copies; on rbd-nbd, the tapdisk stand-in's mirror mode and our relay (the
target then is also an rbd-nbd SR's export: tapdisk's NBD server).

The calls follow XAPI's sequence (smapiv3-spec 6.9): the destination creates,
attaches and activates its volume (domain MIR...), the source attaches again for
dom0 (u0_...), Data.mirror, Data.stat polled until complete, the VM paused
(the writer stops), Datapath.deactivate on the source, then the destination's
DP.destroy and the source's detach.
"""

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from hosts import blocklist, kill, nbd_client, nbd_export, until

MiB = 1 << 20
SIZE = 64 * MiB
VM = "7"
MIRROR_VM = "MIR1a2b3c"
DOM0 = "u0_3f2a_mirror"


@pytest.fixture
def second_rbd_nbd_sr(xapi, device_config):
    sr_uuid = xapi.sr_create(dict(device_config), name="destination SR")
    yield sr_uuid
    xapi.sr_destroy(sr_uuid)


@pytest.fixture
def second_qemu_sr(xapi, device_config):
    """The destination SR: same cluster, an RBD namespace of its own."""
    sr_uuid = xapi.sr_create(dict(device_config, datapath="qemu"), name="destination SR")
    yield sr_uuid
    xapi.sr_destroy(sr_uuid)


def call(xapi, host, command, **params):
    with host.current():
        return xapi.datapath(command, **params)


def refusal_of(xapi, host, command, **params):
    """The params of the error that `command` fails with."""
    try:
        call(xapi, host, command, **params)
    except Exception as exc:  # xcp_rbd.xapi.PluginError
        return exc.params
    raise AssertionError("%s was not refused" % command)


def data_stat(xapi, host, operation):
    return call(xapi, host, "Data.stat", operation=operation)


def wait_for(xapi, host, operation, what):
    """Data.stat, polled as XAPI does, until `what` ("complete" or "failed") is
    true; the statuses seen."""
    seen = []

    def check():
        seen.append(data_stat(xapi, host, operation))
        assert what == "failed" or not seen[-1]["failed"], seen
        return seen[-1][what]
    until("the mirror to be " + what, check)
    return seen


class Guest(object):
    """Writes of random sizes (512 B to 256 KiB, mostly not aligned to the mirror's
    granularity) at random offsets through the source export, in a thread; `model`
    holds what every acknowledged write left."""

    def __init__(self, backend, content):
        self.backend = backend
        self.model = bytearray(content)
        self.count = 0
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        chooser = random.Random(self.count)
        try:
            with nbd_client(self.backend) as client:
                while not self._stop.is_set():
                    length = chooser.randrange(1, 513) * 512
                    offset = chooser.randrange((len(self.model) - length) // 512 + 1) * 512
                    data = chooser.randbytes(length)
                    client.pwrite(data, offset)
                    self.model[offset:offset + length] = data
                    self.count += 1
        except Exception as exc:  # reported by the test
            self.failures.append(exc)

    def start(self):
        self._thread.start()
        until("the guest's first writes", lambda: self.failures or self.count >= 20)

    def write_more(self, count):
        mark = self.count
        until("%d more writes" % count, lambda: self.failures or self.count >= mark + count)

    def pause(self):
        """The VM is paused: no write in flight any more."""
        self._stop.set()
        self._thread.join(60)
        assert self.failures == []


def disk_content(backend):
    """Data in two extents and a hole between them (which the mirror copies as zeroes)."""
    content = bytearray(SIZE)
    content[:24 * MiB] = random.Random(1).randbytes(24 * MiB)
    content[40 * MiB:] = random.Random(2).randbytes(24 * MiB)
    with nbd_client(backend) as client:
        client.pwrite(bytes(content[:24 * MiB]), 0)
        client.pwrite(bytes(content[40 * MiB:]), 40 * MiB)
        if client.can_flush():  # tapdisk's server has no flush: its writes are done
            client.flush()
    return content


class Target(object):
    """qemu-nbd serving a raw file on a unix socket: a plain NBD target."""

    def __init__(self, directory, size):
        self.image = os.path.join(directory, "target.raw")
        self.socket = os.path.join(directory, "nbd.sock")
        self.remote = "nbd+unix:///target?socket=" + self.socket
        with open(self.image, "wb") as stream:
            stream.truncate(size)
        self.process = subprocess.Popen(
            ["qemu-nbd", "--format=raw", "--persistent", "--export-name=target",
             "--socket=" + self.socket, self.image], stdin=subprocess.DEVNULL)
        until("qemu-nbd to listen", lambda: os.path.exists(self.socket), bound=10)

    def content(self):
        with open(self.image, "rb") as stream:
            return stream.read()


@contextlib.contextmanager
def qemu_nbd_target(size=SIZE):
    # Not under tmp_path: socket paths must stay under 108 bytes.
    directory = tempfile.mkdtemp(prefix="xcp-rbd-target-")
    target = Target(directory, size)
    try:
        yield target
    finally:
        target.process.kill()
        target.process.wait()
        shutil.rmtree(directory)


class StallingProxy(object):
    """A unix socket in front of an NBD server that forwards the first `limit`
    bytes its client sends and then reads nothing more, the connection left open:
    a target that hangs mid-copy, as a destination host that dies behind xapi's
    proxy does."""

    def __init__(self, upstream, limit):
        self.path = upstream + ".stall"
        self.remote = "nbd+unix:///target?socket=" + self.path
        self._upstream = upstream
        self._limit = limit
        self._sockets = [socket.socket(socket.AF_UNIX)]
        self._sockets[0].bind(self.path)
        self._sockets[0].listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self._sockets[0].accept()
        server = socket.socket(socket.AF_UNIX)
        server.connect(self._upstream)
        self._sockets += [client, server]
        threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()
        self._pump(client, server, self._limit)

    @staticmethod
    def _pump(source, destination, limit):
        forwarded = 0
        while limit is None or forwarded < limit:
            chunk = source.recv(1 << 16)
            if not chunk:
                return
            destination.sendall(chunk)
            forwarded += len(chunk)

    def close(self):
        for sock in self._sockets:
            sock.close()


def mirror_while_writing(xapi, host, uri, guest, remote):
    """Data.mirror while the guest writes, Data.stat until complete, more writes,
    the VM paused, Datapath.deactivate; returns the operation."""
    operation = call(xapi, host, "Data.mirror", uri=uri, domain=VM, remote=remote)
    assert operation[0] == "MirrorV1"
    seen = wait_for(xapi, host, operation, "complete")
    assert all(0.0 <= status["progress"] <= 1.0 for status in seen if "progress" in status)
    guest.write_more(100)  # each one acknowledged once on the target too
    guest.pause()
    call(xapi, host, "Datapath.deactivate", uri=uri, domain=VM)
    # the last word stays readable after deactivate
    assert data_stat(xapi, host, operation) == {"failed": False, "complete": True,
                                                "progress": 1.0}
    return operation


def detach_source(xapi, host, uri, operation):
    """DP.destroy of the dom0 datapath and of the VM's: nothing left, and the
    operation names nothing any more."""
    for domain in (DOM0, VM):
        call(xapi, host, "Datapath.deactivate", uri=uri, domain=domain)
        call(xapi, host, "Datapath.detach", uri=uri, domain=domain)
    assert host.attachments() == []
    assert os.listdir(os.path.join(host.run_dir, "mirror")) == []
    refused = refusal_of(xapi, host, "Data.stat", operation=operation)
    assert refused[0] == "Unknown_operation"


def mirror_to_a_second_srs_export(xapi, source_sr, destination_sr, host_a, host_b,
                                  image_io):
    """The destination is another SR's volume on another host, attached and
    activated as XAPI does on a migration's destination: its Nbd export takes the
    mirror's writes, and in the end holds every byte the guest wrote."""
    source = xapi.vdi_create(source_sr, SIZE)
    uri = source["uri"][0]
    backend = host_a.plug(source_sr, source["key"], domain=VM)
    content = disk_content(backend)
    destination = xapi.vdi_create(destination_sr, SIZE)
    destination_backend = host_b.plug(destination_sr, destination["key"], domain=MIRROR_VM)
    with nbd_client(destination_backend) as client:
        assert not client.is_read_only() and client.get_size() == SIZE
    socket_path, export = nbd_export(destination_backend)
    call(xapi, host_a, "Datapath.attach", uri=uri, domain=DOM0)  # not activated

    guest = Guest(backend, content)
    guest.start()
    operation = mirror_while_writing(xapi, host_a, uri, guest,
                                     "nbd+unix:///%s?socket=%s" % (export, socket_path))
    host_b.unplug(destination_sr, destination["key"], domain=MIRROR_VM)
    assert image_io.read(source, 0, SIZE) == guest.model
    assert image_io.read(destination, 0, SIZE) == guest.model
    detach_source(xapi, host_a, uri, operation)


def test_mirror_to_a_second_srs_export(xapi, qemu_sr, second_qemu_sr, host_a, host_b,
                                       image_io):
    mirror_to_a_second_srs_export(xapi, qemu_sr, second_qemu_sr, host_a, host_b, image_io)


def test_mirror_out_of_an_rbd_nbd_sr_into_another(xapi, sr_uuid, second_rbd_nbd_sr, host_a,
                                                  host_b, image_io):
    """tapdisk's mirror mode through our relay, into tapdisk's export on the
    destination (the Nbd export of an rbd-nbd SR, written by a migration source)."""
    mirror_to_a_second_srs_export(xapi, sr_uuid, second_rbd_nbd_sr, host_a, host_b,
                                  image_io)


def test_rbd_nbd_mirror_whose_target_dies_fails_not_the_guest(
        xapi, sr_uuid, second_rbd_nbd_sr, host_a, host_b, image_io):
    source = xapi.vdi_create(sr_uuid, SIZE)
    uri = source["uri"][0]
    backend = host_a.plug(sr_uuid, source["key"], domain=VM)
    guest = Guest(backend, disk_content(backend))
    destination = xapi.vdi_create(second_rbd_nbd_sr, SIZE)
    socket_path, export = nbd_export(host_b.plug(second_rbd_nbd_sr, destination["key"],
                                                 domain=MIRROR_VM))
    guest.start()
    operation = call(xapi, host_a, "Data.mirror", uri=uri, domain=VM,
                     remote="nbd+unix:///%s?socket=%s" % (export, socket_path))
    wait_for(xapi, host_a, operation, "complete")
    [target] = host_b.attachments()
    kill(target["tapdisk"]["pid"])
    guest.write_more(50)
    wait_for(xapi, host_a, operation, "failed")
    guest.pause()  # no write failed
    call(xapi, host_a, "Datapath.deactivate", uri=uri, domain=VM)  # XAPI was told
    assert data_stat(xapi, host_a, operation) == {"failed": True, "complete": False}
    assert image_io.read(source, 0, SIZE) == guest.model
    call(xapi, host_a, "Datapath.detach", uri=uri, domain=VM)
    host_b.unplug(second_rbd_nbd_sr, destination["key"], domain=MIRROR_VM)
    assert host_a.attachments() == host_b.attachments() == []


def test_mirror_to_a_plain_qemu_nbd(xapi, backend_sr, host_a, image_io):
    """qemu-nbd serves only the export it names: on rbd-nbd the relay asks for it,
    where tapdisk itself would ask for "tapdisk_client"."""
    if not shutil.which("qemu-nbd"):
        pytest.skip("no qemu-nbd here")
    source = xapi.vdi_create(backend_sr, SIZE)
    uri = source["uri"][0]
    backend = host_a.plug(backend_sr, source["key"], domain=VM)
    guest = Guest(backend, disk_content(backend))
    call(xapi, host_a, "Datapath.attach", uri=uri, domain=DOM0)
    with qemu_nbd_target() as target:
        guest.start()
        operation = mirror_while_writing(xapi, host_a, uri, guest, target.remote)
        assert target.content() == guest.model
    assert image_io.read(source, 0, SIZE) == guest.model
    detach_source(xapi, host_a, uri, operation)


def mirror_then_lose_target(xapi, qemu_sr, host_a, after_loss):
    """A guest writing, its disk mirrored in sync to a qemu-nbd target that is then
    killed; after_loss(operation, guest) runs before the target is cleaned up.
    Returns (source volume, uri, guest, operation)."""
    source = xapi.vdi_create(qemu_sr, SIZE)
    uri = source["uri"][0]
    backend = host_a.plug(qemu_sr, source["key"], domain=VM)
    guest = Guest(backend, disk_content(backend))
    with qemu_nbd_target() as target:
        guest.start()
        operation = call(xapi, host_a, "Data.mirror", uri=uri, domain=VM,
                         remote=target.remote)
        wait_for(xapi, host_a, operation, "complete")
        target.process.kill()
        after_loss(operation, guest)
    return source, uri, guest, operation


def test_target_that_disappears_fails_the_mirror_not_the_guest(
        xapi, qemu_sr, host_a, image_io):
    source, uri, guest, operation = mirror_then_lose_target(
        xapi, qemu_sr, host_a, lambda operation, guest: (
            wait_for(xapi, host_a, operation, "failed"), guest.write_more(50)))
    guest.pause()  # no write failed
    assert data_stat(xapi, host_a, operation) == {"failed": True, "complete": False}
    # XAPI was told: deactivate just ends what is left of the mirror
    call(xapi, host_a, "Datapath.deactivate", uri=uri, domain=VM)
    assert data_stat(xapi, host_a, operation)["failed"]
    assert image_io.read(source, 0, SIZE) == guest.model
    detach_source(xapi, host_a, uri, operation)


def test_deactivate_fails_when_a_mirror_in_sync_fails_at_the_end(
        xapi, qemu_sr, host_a, host_b, image_io):
    """XAPI was told "complete", then the target died before the downtime: deactivate
    closes the source all the same, but fails once, so that the migration does not
    go on with a target that misses writes."""
    source, uri, guest, operation = mirror_then_lose_target(
        xapi, qemu_sr, host_a, lambda operation, guest: guest.write_more(10))
    guest.pause()
    refused = refusal_of(xapi, host_a, "Datapath.deactivate", uri=uri, domain=VM)
    assert refused[0] == "Mirror_failed" and "misses writes" in refused[1]
    [state] = host_a.attachments()
    assert not {"opened", "claimed", "tapdisk_open"} & set(state)  # the source is closed
    call(xapi, host_a, "Datapath.deactivate", uri=uri, domain=VM)  # told once
    assert data_stat(xapi, host_a, operation) == {"failed": True, "complete": False}
    host_b.plug(qemu_sr, source["key"], domain="3")  # released: another host may activate
    host_b.unplug(qemu_sr, source["key"], domain="3")
    assert image_io.read(source, 0, SIZE) == guest.model
    detach_source(xapi, host_a, uri, operation)


def test_hung_target_cannot_hang_deactivate(xapi, qemu_sr, host_a, cluster,
                                            image_io):
    """The target stops reading mid-copy (the mirror is not in sync): deactivate
    stops the mirror, gives up on the target after END_TIMEOUT, ends qemu (its
    client is fenced) and closes the source; the mirror reports failed."""
    from xcp_rbd.datapath import mirror
    source = xapi.vdi_create(qemu_sr, SIZE)
    uri = source["uri"][0]
    backend = host_a.plug(qemu_sr, source["key"], domain=VM)
    content = disk_content(backend)
    with qemu_nbd_target() as target:
        proxy = StallingProxy(target.socket, 4 * MiB)
        try:
            operation = call(xapi, host_a, "Data.mirror", uri=uri, domain=VM,
                             remote=proxy.remote)
            status = data_stat(xapi, host_a, operation)
            assert not status["complete"] and not status["failed"]
            [state] = host_a.attachments()
            started = time.time()
            call(xapi, host_a, "Datapath.deactivate", uri=uri, domain=VM)
            assert mirror.END_TIMEOUT <= time.time() - started < mirror.END_TIMEOUT + 20
        finally:
            proxy.close()
    assert data_stat(xapi, host_a, operation) == {"failed": True, "complete": False}
    for address in state["clients"]:
        assert address in blocklist(cluster)
    assert image_io.read(source, 0, SIZE) == content
    call(xapi, host_a, "Datapath.detach", uri=uri, domain=VM)
    assert host_a.attachments() == []


def test_refusals(xapi, qemu_sr, host_a):
    """A volume must be active; a clear error for a bad remote and for an
    operation that is not (or no longer) a mirror."""
    vdi = xapi.vdi_create(qemu_sr, "16M")
    uri = vdi["uri"][0]
    call(xapi, host_a, "Datapath.attach", uri=uri, domain=VM)
    refused = refusal_of(xapi, host_a, "Data.mirror", uri=uri, domain=VM,
                         remote="nbd+unix:///target?socket=/run/x.sock")
    assert refused[0] == "Not_active"
    call(xapi, host_a, "Datapath.activate", uri=uri, domain=VM)
    for remote in ("nbd:unix:/run/x.sock:exportname=target", "nbd+unix:///target",
                   "nbd://host/target"):
        refused = refusal_of(xapi, host_a, "Data.mirror", uri=uri, domain=VM, remote=remote)
        assert refused[0] == "Invalid_parameters" and remote in refused[1]
    with qemu_nbd_target(8 * MiB) as target:
        refused = refusal_of(xapi, host_a, "Data.mirror", uri=uri, domain=VM,
                             remote=target.remote)
        assert refused[0] == "Mirror_target_size" and "8388608" in refused[1]
    for operation in (["MirrorV1", "0" * 32], ["MirrorV1", "../attachment.json"],
                      ["CopyV1", "0" * 32]):
        assert refusal_of(xapi, host_a, "Data.stat", operation=operation)[0] == \
            "Unknown_operation"
    host_a.unplug(qemu_sr, vdi["key"], domain=VM)
    assert host_a.attachments() == []


def test_rbd_nbd_mirror_to_a_target_of_another_size_is_refused(
        xapi, sr_uuid, second_rbd_nbd_sr, host_a, host_b):
    source = xapi.vdi_create(sr_uuid, "16M")
    host_a.plug(sr_uuid, source["key"], domain=VM)
    destination = xapi.vdi_create(second_rbd_nbd_sr, "8M")
    socket_path, export = nbd_export(host_b.plug(second_rbd_nbd_sr, destination["key"],
                                                 domain=MIRROR_VM))
    refused = refusal_of(xapi, host_a, "Data.mirror", uri=source["uri"][0], domain=VM,
                         remote="nbd+unix:///%s?socket=%s" % (export, socket_path))
    assert refused[0] == "Mirror_target_size" and "8388608" in refused[1]
    host_a.unplug(sr_uuid, source["key"], domain=VM)
    host_b.unplug(second_rbd_nbd_sr, destination["key"], domain=MIRROR_VM)
    assert host_a.attachments() == host_b.attachments() == []
