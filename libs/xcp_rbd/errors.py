"""Every error a plugin script can return, with what it means to an administrator.

XAPI shows an error as its `code` and `params`; ours are
SR_BACKEND_FAILURE [reason, message]: `reason` names the error (one per class
below, stated once, here), `message` says in words what happened to what and
what to do. Code raises these classes with their message
(`raise errors.Busy("...")`) and catches them by class, never by reason string.
Only protocol.error_document turns an exception into the wire's error JSON,
and gives what is not one of these (a librados/librbd error no caller mapped,
a bug) a class of this catalogue too, so no bare Python exception reaches
XAPI.

The classes form a tree by what failed, so a caller can catch a whole kind
(ClusterError) and the list reads as a map of what can go wrong:

    StorageError
      RequestError       the call as asked (parameters, a method we do not have)
      SetupError         configuration, installation
      InternalError      a bug in the plugin
      ClusterError       Ceph: reaching it, permissions, pools, commands
      SrError            the SR as a whole
      VolumeError        one volume: missing, busy, not possible on it
      DatapathError      a volume on this host: attached, active, mirrored
        HostError        this host's programs and devices (tapdisk, NBD, qemu)

Groups are never raised themselves. A code other than the default is a
convention XAPI's users know (SMAPIv1's numbered codes): set where one fits.
"""

BACKEND_FAILURE = "SR_BACKEND_FAILURE"


class StorageError(Exception):
    """An error for the administrator: XAPI shows `code` and `params` as they are."""

    reason = None  # each error class of the catalogue names its own
    code = BACKEND_FAILURE

    def __init__(self, message):
        super(StorageError, self).__init__("%s: %s" % (self.reason, message))
        self.params = [self.reason, message]


# --- the call as asked -----------------------------------------------------

class RequestError(StorageError):
    """The call cannot be done as it was asked."""


class InvalidParameters(RequestError):
    """A parameter is missing, of the wrong type or makes no sense (a uri that is
    not ours, an offset off the block size). XAPI or a tool sent it: the message
    says which one; report it with the call from /var/log/SMlog."""
    reason = "Invalid_parameters"


class Unimplemented(RequestError):
    """The script is not a method of this plugin (the SMAPIv3 name: what the IDL
    calls Unimplemented). Reinstall the plugin RPM if the method should exist."""
    reason = "Unimplemented"


# --- configuration and installation ----------------------------------------

class SetupError(StorageError):
    """How the SR or this host is set up prevents the call."""


class InvalidConfiguration(SetupError):
    """A device-config value (or a file it names) is wrong: a missing pool, a
    keyring or ceph.conf that does not exist, a bad timeout. Correct the SR's
    device-config (xe sr-create / PBD) as the message says."""
    reason = "Invalid_configuration"


class MissingDependency(SetupError):
    """A Python module the plugin needs is not installed on this host (the Ceph
    bindings, qemu.qmp): the message names the package to install."""
    reason = "Missing_dependency"


# --- the plugin itself ------------------------------------------------------

class InternalError(StorageError):
    """Something the plugin did not expect (a bug): the message says what, and
    /var/log/SMlog has the traceback; report it with that log."""
    reason = "Internal_error"


# --- the Ceph cluster -------------------------------------------------------

class ClusterError(StorageError):
    """The Ceph cluster cannot be used for the call."""


class CephUnreachable(ClusterError):
    """The cluster did not answer in time (monitors down or unreachable, an OSD
    down with no replica, a frozen cluster): `ceph -s` on a Ceph node tells why.
    Nothing was changed after the operation that timed out; retry once it
    answers. The SR's device-config:timeout sets how long a call waits."""
    reason = "Ceph_unreachable"


class CephPermissionDenied(ClusterError):
    """The cephx user of the SR may not do this: check the user, its keyring on
    this host, and its caps (mon 'profile rbd', osd and mgr 'profile rbd
    pool=<pool>')."""
    reason = "Ceph_permission_denied"


class CephPoolFull(ClusterError):
    """The pool (its quota) or the OSDs are full, so writes wait and fail: add
    capacity or raise the quota, then destroy VDIs to free space. Reads (VM
    starts) still work."""
    reason = "Ceph_pool_full"


class CephPoolMissing(ClusterError):
    """device-config:pool names a pool the cluster does not have: create it or
    correct the name."""
    reason = "Ceph_pool_missing"


class CephNamespaceMissing(ClusterError):
    """device-config:namespace names an RBD namespace the pool does not have:
    create it (`rbd namespace create`) or leave the key out."""
    reason = "Ceph_namespace_missing"


class CephPoolNotRbd(ClusterError):
    """The pool is not an RBD pool: `rbd pool init <pool>` makes it one."""
    reason = "Ceph_pool_not_rbd"


class CephCommandFailed(ClusterError):
    """The cluster refused a request of the plugin (a monitor or manager command,
    a librados/librbd operation) with an error: the message has Ceph's words.
    A stopped manager refuses its commands: `ceph mgr stat`."""
    reason = "Ceph_command_failed"


# --- the SR -----------------------------------------------------------------

class SrError(StorageError):
    """The SR as a whole."""


class SrDoesNotExist(SrError):
    """The SR's index is not in the pool/namespace (destroyed, or device-config
    points elsewhere): check device-config, or forget the SR (xe sr-forget)."""
    reason = "SR_does_not_exist"


class SrNotEmpty(SrError):
    """SR.destroy found images still in the SR (clones in another SR, a VM's
    open disk, what a killed operation left): destroy the VDIs, or retry once
    the collector's locks have run out, as the message says."""
    reason = "SR_not_empty"


# --- one volume -------------------------------------------------------------

class VolumeError(StorageError):
    """One volume (VDI) cannot do what the call asks."""


