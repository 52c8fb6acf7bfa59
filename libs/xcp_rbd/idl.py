"""The SMAPIv3 (v5) IDL types, and the signature of every method we serve.

The official bindings (xapi.storage.api.v5) are generated from OCaml and only
exist on XCP-ng hosts, so the plugins carry this small equivalent: each
method's parameters are checked before the implementation runs and its result
after, with the JSON encoding rules of rpclib (spec section 3.4).
"""

import base64


class IdlError(Exception):
    """A value does not have the type the IDL says it must have."""

    def __init__(self, path, expected, value, missing=False):
        super(IdlError, self).__init__(
            "%s (%s) is missing" % (path, expected) if missing else
            "%s must be %s, got %s" % (path, expected, _describe(value)))


def _describe(value):
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Type(object):
    name = "?"

    def check(self, value, path):
        raise NotImplementedError


class _Scalar(Type):
    def __init__(self, name, python_types):
        self.name = name
        self.python_types = python_types

    def check(self, value, path):
        # bool is an int subclass in Python, but not in the IDL.
        if isinstance(value, bool) and bool not in self.python_types:
            raise IdlError(path, self.name, value)
        if not isinstance(value, self.python_types):
            raise IdlError(path, self.name, value)


STRING = _Scalar("a string", (str,))
INT = _Scalar("an integer", (int,))
FLOAT = _Scalar("a float", (float,))
BOOL = _Scalar("true or false", (bool,))


class _Unit(Type):
    name = "null"

    def check(self, value, path):
        if value is not None:
            raise IdlError(path, self.name, value)


UNIT = _Unit()


class ListOf(Type):
    def __init__(self, item):
        self.item = item
        self.name = "a list"

    def check(self, value, path):
        if not isinstance(value, list):
            raise IdlError(path, self.name, value)
        for index, item in enumerate(value):
            self.item.check(item, "%s[%d]" % (path, index))


class _StringMap(Type):
    name = "an object of strings"

    def check(self, value, path):
        if not isinstance(value, dict):
            raise IdlError(path, self.name, value)
        for key, item in value.items():
            STRING.check(item, "%s.%s" % (path, key))


STRING_MAP = _StringMap()


class _Base64(Type):
    name = "a base64 string"

    def check(self, value, path):
        STRING.check(value, path)
        try:
            base64.b64decode(value.encode("ascii"), validate=True)
        except ValueError:
            raise IdlError(path, self.name, value)


BASE64 = _Base64()


class Record(Type):
    """A record: required fields must be present, optional ones may be absent."""

    def __init__(self, name, required, optional=()):
        self.name = "a %s record" % name
        self.required = list(required)
        self.optional = list(optional)

    def check(self, value, path):
        if not isinstance(value, dict):
            raise IdlError(path, self.name, value)
        for field, field_type in self.required:
            if field not in value:
                raise IdlError("%s.%s" % (path, field), field_type.name, None, missing=True)
            field_type.check(value[field], "%s.%s" % (path, field))
        for field, field_type in self.optional:
            if field in value:
                field_type.check(value[field], "%s.%s" % (path, field))


class Variant(Type):
    """A variant with payload, encoded as ["Constructor", payload]."""

    def __init__(self, name, constructors):
        self.name = "a %s (one of %s)" % (name, ", ".join(sorted(constructors)))
        self.constructors = constructors

    def check(self, value, path):
        if (not isinstance(value, list) or len(value) != 2
                or value[0] not in self.constructors):
            raise IdlError(path, self.name, value)
        self.constructors[value[0]].check(value[1], "%s.%s" % (path, value[0]))


HEALTH = Variant("health", {c: STRING for c in (
    "Healthy", "Recovering", "Unreachable", "Unavailable")})

SR_STAT = Record("sr_stat", [
    ("sr", STRING), ("name", STRING), ("description", STRING),
    ("free_space", INT), ("total_space", INT), ("datasources", ListOf(STRING)),
    ("clustered", BOOL), ("health", HEALTH)], optional=[("uuid", STRING)])

VOLUME = Record("volume", [
    ("key", STRING), ("name", STRING), ("description", STRING),
    ("read_write", BOOL), ("sharable", BOOL), ("virtual_size", INT),
    ("physical_utilisation", INT), ("uri", ListOf(STRING)), ("keys", STRING_MAP)],
    optional=[("uuid", STRING), ("cbt_enabled", BOOL)])

PROBE_RESULT = Record("probe_result", [
    ("configuration", STRING_MAP), ("complete", BOOL), ("extra_info", STRING_MAP)],
    optional=[("sr", SR_STAT)])

QUERY_RESULT = Record("query_result", [
    ("plugin", STRING), ("name", STRING), ("description", STRING), ("vendor", STRING),
    ("copyright", STRING), ("version", STRING), ("required_api_version", STRING),
    ("features", ListOf(STRING)), ("configuration", STRING_MAP),
    ("required_cluster_stack", ListOf(STRING))])

