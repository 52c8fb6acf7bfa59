"""xcp-rbd-xapi: plays XAPI and xapi-storage-script against installed plugin scripts.

It runs the scripts exactly as xapi-storage-script does (`<script> --json`, the
parameters as one JSON object on stdin, the result or error JSON on stdout)
and knows XAPI's call sequences (spec section 6): sr-create + plug,
vdi-create (+ set vdi-type), vdi-snapshot (+ the five sets), snapshot-revert
(destroy the live disk, clone the snapshot), vdi-clone, vdi-destroy, sr-scan,
sr-destroy. Tests, the demo and administrators use it. Like xapi-storage-script
it remembers the `sr` string of each attached SR (in a state file).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

VOLUME_PLUGIN = "org.xen.xapi.storage.rbd"
DATAPATH_PLUGIN = "rbd+tapdisk"


# What xapi tells an administrator whose sr-scan an SR's health stopped.
SCAN_ADVICE = {"Unavailable": "try reboot", "Unreachable": "try again later"}


class PluginError(Exception):
    """A script failed: its code and params, as XAPI would show them."""

    def __init__(self, command, document, stderr=""):
        self.command = command
        self.code = document.get("code", "SCRIPT_FAILED")
        self.params = document.get("params", [])
        self.document = document
        self.stderr = stderr
        super(PluginError, self).__init__("%s failed: %s %s" % (
            command, self.code, json.dumps(self.params)))


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = str(text).strip().upper().rstrip("IB")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class Xapi(object):
    """XAPI's view of the plugins installed under `root` (…/libexec/xapi-storage-script)."""

    def __init__(self, root, state_path, trace=None):
        self.root = root
        self.state_path = state_path
        self.trace = trace  # a stream to narrate every script call on, or None

    # -- the wire protocol, as xapi-storage-script speaks it --

    def call(self, kind, plugin, command, **params):
        script = os.path.join(self.root, kind, plugin, command)
        params.setdefault("dbg", "xcp-rbd-xapi:%s" % uuid.uuid4().hex[:8])
        stdin = json.dumps(params, separators=(",", ":"))
        started = time.time()
        process = subprocess.Popen([script, "--json"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = process.communicate(stdin.encode("utf-8") + b"\n")
        elapsed = time.time() - started
        try:
            document = json.loads(stdout.decode("utf-8"))
        except ValueError:
            document = {"code": "SCRIPT_FAILED",
                        "params": [script, "bad json on stdout", stdout.decode("utf-8", "replace")]}
            raise PluginError(command, document, stderr.decode("utf-8", "replace"))
        if self.trace:
            shown = {k: v for k, v in params.items() if k != "dbg"}
            self.trace.write("  %-22s %s\n  %22s -> %s (%.0f ms)\n" % (
                command, json.dumps(shown), "", _short(document, process.returncode),
                elapsed * 1000))
        if process.returncode != 0:
            raise PluginError(command, document, stderr.decode("utf-8", "replace"))
        return document

    def volume(self, command, **params):
        return self.call("volume", VOLUME_PLUGIN, command, **params)

    def datapath(self, command, **params):
        return self.call("datapath", DATAPATH_PLUGIN, command, **params)

    # -- what xapi-storage-script remembers: sr uuid -> attached sr string --

    def _state(self):
        try:
            with open(self.state_path) as stream:
                return json.load(stream)
        except (IOError, ValueError):
            return {"attached": {}, "device_config": {}}

    def _save(self, state):
        tmp = "%s.%d" % (self.state_path, os.getpid())
        with open(tmp, "w") as stream:
            json.dump(state, stream, indent=2, sort_keys=True)
        os.rename(tmp, self.state_path)

    def sr(self, sr_uuid):
        try:
            return self._state()["attached"][sr_uuid]
        except KeyError:
            raise PluginError("lookup", {"code": "SR_NOT_ATTACHED", "params": [sr_uuid]})

    # -- XAPI's sequences (smapiv3-spec section 6) --

    def sr_create(self, device_config, name="", description="", sr_uuid=None):
        """xe sr-create type=rbd: SR.create on one host, then PBD.plug."""
        sr_uuid = sr_uuid or str(uuid.uuid4())
        self.volume("Plugin.Query")
        config = self.volume("SR.create", uuid=sr_uuid, configuration=device_config,
                             name=name, description=description)
        state = self._state()
        state["device_config"][sr_uuid] = config
        self._save(state)
        self.pbd_plug(sr_uuid)
        return sr_uuid

    def pbd_plug(self, sr_uuid, device_config=None):
        state = self._state()
        config = device_config or state["device_config"][sr_uuid]
        self.volume("Plugin.Query")
        sr = self.volume("SR.attach", configuration=config)
        self.volume("SR.stat", sr=sr)
        state = self._state()
        state["attached"][sr_uuid] = sr
        state["device_config"][sr_uuid] = config
        self._save(state)
        return sr

    def pbd_unplug(self, sr_uuid):
        self.volume("SR.detach", sr=self.sr(sr_uuid))
        state = self._state()
        state["attached"].pop(sr_uuid, None)
        self._save(state)

    def sr_scan(self, sr_uuid):
        """SR.scan2 (every 8.3 xapi but the first): SR.stat, again up to 3 times 1 s
        apart while Unreachable; an SR that is not Healthy then fails the scan with
        SR_UNHEALTHY, as xapi does; else SR.ls."""
        sr = self.sr(sr_uuid)
        for attempt in range(4):
            health = self.volume("SR.stat", sr=sr)["health"][0]
            if health != "Unreachable" or attempt == 3:
                break
            time.sleep(1)
        if health != "Healthy":
            raise PluginError("SR.scan", {"code": "SR_UNHEALTHY", "params": [
                sr_uuid, health, SCAN_ADVICE.get(health, "")]})
        return self.volume("SR.ls", sr=sr)

    def sr_destroy(self, sr_uuid):
        """All PBDs unplugged first; then attach, stat, destroy (no detach after)."""
        state = self._state()
        if sr_uuid in state["attached"]:
            self.pbd_unplug(sr_uuid)
        sr = self.volume("SR.attach", configuration=state["device_config"][sr_uuid])
        self.volume("SR.stat", sr=sr)
        self.volume("SR.destroy", sr=sr)
        state = self._state()
        state["device_config"].pop(sr_uuid, None)
        self._save(state)

    def sr_probe(self, device_config):
        return self.volume("SR.probe", configuration=device_config)

    def vdi_create(self, sr_uuid, size, name="", description="", vdi_type="user",
                   sharable=False):
        sr = self.sr(sr_uuid)
        vdi = self.volume("Volume.create", sr=sr, name=name, description=description,
                          size=parse_size(size), sharable=sharable)
        self.volume("Volume.set", sr=sr, key=vdi["key"], k="vdi-type", v=vdi_type)
        return vdi

    def vdi_snapshot(self, sr_uuid, key, xapi_keys=True):
        """Volume.snapshot, then (xapi_keys) the five keys xapi-storage-script sets on it
        (tests that never look at those keys save the seven other calls)."""
        sr = self.sr(sr_uuid)
        if not xapi_keys:
            return self.volume("Volume.snapshot", sr=sr, key=key)
        parent = self.volume("Volume.stat", sr=sr, key=key)
        snap = self.volume("Volume.snapshot", sr=sr, key=key)
        for k, v in (("snapshot_time", time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())),
                     ("is_a_snapshot", "true"), ("snapshot_of", key),
                     ("content_id", parent["keys"].get("content_id", "")),
                     ("vdi-type", parent["keys"].get("vdi-type", "user"))):
            self.volume("Volume.set", sr=sr, key=snap["key"], k=k, v=v)
        return self.volume("Volume.stat", sr=sr, key=snap["key"])

    def vdi_clone(self, sr_uuid, key):
        return self.volume("Volume.clone", sr=self.sr(sr_uuid), key=key)

    def vdi_destroy(self, sr_uuid, key):
        sr = self.sr(sr_uuid)
        self.volume("Volume.stat", sr=sr, key=key)
        self.volume("Volume.destroy", sr=sr, key=key)

    def snapshot_revert(self, sr_uuid, snapshot_key, live_key, native=False):
        """VM snapshot-revert for one disk. Every 8.3 xapi: destroy the live disk,
        clone the snapshot (returns the clone). xapi 26.16 and later, where the SR
        type declares VDI_REVERT (`native`): Volume.revert, and the disk keeps its
        key (returns it, as VDI.revert leaves the VDI)."""
        if native:
            sr = self.sr(sr_uuid)
            self.volume("Volume.revert", sr=sr, snapshot=snapshot_key, key=live_key)
            return self.volume("Volume.stat", sr=sr, key=live_key)
        self.vdi_destroy(sr_uuid, live_key)
        return self.vdi_clone(sr_uuid, snapshot_key)

    def vdi_resize(self, sr_uuid, key, size):
        sr = self.sr(sr_uuid)
        self.volume("Volume.resize", sr=sr, key=key, new_size=parse_size(size))
        return self.volume("Volume.stat", sr=sr, key=key)

    def vdi_param_set(self, sr_uuid, key, name=None, description=None):
        sr = self.sr(sr_uuid)
        if name is not None:
            self.volume("Volume.set_name", sr=sr, key=key, new_name=name)
        if description is not None:
            self.volume("Volume.set_description", sr=sr, key=key,
                        new_description=description)
        return self.volume("Volume.stat", sr=sr, key=key)

    def _datapath_uri(self, sr, key):
        """Volume.stat, which xapi-storage-script runs before every datapath call."""
        return self.volume("Volume.stat", sr=sr, key=key)["uri"][0]

    def vbd_plug(self, sr_uuid, key, domain="0", read_only=False):
        """VM start (or VBD hot-plug) for one disk: VDI.attach3 then VDI.activate3
        (activate_readonly for a read-only VBD: the SR type declares
        VDI_ACTIVATE_READONLY)."""
        sr = self.sr(sr_uuid)
        backend = self.datapath("Datapath.attach", uri=self._datapath_uri(sr, key),
                                domain=domain)
        self.datapath("Datapath.activate_readonly" if read_only else "Datapath.activate",
                      uri=self._datapath_uri(sr, key), domain=domain)
        return backend

    def vbd_unplug(self, sr_uuid, key, domain="0"):
        """VM shutdown (or VBD unplug) for one disk: VBD_deactivate, then DP.destroy,
        which deactivates again and detaches."""
        sr = self.sr(sr_uuid)
        self.datapath("Datapath.deactivate", uri=self._datapath_uri(sr, key), domain=domain)
        self._dp_destroy(sr, key, domain)

    def _dp_destroy(self, sr, key, domain):
        uri = self._datapath_uri(sr, key)
        self.datapath("Datapath.deactivate", uri=uri, domain=domain)
        self.datapath("Datapath.detach", uri=uri, domain=domain)

    def vm_migrate_localhost(self, sr_uuid, key, old, new, early_attach=False,
                             running=None):
        """xe vm-migrate to the same host, for one disk (xapi-flows 3.1 to 3.3): in
        xenopsd's legacy order (XCP-ng's default) the old domain deactivates (the VM
        pauses), the new one attaches and activates, then the old one deactivates and
        detaches; in split mode with early attach, the new domain attaches first and
        the old one deactivates once more before the end. `running(backend)` runs
        once the VM runs on the new domain, before the old domain's teardown.
        Returns the new domain's Datapath.attach result."""
        sr = self.sr(sr_uuid)
        attach = lambda: self.datapath("Datapath.attach", uri=self._datapath_uri(sr, key),
                                       domain=new)
        backend = attach() if early_attach else None
        self.datapath("Datapath.deactivate", uri=self._datapath_uri(sr, key), domain=old)
        backend = backend or attach()
        self.datapath("Datapath.activate", uri=self._datapath_uri(sr, key), domain=new)
        if running:
            running(backend)
        if early_attach:
            self.datapath("Datapath.deactivate", uri=self._datapath_uri(sr, key),
                          domain=old)
        self._dp_destroy(sr, key, old)
        return backend

    def nbd_connect(self, sr_uuid, key, device):
        """A client connects to xapi's NBD server for this disk: a read-only dom0 VBD
        of its own, domain u0_vbd_0_<device>. Returns (domain, attach result)."""
        domain = "u0_vbd_0_%s" % device
        return domain, self.vbd_plug(sr_uuid, key, domain, read_only=True)

    def nbd_disconnect(self, sr_uuid, key, domain):
        """The NBD client goes: its dom0 VBD is unplugged (DP.destroy)."""
        self._dp_destroy(self.sr(sr_uuid), key, domain)


def _short(document, status):
    text = json.dumps(document)
    if status:
        text = "ERROR %s %s" % (document.get("code"), json.dumps(document.get("params")))
    return text if len(text) < 160 else text[:157] + "..."


def _default_root():
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    return os.path.join(os.path.dirname(here), "libexec", "xapi-storage-script")


def _parser():
    parser = argparse.ArgumentParser(
        prog="xcp-rbd-xapi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("XCP_RBD_PLUGIN_ROOT") or _default_root(),
                        help="xapi-storage-script plugin root (default: next to this tool)")
    parser.add_argument("--state", default=os.environ.get(
        "XCP_RBD_XAPI_STATE", os.path.expanduser("~/.xcp-rbd-xapi.json")),
        help="file remembering attached SRs")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="narrate every script call on stderr")
    sub = parser.add_subparsers(dest="action")
    sub.required = True

    def command(name, help_text, *args):
        cmd = sub.add_parser(name, help=help_text)
        for arg in args:
            cmd.add_argument(*arg[0], **arg[1])
        return cmd

    sr_arg = (["sr"], {"help": "SR uuid"})
    key_arg = (["key"], {"help": "volume key (VDI location)"})
    command("sr-create", "create and plug an SR",
            (["--device-config", "-d"], {"action": "append", "default": [],
                                         "metavar": "KEY=VALUE"}),
            (["--name"], {"default": ""}), (["--description"], {"default": ""}),
            (["--uuid"], {"default": None}))
    command("sr-probe", "list the SRs of a pool",
            (["--device-config", "-d"], {"action": "append", "default": [],
                                         "metavar": "KEY=VALUE"}))
    command("pbd-plug", "attach an SR created before", sr_arg)
    command("pbd-unplug", "detach an SR", sr_arg)
    command("sr-scan", "list the VDIs of an SR", sr_arg)
    command("sr-stat", "SR.stat", sr_arg)
    command("sr-destroy", "destroy an SR and all its VDIs", sr_arg)
    command("vdi-create", "create a VDI", sr_arg, (["--size"], {"required": True}),
            (["--name"], {"default": ""}), (["--description"], {"default": ""}),
            (["--type"], {"default": "user"}))
    command("vdi-snapshot", "snapshot a VDI", sr_arg, key_arg)
    command("vdi-clone", "clone a VDI or snapshot", sr_arg, key_arg)
    command("vdi-destroy", "destroy a VDI or snapshot", sr_arg, key_arg)
    command("vdi-stat", "Volume.stat", sr_arg, key_arg)
    command("vdi-resize", "grow a VDI", sr_arg, key_arg, (["--size"], {"required": True}))
    command("vdi-param-set", "rename a VDI", sr_arg, key_arg, (["--name"], {}),
            (["--description"], {}))
    command("snapshot-revert", "revert a disk to a snapshot as XAPI does",
            sr_arg, (["snapshot"], {"help": "snapshot key"}),
            (["live"], {"help": "key of the disk being reverted"}),
            (["--native"], {"action": "store_true",
                            "help": "Volume.revert in place, as xapi 26.16 and later do"}))
    command("vbd-plug", "attach and activate a VDI on this host, as VM start does",
            sr_arg, key_arg, (["--domain"], {"default": "0", "help": "guest domid"}),
            (["--read-only"], {"action": "store_true",
                               "help": "a read-only VBD (Datapath.activate_readonly)"}))
    command("vm-migrate", "move a running disk to a new domain of this host, as "
            "xe vm-migrate host=<this host> does", sr_arg, key_arg,
            (["--from"], {"dest": "old", "required": True, "help": "the old domid"}),
            (["--to"], {"dest": "new", "required": True, "help": "the new domid"}),
            (["--early-attach"], {"action": "store_true",
                                  "help": "xenopsd's split mode: attach before pausing"}))
    command("nbd-connect", "a client of xapi's NBD server opens the disk (a read-only "
            "dom0 VBD of its own); prints its domain", sr_arg, key_arg,
            (["--device"], {"required": True, "help": "dom0 device name, e.g. xvdb"}))
    command("nbd-disconnect", "that NBD client goes", sr_arg, key_arg,
            (["--domain"], {"required": True, "help": "the domain nbd-connect printed"}))
    command("vbd-unplug", "deactivate (twice) and detach a VDI, as VM shutdown does",
            sr_arg, key_arg, (["--domain"], {"default": "0", "help": "guest domid"}))
    command("diagnostics", "Plugin.diagnostics")
    command("gc", "run the garbage collector of an SR now, in the foreground", sr_arg,
            (["--wait"], {"type": float, "default": 120.0,
                          "help": "seconds to wait for a running collector"}))
    return parser