class VolumeDoesNotExist(VolumeError):
    """No volume has this key (the message: the key, or the missing image):
    destroyed meanwhile, or XAPI's database is behind; sr-scan refreshes it."""
    reason = "Volume_does_not_exist"


class VolumeRecordInvalid(VolumeError):
    """The SR index's record of a volume is not one this version knows (written by
    another version of xcp-rbd, or damaged): nothing is done with that volume.
    Install the same xcp-rbd version on every host of the pool."""
    reason = "Volume_record_invalid"


class VdiInvalidSize(VolumeError):
    """The size asked for is not possible: negative, or smaller than the disk
    (a disk never shrinks). SMAPIv1's code for it, which XAPI's users know."""
    reason = "VDI Invalid size"
    code = "SR_BACKEND_FAILURE_79"


class NotSupported(VolumeError):
    """The operation does not apply to this volume (a snapshot cannot be
    resized, snapshotted or given CBT; only a snapshot is reverted to): the
    message says what to do instead."""
    reason = "Not_supported"


class VolumeInUse(VolumeError):
    """The volume is open (a running VM, or a host that did not deactivate it),
    which the operation must not meet: shut the VM down, then retry."""
    reason = "Volume_in_use"


class Busy(VolumeError):
    """Another operation (from any host) holds what this call needs, longer than
    the call may wait: a lock, a background flatten, an index that changed
    constantly. Nothing was changed: try again in a moment."""
    reason = "Busy"


class VolumeDataDestroyed(VolumeError):
    """The snapshot's data was destroyed (Volume.data_destroy, after a CBT
    backup): only its changed-block metadata is left, so it cannot be read,
    cloned or reverted to."""
    reason = "Volume_data_destroyed"


class NoCbtMetadata(VolumeError):
    """The changed blocks between the two volumes are no longer known (CBT was
    disabled or a volume between them destroyed): take a full backup.
    XAPI's own name for it."""
    reason = "VDI_NO_CBT_METADATA"


class UnrelatedVolumes(VolumeError):
    """The two volumes are not snapshots of one RBD image, so their changed
    blocks cannot be listed exactly: take a full backup. SMAPIv1's words."""
    reason = "Source and target VDI are unrelated"


# --- a volume on this host --------------------------------------------------

class DatapathError(StorageError):
    """A volume's life on this host (attach, activate, mirror) cannot go on."""


class NotAttached(DatapathError):
    """Datapath.activate before Datapath.attach on this host (XAPI's order
    broken): detach and attach the VBD again."""
    reason = "Not_attached"


class NotActive(DatapathError):
    """The call needs the volume active on this host (a mirror: a disk in use)."""
    reason = "Not_active"


class VolumeActiveReadOnly(DatapathError):
    """The volume is open read-only here for other users: it can be written once
    they deactivate it."""
    reason = "Volume_active_read_only"


class ActivatedOnAnotherHost(DatapathError):
    """Another host has the volume active, and its client still watches the
    image: deactivate it there. XAPI knows this one only by its exact params
    [reason, host uuid] (xapi-storage-script, smapiv3-spec 3.3) and redirects the
    call to that host, so the message goes to the log, not into the params; a
    dead host's watch ends within osd_client_watch_timeout, and activate then
    takes over."""
    reason = "Activated_on_another_host"

    def __init__(self, host_uuid, message):
        super(ActivatedOnAnotherHost, self).__init__(message)
        self.params = [self.reason, host_uuid]


class ActivationLost(DatapathError):
    """Another host took over the volume's activation while it was active here
    (this host was taken for dead and fenced): the VM here lost its disk."""
    reason = "Activation_lost"


class UnknownOperation(DatapathError):
    """A mirror id this host does not know (ended, or never ours)."""
    reason = "Unknown_operation"


class MirrorTargetSize(DatapathError):
    """A storage migration's target disk does not have the volume's size."""
    reason = "Mirror_target_size"


class MirrorFailed(DatapathError):
    """A storage migration's mirror did not start, or failed after it was in
    sync (the target misses writes): the migration must not complete."""
    reason = "Mirror_failed"


class HostError(DatapathError):
    """A program or device of this host failed."""


class UnknownHost(HostError):
    """This host's uuid cannot be read (/etc/xensource-inventory)."""
    reason = "Unknown_host"


class TapdiskDied(HostError):
    """The volume's tapdisk died, and with it the disk of the domains using it:
    shut them down (which detaches it) and start them again."""
    reason = "Tapdisk_died"


class NoNbdDevice(HostError):
    """No /dev/nbd* device is free (or the nbd module is not loaded): the
    message says how to give the module more devices."""
    reason = "No_nbd_device"


class HostCommandFailed(HostError):
    """A command of this host (tap-ctl, rbd-nbd, nbd-client, systemd-run) could
    not run, failed or did not finish: the message has its command line and
    error output."""
    reason = "Host_command_failed"


class HostProgramTimeout(HostError):
    """The call's time bound ran out while it waited for a program of this host
    (tap-ctl, rbd-nbd, nbd-client, qemu's QMP monitor), and the call was ended
    (the program may still run): look at that program on this host (tap-ctl
    list, the volume's qemu.log, /var/log/SMlog). rbd-nbd map and qemu's
    blockdev-add wait for the cluster too: `ceph -s`."""
    reason = "Host_program_timeout"


class QemuFailed(HostError):
    """The volume's qemu did not start, is gone or did not answer its QMP
    monitor (it is then killed): the message and the volume's qemu.log say why."""
    reason = "Qemu_failed"


class QemuError(HostError):
    """The volume's qemu refused a QMP command: the message has qemu's error."""
    reason = "Qemu_error"
