"""rbd-nbd (Octopus' rbd-nbd.cc): `map [options] <spec>` opens the image in a
daemon of its own and connects a free /dev/nbdN to it, printing the device;
`unmap <device>` asks the daemon to disconnect and returns without waiting
for it to close the image; `list-mapped` lists devices with their daemon.

Options: rbd-nbd's own (--read-only, --exclusive, --timeout <s>, --device,
--nbds_max, --max_part, --try-netlink), -c <conf>, --id <user>, --cluster,
and any Ceph option (--keyring, --mon_host, --rbd_cache, ...), given to
librados as the real one does. The daemon serves the image over NBD (flags
SEND_FLUSH | SEND_TRIM, READ_ONLY for --read-only or a snapshot) for the
kernel model; SIGTERM disconnects it, and its exit (or death) frees the
device, which a process standing for the kernel's side watches.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

from standins import kernel
from xcp_rbd.datapath import nbd_wire

FLAGS = ("--read-only", "--exclusive", "--try-netlink")
OWN = ("--timeout", "--device", "--nbds_max", "--max_part", "--cluster")


def _parse(args):
    flags, options, positional = set(), {}, []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in FLAGS:
            flags.add(arg)
        elif arg.startswith("-") and "=" in arg:
            key, _, value = arg.partition("=")
            options[key] = value
        elif arg.startswith("-"):
            options[arg] = args[index + 1]
            index += 1
        else:
            positional.append(arg)
        index += 1
    return flags, options, positional


def fail(message):
    sys.stderr.write("rbd-nbd: %s\n" % message)
    return 1


def map_image(args):
    flags, options, [spec] = _parse(args)
    timeout = int(options.get("--timeout", 0))
    if timeout < 0:
        return fail("Invalid timeout value")
    with kernel.device_lock():
        free = [device for device in kernel.devices() if kernel.client_pid(device) is None]
        if not free:
            return fail("failed to find unused device")  # try_ioctl_setup's words
        device = free[0]
        attached = subprocess.Popen(
            [sys.executable, sys.argv[0], "--attach", device, str(timeout), spec,
             json.dumps(sorted(flags)), json.dumps(options)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
        if attached.stdout.readline() != b"ready\n":
            attached.wait()
            return fail("failed to open image %s" % spec)
    print(device)
    return 0


def attach(device, timeout, spec, flags, options):
    """The kernel's side of a mapping: the daemon becomes the device's client, and
    its end (unmap, or a crash) frees the device."""
    socket_path = os.path.join(os.environ["XCP_RBD_FAKE_RUN"],
                               "rbd-nbd.%s.sock" % os.path.basename(device))
    daemon = subprocess.Popen([sys.executable, sys.argv[0], "--serve", socket_path, spec,
                               flags, options], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE)
    if daemon.stdout.readline() != b"ready\n":
        return 1
    kernel.connect(device, daemon.pid, socket_path, "", int(timeout))
    print("ready", flush=True)
    _detach_stdio()
    daemon.wait()
    if kernel.client_pid(device) == daemon.pid:
        kernel.disconnect(device)
    return 0


def _detach_stdio():
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        os.dup2(devnull, fd)  # daemonized: the caller's pipes close


def unmap(args):
    [device] = args
    pid = kernel.client_pid(device)
    if pid is None:
        return fail("%s is not mapped" % device)
    os.kill(pid, signal.SIGTERM)  # the disconnect; the daemon closes in its own time
    return 0


def list_mapped(args):
    print("id  pool  namespace  image  snap  device")
    for device in kernel.devices():
        pid = kernel.client_pid(device)
        if pid is not None:
            print("%d  -  -  -  -  %s" % (pid, device))
    return 0


def _open(spec, flags, options):
    import rados
    import rbd
    path, _, snap = spec.partition("@")
    pool, namespace, image = path.split("/")
    conf = {key[2:]: value for key, value in options.items()
            if key.startswith("--") and key not in OWN + ("--id",)}
    handle = rados.Rados(conffile=options.get("-c", ""), rados_id=options.get("--id"),
                         conf=conf)
    handle.connect()
    ioctx = handle.open_ioctx(pool)
    ioctx.set_namespace(namespace)
    read_only = "--read-only" in flags or bool(snap)
    return handle, rbd.Image(ioctx, image, snapshot=snap or None, read_only=read_only)


def _execute(image, command, offset, length, data):
    try:
        return _librbd_request(image, command, offset, length, data)
    except Exception as exc:  # the daemon's log, as rbd-nbd's own
        kernel.log("rbd-nbd", "request %d at %d failed: %r" % (command, offset, exc))
        raise


def _librbd_request(image, command, offset, length, data):
    if command == nbd_wire.CMD_READ:
        return image.read(offset, length)
    if command == nbd_wire.CMD_WRITE:
        image.write(data, offset)
    elif command == nbd_wire.CMD_FLUSH:
        image.flush()
    elif command in (nbd_wire.CMD_TRIM, nbd_wire.CMD_WRITE_ZEROES):
        image.discard(offset, length)
    return b""


def serve(socket_path, spec, flags, options):
    """The daemon: the image open with librbd, NBD on socket_path, until SIGTERM."""
    flags, options = set(json.loads(flags)), json.loads(options)
    try:
        handle, image = _open(spec, flags, options)
    except Exception as exc:
        sys.stderr.write("rbd-nbd: failed to open image: %s\n" % exc)
        return 1
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(8)
    read_only = "--read-only" in flags or "@" in spec
    nbd_flags = nbd_wire.TRANSMISSION_SEND_FLUSH | nbd_wire.TRANSMISSION_SEND_TRIM | (
        nbd_wire.TRANSMISSION_READ_ONLY if read_only else 0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    _detach_stdio()
    try:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=kernel.serve_nbd, args=(
                sock, image.size(), nbd_flags,
                lambda *request: _execute(image, *request), Exception), daemon=True).start()
    finally:
        listener.close()
        os.unlink(socket_path)
        image.close()
        handle.shutdown()


def main(argv):
    if argv[:1] == ["--serve"]:
        return serve(*argv[1:])
    if argv[:1] == ["--attach"]:
        return attach(*argv[1:])
    kernel.journal(["rbd-nbd"] + argv)
    commands = {"map": map_image, "unmap": unmap, "list-mapped": list_mapped}
    if not argv or argv[0] not in commands:
        return fail("unknown command: %s" % " ".join(argv))
    return commands[argv[0]](argv[1:])