CHANGED_BLOCKS = Record("changed_blocks", [("granularity", INT), ("bitmap", BASE64)])

IMPLEMENTATION = Variant("implementation", {
    "XenDisk": Record("xendisk", [
        ("params", STRING), ("extra", STRING_MAP), ("backend_type", STRING)]),
    "BlockDevice": Record("block_device", [("path", STRING)]),
    "File": Record("file", [("path", STRING)]),
    "Nbd": Record("nbd", [("uri", STRING)]),
})

BACKEND = Record("backend", [("implementations", ListOf(IMPLEMENTATION))])

OPERATION = Variant("operation", {"CopyV1": STRING, "MirrorV1": STRING})

DATA_STATUS = Record("status", [("failed", BOOL), ("complete", BOOL)],
                     optional=[("progress", FLOAT)])


class Method(object):
    """One IDL method: its parameters in IDL order (after dbg) and its result."""

    def __init__(self, name, params, result):
        self.name = name
        self.params = [("dbg", STRING)] + list(params)
        self.result = result

    def check_args(self, args):
        """Return the parameters as keyword arguments, or raise IdlError."""
        if not isinstance(args, dict):
            raise IdlError("the parameters", "one JSON object", args)
        kwargs = {}
        for param, param_type in self.params:
            if param not in args:
                raise IdlError("parameter '%s'" % param, param_type.name, None, missing=True)
            param_type.check(args[param], "parameter '%s'" % param)
            kwargs[param] = args[param]
        return kwargs

    def check_result(self, result):
        self.result.check(result, "the result of %s" % self.name)


def _methods(*methods):
    return {method.name.lower(): method for method in methods}


_SR = ("sr", STRING)
_KEY = ("key", STRING)
_URI = ("uri", STRING)
_DOMAIN = ("domain", STRING)

METHODS = _methods(
    Method("Plugin.query", [], QUERY_RESULT),
    Method("Plugin.ls", [], ListOf(STRING)),
    Method("Plugin.diagnostics", [], STRING),

    Method("SR.probe", [("configuration", STRING_MAP)], ListOf(PROBE_RESULT)),
    Method("SR.create", [("uuid", STRING), ("configuration", STRING_MAP),
                         ("name", STRING), ("description", STRING)], STRING_MAP),
    Method("SR.attach", [("configuration", STRING_MAP)], STRING),
    Method("SR.detach", [_SR], UNIT),
    Method("SR.destroy", [_SR], UNIT),
    Method("SR.stat", [_SR], SR_STAT),
    Method("SR.set_name", [_SR, ("new_name", STRING)], UNIT),
    Method("SR.set_description", [_SR, ("new_description", STRING)], UNIT),
    Method("SR.ls", [_SR], ListOf(VOLUME)),

    Method("Volume.create", [_SR, ("name", STRING), ("description", STRING),
                             ("size", INT), ("sharable", BOOL)], VOLUME),
    Method("Volume.snapshot", [_SR, _KEY], VOLUME),
    Method("Volume.clone", [_SR, _KEY], VOLUME),
    Method("Volume.revert", [_SR, ("snapshot", STRING), _KEY], UNIT),
    Method("Volume.destroy", [_SR, _KEY], UNIT),
    Method("Volume.set_name", [_SR, _KEY, ("new_name", STRING)], UNIT),
    Method("Volume.set_description", [_SR, _KEY, ("new_description", STRING)], UNIT),
    Method("Volume.set", [_SR, _KEY, ("k", STRING), ("v", STRING)], UNIT),
    Method("Volume.unset", [_SR, _KEY, ("k", STRING)], UNIT),
    Method("Volume.resize", [_SR, _KEY, ("new_size", INT)], UNIT),
    Method("Volume.stat", [_SR, _KEY], VOLUME),
    Method("Volume.enable_cbt", [_SR, _KEY], UNIT),
    Method("Volume.disable_cbt", [_SR, _KEY], UNIT),
    Method("Volume.data_destroy", [_SR, _KEY], UNIT),
    Method("Volume.list_changed_blocks", [_SR, _KEY, ("key2", STRING),
                                          ("offset", INT), ("length", INT)],
           CHANGED_BLOCKS),

    Method("Datapath.open", [_URI, ("persistent", BOOL)], UNIT),
    Method("Datapath.attach", [_URI, _DOMAIN], BACKEND),
    Method("Datapath.activate", [_URI, _DOMAIN], UNIT),
    Method("Datapath.activate_readonly", [_URI, _DOMAIN], UNIT),
    Method("Datapath.deactivate", [_URI, _DOMAIN], UNIT),
    Method("Datapath.detach", [_URI, _DOMAIN], UNIT),
    Method("Datapath.close", [_URI], UNIT),

    Method("Data.mirror", [_URI, _DOMAIN, ("remote", STRING)], OPERATION),
    Method("Data.stat", [("operation", OPERATION)], DATA_STATUS),
)
