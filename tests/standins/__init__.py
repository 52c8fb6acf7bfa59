"""Stand-ins for the programs of an XCP-ng dom0 that need Xen, kernel NBD or
systemd as PID 1 (none of which this machine has): tap-ctl and tapdisk,
rbd-nbd, nbd-client and systemd-run. Each takes the real program's arguments,
prints what it prints and exits as it exits (from their sources: blktap
v3.55.5 `control/`, `drivers/`; Ceph `src/tools/rbd_nbd/rbd-nbd.cc`; nbd's
`nbd-client.c`; systemd 219 `src/run/run.c`), and serves the data for real:

- kernel: the dom0 side of /dev/nbdN, a directory in a fake sysfs per device
  (`pid` while a client is connected, `backend`: the NBD server behind it, and
  the request timeout its client set), and the 4.19 driver's rules: a request
  that outlives the timeout fails, and so does every later one;
- rbd_nbd: `map` starts a daemon that opens the image with librbd and serves it
  over NBD (for the kernel); `unmap` returns before the daemon has closed it;
- nbd_client: connects a device to an NBD server on a unix socket;
- tapdisk, tap_ctl: a tapdisk process per `spawn`, driven over its control
  socket; `open` reads and writes /dev/nbdN through the kernel model, serves
  the VBD on its NBD socket (/run/blktap-control/nbd<pid>.<minor>) and, with a
  secondary (`-2 nbd:<socket>`), mirrors every write to it first;
- systemd_run: `--scope` moves itself into a scope's cgroup of the name=systemd
  hierarchy, then execs the command, as systemd-run does with systemd's help.

Every tool appends its command line to the journal (FakeHost.commands()).
"""
