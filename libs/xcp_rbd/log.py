"""Logging: plugins log to syslog facility local2 (/var/log/SMlog, as SMAPIv1 and
xapi.storage.log do); tools log to stderr as well. Never to stdout, which belongs
to the wire protocol.

The C `syslog` module, not `logging`: every SMAPIv3 call is a new process and
logging.handlers alone costs ~20 ms of imports on each.
"""

import os
import sys
import syslog
import time

DEBUG, INFO, WARNING, ERROR = range(4)
_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR")
_PRIORITIES = (syslog.LOG_DEBUG, syslog.LOG_INFO, syslog.LOG_WARNING, syslog.LOG_ERR)
_state = {"command": os.path.basename(sys.argv[0]) if sys.argv else "", "dbg": "",
          "stderr": False, "level": INFO, "ready": False}


def setup(to_stderr=False, level=INFO):
    """Plugins: syslog (local2). Tools (to_stderr=True): stderr as well."""
    syslog.openlog("xcp-rbd", syslog.LOG_PID, syslog.LOG_LOCAL2)
    # Without a syslog daemon (test machines), stderr: xapi-storage-script logs a
    # failed script's stderr, and tests show it.
    _state.update(stderr=to_stderr or not os.path.exists("/dev/log"), level=level,
                  ready=True)


def set_context(command, dbg):
    _state["command"] = command
    _state["dbg"] = dbg.split("\n")[0]


def _log(level, message, args, exc_info=False):
    if level < _state["level"] or not _state["ready"]:
        return
    text = message % args if args else message
    if exc_info:
        import traceback
        text += "\n" + traceback.format_exc()
    line = "%s %s %s [%s]" % (_state["command"], _NAMES[level], text, _state["dbg"])
    for part in line.splitlines():
        syslog.syslog(_PRIORITIES[level], part)
    if _state["stderr"]:
        sys.stderr.write("%s xcp-rbd[%d]: %s\n" % (
            time.strftime("%Y-%m-%d %H:%M:%S"), os.getpid(), line))


def debug(message, *args):
    _log(DEBUG, message, args)


def info(message, *args):
    _log(INFO, message, args)


def warning(message, *args):
    _log(WARNING, message, args)


def error(message, *args, **kwargs):
    _log(ERROR, message, args, kwargs.get("exc_info", False))


def flush():
    sys.stderr.flush()
