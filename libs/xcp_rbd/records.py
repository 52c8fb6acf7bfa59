"""What an SR's index holds, every field named once, and the volume record.

The index of an SR (its storage: metadata.SrIndex) has these fields, each
written only by the modules named (and all removed by SR.destroy, gc.py):
  sr             the SR's record (sr.py)
  v.<key>        a volume's record: VolumeRecord (volume.py; revert.py for a
                 revert, cbt.py for changed-block tracking)
  k.<key>.<k>    the value of key <k> set with Volume.set (volume.py; revert.py
                 re-points `snapshot_of` when a clone adopts a disk's image)
  u.<key>        the volume's usage measured last, {"bytes", "at"} (attached.Sr;
                 dropped by volume.py and revert.py when it no longer holds)
  j.<image>      a background job on an image: a flatten (flatten.py)
  gc.stats       what the collector did over the SR's life (gc.py)
  gc.last_full   when a collector last swept every image (gc.py)
Every reader and writer of a volume record goes through VolumeRecord: `load` is
the one loader, and it rejects what it does not know (a field missing, unknown or
of the wrong type) with an error naming the volume, rather than a KeyError later.
"""

import json

from xcp_rbd import errors
from xcp_rbd.metadata import dumps, now

SR_RECORD = "sr"
VOLUME = "v."
KEYS = "k."
USAGE = "u."
JOB = "j."
GC_STATS = "gc.stats"
GC_LAST_FULL = "gc.last_full"


def volume_field(key):
    return VOLUME + key


def key_prefix(key):
    return "%s%s." % (KEYS, key)


def usage_field(key):
    return USAGE + key


def job_field(image):
    return JOB + image


def owner(field):
    """The key (or image) a per-volume field belongs to: `v.<key>` -> key."""
    return field.partition(".")[2].partition(".")[0]


_REQUIRED = object()
_TEXT = (str,)
# name -> (accepted JSON types, default: a field at its default is not stored)
_FIELDS = (
    ("uuid", _TEXT, _REQUIRED),
    ("name", _TEXT, _REQUIRED),
    ("description", _TEXT, _REQUIRED),
    ("image", _TEXT, _REQUIRED),              # the RBD image
    ("snap", (str, type(None)), _REQUIRED),   # its RBD snapshot; None: the writable disk
    ("sharable", (bool,), _REQUIRED),
    ("size", (int,), _REQUIRED),              # bytes
    ("created", _TEXT, _REQUIRED),
    ("depth", (int,), 0),                     # clone chain length when it was cloned
    ("cbt", (bool,), False),                  # changed-block tracking on (cbt.py)
    ("data_destroyed", (bool,), False),       # a snapshot whose data XAPI destroyed
    ("snap_id", (int, type(None)), None),     # its RBD snapshot id, kept for CBT
    ("changed", (dict, type(None)), None),    # its stored changes once that is gone
)
FIELD_NAMES = tuple(name for name, _, _ in _FIELDS)


class VolumeRecord(object):
    """A volume's index record (`v.<key>`): immutable; `replace` makes a changed one."""

    __slots__ = FIELD_NAMES

    def __init__(self, **values):
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:
            raise ValueError("unknown field %s" % ", ".join(unknown))
        for name, types, default in _FIELDS:
            value = values.get(name, default)
            if value is _REQUIRED:
                raise ValueError("field %s missing" % name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError("field %s is %r" % (name, value))
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("a VolumeRecord does not change: use replace()")

    @classmethod
    def load(cls, key, text):
        """The record of volume `key` from its stored text (an error naming the
        volume if it is not a record this version knows)."""
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
            return cls(**values)
        except ValueError as exc:
            raise errors.VolumeRecordInvalid("the index record of volume %s cannot be read "
                "(%s): it was written by another version of xcp-rbd, or damaged" % (key, exc))

    @classmethod
    def new(cls, key, like, image, snap, size, **more):
        """A new volume `key` on image@snap, named and described as `like` (a
        record, or Volume.create's arguments)."""
        get = like.get if isinstance(like, dict) else lambda name: getattr(like, name)
        return cls(uuid=key, name=get("name"), description=get("description"),
                   image=image, snap=snap, sharable=get("sharable"), size=size,
                   created=now(), **more)

    def replace(self, **changes):
        values = self.values()
        values.update(changes)
        return VolumeRecord(**values)

    def values(self):
        """The stored fields: those at their default are left out."""
        return {name: getattr(self, name) for name, _, default in _FIELDS
                if getattr(self, name) != default or default is _REQUIRED}

    def dumps(self):
        return dumps(self.values())

    @property
    def read_write(self):
        return self.snap is None

    @property
    def data_freed(self):
        """The RBD snapshot of a data-destroyed snapshot is gone (cbt.py): its
        stored changes are what is left, and its usage is 0."""
        return self.changed is not None

    def __repr__(self):
        return "VolumeRecord(%s)" % self.dumps()


def volumes(entries):
    """{key: VolumeRecord} of the volume records among index entries."""
    return {owner(field): VolumeRecord.load(owner(field), value)
            for field, value in entries.items() if field.startswith(VOLUME)}


def references(entries):
    """(images of writable volumes, {image: set of referenced snapshots}) of the
    volume records among index entries: what the collector must keep."""
    live = set()
    snapshots = {}
    for record in volumes(entries).values():
        if record.read_write:
            live.add(record.image)
        else:
            snapshots.setdefault(record.image, set()).add(record.snap)
    return live, snapshots
