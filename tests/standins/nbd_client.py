"""nbd-client (nbd 3.x nbd-client.c), the forms the datapath and xapi use:
`nbd-client -unix <socket> <device> -name <export> [-timeout <s>]
[-block-size <n>] [-persist]` negotiates with the server (failing as the real
one does when the export is missing) and connects the device;
`nbd-client -d <device>` disconnects it; `nbd-client -check <device>` prints
the client's pid and exits 0 when connected, 1 when not."""

import os
import sys

from standins import kernel
from xcp_rbd.datapath import nbd_wire


def main(argv):
    kernel.journal(["nbd-client"] + argv)
    if argv[0] == "-d":
        kernel.disconnect(argv[1])
        return 0
    if argv[0] == "-check":
        pid = kernel.client_pid(argv[1])
        if pid is None:
            return 1
        print(pid)
        return 0
    socket_path, device = argv[1], argv[2]
    options = dict(zip(argv[3::2], argv[4::2]))
    try:
        nbd_wire.Connection.connect_unix(socket_path, options.get("-name", "")).disconnect()
    except (OSError, nbd_wire.NbdError) as exc:
        sys.stderr.write("Error: %s\nExiting.\n" % exc)
        return 1
    with kernel.device_lock():
        if kernel.client_pid(device) is not None:
            sys.stderr.write("Error: Socket failed: Device or resource busy\nExiting.\n")
            return 1
        # The real one forks a daemon that stays in the kernel's NBD_DO_IT.
        kernel.connect(device, os.getpid(), socket_path, options.get("-name", ""),
                       int(options.get("-timeout", 0)))
    return 0
