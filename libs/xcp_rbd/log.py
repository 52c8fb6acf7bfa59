"""Logging: plugins log to syslog facility local2 (/var/log/SMlog, as SMAPIv1 and
xapi.storage.log do); tools log to stderr. Never to stdout, which belongs to the
wire protocol.
"""

import logging
import logging.handlers
import os
import sys

_logger = logging.getLogger("xcp_rbd")
_context = {"command": os.path.basename(sys.argv[0]) if sys.argv else "", "dbg": ""}


class _ContextFilter(logging.Filter):
    def filter(self, record):
        record.command = _context["command"]
        record.dbg = _context["dbg"]
        return True


def setup(to_stderr=False, level=logging.INFO):
    """Plugins: syslog (local2). Tools (to_stderr=True): stderr as well."""
    if _logger.handlers:
        return
    _logger.setLevel(level)
    _logger.addFilter(_ContextFilter())
    fmt = "xcp-rbd: [%(process)d] %(command)s %(levelname)s %(message)s [%(dbg)s]"
    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_LOCAL2)
        handler.setFormatter(logging.Formatter(fmt))
        _logger.addHandler(handler)
    if to_stderr or not _logger.handlers:
        # Without syslog, stderr: xapi-storage-script logs it when a script fails.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s " + fmt))
        _logger.addHandler(handler)


def set_context(command, dbg):
    _context["command"] = command
    _context["dbg"] = dbg.split("\n")[0]


def flush():
    for handler in _logger.handlers:
        handler.flush()


debug = _logger.debug
info = _logger.info
warning = _logger.warning
error = _logger.error
