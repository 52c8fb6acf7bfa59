"""The datapath plugin rbd+tapdisk: each command and where it is done.

Installed as one script with a link per command (see CMakeLists.txt), which
serves COMMANDS with protocol.main.
"""

from xcp_rbd.datapath import commands, mirror

COMMANDS = {
    "Plugin.Query": commands.query,
    "Plugin.diagnostics": commands.diagnostics,
    "Datapath.attach": commands.attach,
    "Datapath.activate": commands.activate,
    "Datapath.activate_readonly": commands.activate_readonly,
    "Datapath.deactivate": commands.deactivate,
    "Datapath.detach": commands.detach,
    "Data.mirror": mirror.mirror,
    "Data.stat": mirror.stat,
}

