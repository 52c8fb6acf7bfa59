"""The volume plugin org.xen.xapi.storage.rbd: each command and where it is done.

Installed as one script with a link per command (see CMakeLists.txt), which
serves COMMANDS with protocol.main.
"""

from xcp_rbd import cbt, plugin, revert, sr, volume

COMMANDS = {
    "Plugin.Query": plugin.query,
    "Plugin.diagnostics": plugin.diagnostics,
    "SR.create": sr.create,
    "SR.attach": sr.attach,
    "SR.detach": sr.detach,
    "SR.destroy": sr.destroy,
    "SR.stat": sr.stat,
    "SR.ls": sr.ls,
    "SR.probe": sr.probe,
    "SR.set_name": sr.set_name,
    "SR.set_description": sr.set_description,
    "Volume.create": volume.create,
    "Volume.destroy": volume.destroy,
    "Volume.stat": volume.stat,
    "Volume.set": volume.set_key,
    "Volume.unset": volume.unset_key,
    "Volume.set_name": volume.set_name,
    "Volume.set_description": volume.set_description,
    "Volume.resize": volume.resize,
    "Volume.snapshot": volume.snapshot,
    "Volume.clone": volume.clone,
    "Volume.revert": revert.revert,
    "Volume.enable_cbt": cbt.enable_cbt,
    "Volume.disable_cbt": cbt.disable_cbt,
    "Volume.list_changed_blocks": cbt.list_changed_blocks,
    "Volume.data_destroy": cbt.data_destroy,
}

