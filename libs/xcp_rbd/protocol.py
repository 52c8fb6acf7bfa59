"""The wire protocol between xapi-storage-script and a plugin script (spec section 3).

xapi-storage-script runs `<plugin dir>/<Interface.method> --json`, writes one
JSON object of named parameters on stdin and reads stdout:
- success: exit 0 and exactly one JSON value, the method's result;
- failure: exit 1 and {"code", "params", "backtrace": {"error", "files", "lines"}}.
Everything a plugin script does goes through `serve`, so nothing but that JSON
ever reaches stdout, whatever fails, and no call runs longer than its bound.
The errors are those of the catalogue (errors.py); error_document is the one
place that turns an exception into the failure JSON, and gives any other
exception one of the catalogue's errors.
"""

import contextlib
import importlib
import json
import os
import sys
import threading
import time

from xcp_rbd import errors, idl, log

# What to install for a module the plugins import, on XCP-ng 8.3 (EL7).
_PACKAGES = {
    "rados": "the Ceph client's Python 3 bindings: python3-rados (Octopus 15.2, "
             "download.ceph.com el7) or python36-rados (Nautilus 14.2, CentOS Storage SIG)",
    "rbd": "the Ceph client's Python 3 bindings: python3-rbd (Octopus 15.2, "
           "download.ceph.com el7) or python36-rbd (Nautilus 14.2, CentOS Storage SIG)",
    "qemu": "the Python package qemu.qmp, which the xcp-rbd RPM ships in "
            "/usr/lib/xcp-rbd/python (reinstall the RPM)",
}


def missing_dependency(exc):
    """The administrator's words for an ImportError: what is missing, what to install."""
    module = (getattr(exc, "name", None) or str(exc)).partition(".")[0]
    return "Python module '%s' is not installed for %s: install %s" % (
        module, sys.executable, _PACKAGES.get(module, "the package that provides it"))


def error_document(exc, tb=None):
    """The failure JSON for an exception (what xapi.handle_exception prints)."""
    import traceback  # only failures pay for it
    error = catalogued(exc)
    if isinstance(error, errors.InternalError):  # the traceback its words point to
        log.error("unexpected error:\n%s",
                  "".join(traceback.format_exception(type(exc), exc, tb)))
    frames = traceback.extract_tb(tb) if tb is not None else []
    return {
        "code": error.code,
        "params": [str(p) for p in error.params],
        "backtrace": {
            "error": str(exc),
            "files": [frame[0] for frame in frames],
            "lines": [frame[1] for frame in frames],
        },
    }


def catalogued(exc):
    """`exc` as an error of the catalogue (errors): itself if it is one."""
    if isinstance(exc, errors.StorageError):
        return exc
    if isinstance(exc, idl.IdlError):
        return errors.InvalidParameters(str(exc))
    if isinstance(exc, ImportError):
        return errors.MissingDependency(missing_dependency(exc))
    return _ceph_error(exc) or errors.InternalError(
        "an unexpected error in the plugin (%s: %s); see /var/log/SMlog"
        % (type(exc).__name__, exc))


def _ceph_error(exc):
    """The words for a librados/librbd exception that no caller mapped (the
    Connection maps time-outs and permissions), or None for any other exception.
    The bindings are not imported here: an exception of theirs means they are."""
    rados, rbd = sys.modules.get("rados"), sys.modules.get("rbd")
    if rbd is not None and isinstance(exc, rbd.ImageBusy):
        return errors.VolumeInUse(
            "the RBD image is in use: open by a VM, or locked by an operation of this "
            "or another host (%s); try again once it is closed" % exc)
    if rados is not None and isinstance(exc, rados.NoSpace):
        return errors.CephPoolFull(
            "the pool is full: the cluster refused a write (%s). Add capacity or raise "
            "the pool's quota, then VDIs can be destroyed to free space" % exc)
    if any(module is not None and isinstance(exc, module.Error) for module in (rados, rbd)):
        return errors.CephCommandFailed(
            "the cluster refused an operation of the plugin (%s: %s)"
            % (type(exc).__name__, exc))
    return None


class _Output(object):
    """stdout, written once: by the call, or by the watchdog if the call overruns."""

    def __init__(self):
        self._lock = threading.Lock()
        self._written = False

    def emit(self, document, status):
        with self._lock:
            if self._written:
                return
            self._written = True
            sys.stdout.write(json.dumps(document))
            sys.stdout.flush()
        if status:
            log.error("failed: %s", json.dumps(document.get("params")))
        sys.stdout = sys.stderr  # nothing may follow the protocol's JSON
        return status

    def abort(self, document, status=1):
        """Emit from another thread and end the process at once."""
        if self.emit(document, status) is not None:
            log.flush()
            os._exit(status)