def _device_config(pairs):
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit("--device-config takes KEY=VALUE, not %r" % pair)
        config[key] = value
    return config


def run(args):
    xapi = Xapi(args.root, args.state, sys.stderr if args.verbose else None)
    action = args.action
    if action == "sr-create":
        return xapi.sr_create(_device_config(args.device_config), args.name,
                              args.description, args.uuid)
    if action == "sr-probe":
        return xapi.sr_probe(_device_config(args.device_config))
    if action == "diagnostics":
        return json.loads(xapi.volume("Plugin.diagnostics"))
    if action == "gc":
        return collect(xapi.sr(args.sr), args.wait)
    simple = {
        "pbd-plug": lambda: xapi.pbd_plug(args.sr),
        "pbd-unplug": lambda: xapi.pbd_unplug(args.sr),
        "sr-scan": lambda: xapi.sr_scan(args.sr),
        "sr-stat": lambda: xapi.volume("SR.stat", sr=xapi.sr(args.sr)),
        "sr-destroy": lambda: xapi.sr_destroy(args.sr),
        "vdi-create": lambda: xapi.vdi_create(args.sr, args.size, args.name,
                                              args.description, args.type),
        "vdi-snapshot": lambda: xapi.vdi_snapshot(args.sr, args.key),
        "vdi-clone": lambda: xapi.vdi_clone(args.sr, args.key),
        "vdi-destroy": lambda: xapi.vdi_destroy(args.sr, args.key),
        "vdi-stat": lambda: xapi.volume("Volume.stat", sr=xapi.sr(args.sr), key=args.key),
        "vdi-resize": lambda: xapi.vdi_resize(args.sr, args.key, args.size),
        "vdi-param-set": lambda: xapi.vdi_param_set(args.sr, args.key, args.name,
                                                    args.description),
        "snapshot-revert": lambda: xapi.snapshot_revert(args.sr, args.snapshot, args.live,
                                                        native=args.native),
        "vbd-plug": lambda: xapi.vbd_plug(args.sr, args.key, args.domain, args.read_only),
        "vm-migrate": lambda: xapi.vm_migrate_localhost(args.sr, args.key, args.old,
                                                        args.new, args.early_attach),
        "nbd-connect": lambda: xapi.nbd_connect(args.sr, args.key, args.device)[0],
        "nbd-disconnect": lambda: xapi.nbd_disconnect(args.sr, args.key, args.domain),
        "vbd-unplug": lambda: xapi.vbd_unplug(args.sr, args.key, args.domain),
    }
    return simple[action]()


def collect(sr, wait):
    """The collector in this process (the library is next to this tool)."""
    from xcp_rbd import gc, log
    from xcp_rbd.attached import open_sr
    log.setup(to_stderr=True)
    with open_sr(sr) as attached:
        actions = gc.collect(attached, wait=wait)
        return {"actions": actions, "status": gc.status(attached)}


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except PluginError as exc:
        sys.stderr.write("%s\n" % exc)
        if exc.stderr:
            sys.stderr.write(exc.stderr)
        return 1
    if result is not None:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return 0