_output = _Output()
class _Watchdog(object):
    """One thread that ends the call when its deadline passes: arming moves the
    deadline (cheap: no thread per arm, so progress callbacks may arm it at
    every step), and a call-wide limit caps every later arming. Its error says
    what the call was waiting for then: a program of this host (waiting_for),
    or else the cluster."""

    def __init__(self):
        self.enabled = False
        self.answer = None
        self.deadline = None
        self.bound = None  # seconds the last arming gave
        self.explanation = ""
        self.limit = None  # (deadline, explanation) that no arming goes past
        self.program = None  # (what, since) of waiting_for, or None
        self._wake = threading.Event()
        self._thread = None

    def arm(self, seconds, explanation):
        armed = time.monotonic()
        deadline = armed + seconds
        if self.limit is not None and deadline > self.limit[0]:
            deadline, explanation = self.limit
        self.deadline, self.explanation = deadline, explanation
        self.bound = deadline - armed
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        self._wake.set()

    def _watch(self):
        while True:
            self._wake.wait(max(0.0, self.deadline - time.monotonic()))
            self._wake.clear()
            if time.monotonic() >= self.deadline:
                break
        if self.answer is not None:
            _output.abort(self.answer(self.explanation), 0)
        _output.abort(error_document(self.error()))

    def error(self):
        """The error of a call whose bound ran out now."""
        if self.program is None:
            return errors.CephUnreachable(self.explanation)
        what, since = self.program
        return errors.HostProgramTimeout(
            "the call's bound (%.0f s) ran out after %.0f s of waiting for %s"
            % (self.bound, time.monotonic() - since, what))


_watchdog = _Watchdog()


def answer_on_timeout(answer):
    """Let the watchdog answer `answer(explanation)` as the call's result instead
    of failing it, for calls whose result can say that the cluster did not answer
    (SR.stat: the SR is Unreachable; Plugin.diagnostics: what it found so far)."""
    _watchdog.answer = answer


def enable_watchdog():
    """Let arm_watchdog bound this process (plugin scripts and the detached collector;
    never a tool, test or benchmark that uses the library)."""
    _watchdog.enabled = True


def arm_watchdog(seconds, explanation):
    """Fail the call unless it ends or re-arms within `seconds`: Ceph_unreachable
    with `explanation`, or the host program it waits for then (waiting_for).

    librados bounds most waits with its own timeouts, but not all of them
    (e.g. a monitor that accepts connections and never answers); neither
    xapi-storage-script nor XAPI bounds a script's run time, so this does.
    Long operations re-arm it as they make progress.
    """
    if _watchdog.enabled:
        _watchdog.arm(seconds, explanation)


def watchdog_remaining():
    """Seconds until the watchdog answers for the call, or None without one."""
    if not _watchdog.enabled or _watchdog.deadline is None:
        return None
    return _watchdog.deadline - time.monotonic()


@contextlib.contextmanager
def waiting_for(what):
    """While in the block, the call waits for `what`, a program of this host (its
    command line, or qemu's QMP monitor): should the watchdog end the call
    meanwhile, its error names that program, not the cluster."""
    outer, _watchdog.program = _watchdog.program, (what, time.monotonic())
    try:
        yield
    finally:
        _watchdog.program = outer


def limit_call(seconds, explanation):
    """Bound the whole call to `seconds` from now: later armings (each connection's,
    each step's) cannot move the watchdog past it."""
    if _watchdog.enabled:
        _watchdog.limit = (time.monotonic() + seconds, explanation)
        _watchdog.arm(seconds, explanation)


def read_arguments(stream):
    text = stream.readline()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise errors.InvalidParameters(
            "stdin is not one JSON object of parameters (%s)" % exc)


def serve(table, argv=None, stdin=None):
    """Run the command named by argv[0]'s basename; return the exit status.

    `table` names the module whose COMMANDS map "Interface.method" (any case) to
    a function taking the IDL parameters (dbg included) as keyword arguments. It
    is imported here, so that a missing dependency (no Ceph bindings) is answered
    in the protocol's shape too.
    """
    argv = sys.argv if argv is None else argv
    stdin = sys.stdin if stdin is None else stdin
    name = os.path.basename(argv[0])
    try:
        commands = importlib.import_module(table).COMMANDS
        handlers = {command.lower(): function for command, function in commands.items()}
        method = idl.METHODS.get(name.lower())
        handler = handlers.get(name.lower())
        if method is None or handler is None:
            raise errors.Unimplemented(name)
        if "--json" not in argv[1:] and "-j" not in argv[1:]:
            raise errors.InvalidParameters(
                "%s is a SMAPIv3 script: run it with --json and the parameters as a "
                "JSON object on stdin" % name)
        args = read_arguments(stdin)
        kwargs = method.check_args(args)
        log.set_context(name, kwargs["dbg"])
        log.info("called with %s", json.dumps(
            {k: v for k, v in kwargs.items() if k != "dbg"}, sort_keys=True))
        result = handler(**kwargs)
        method.check_result(result)
        return _output.emit(result, 0)
    except Exception as exc:  # every failure must reach XAPI in the protocol's shape
        return _output.emit(error_document(exc, sys.exc_info()[2]), 1)


def main(table):
    """Entry point of a plugin script (see serve)."""
    log.setup()
    enable_watchdog()
    status = serve(table)
    log.flush()
    sys.exit(status)
