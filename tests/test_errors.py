"""The error catalogue (xcp_rbd.errors) and the boundary that turns exceptions
into the protocol's error JSON: no cluster needed."""

import inspect
import json
import os
import subprocess
import sys

from xcp_rbd import errors, protocol

LIBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libs")


def catalogue():
    return [c for c in vars(errors).values()
            if inspect.isclass(c) and issubclass(c, errors.StorageError)]


def test_every_error_has_one_reason_and_words_for_the_administrator():
    reasons = [c.reason for c in catalogue() if c.reason]
    assert len(reasons) == len(set(reasons))
    for error in catalogue():
        assert error.__doc__, error
        if error.__subclasses__():  # a group: caught, never raised
            assert error.reason is None, error


def test_an_unexpected_exception_reaches_xapi_as_an_internal_error_in_words():
    try:
        {}["snap"]
    except KeyError as exc:
        document = protocol.error_document(exc, sys.exc_info()[2])
    assert document["code"] == "SR_BACKEND_FAILURE"
    assert document["params"][0] == "Internal_error"
    assert "unexpected error in the plugin" in document["params"][1]
    assert "'snap'" in document["params"][1] and "/var/log/SMlog" in document["params"][1]


def _watchdog_answer(body):
    """The error JSON of a process whose watchdog (1 s) ends `body`."""
    script = ("from xcp_rbd import protocol\n"
              "from xcp_rbd.datapath import host\n"
              "protocol.enable_watchdog()\n"
              "protocol.arm_watchdog(1, 'the cluster did not answer')\n" + body)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=LIBS))
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    return json.loads(out.decode("utf-8"))


def test_the_watchdog_names_the_host_program_it_waited_for():
    answer = _watchdog_answer("host._run(['sleep', '5'])")
    assert answer["params"][0] == "Host_program_timeout"
    assert "sleep 5" in answer["params"][1] and "(1 s)" in answer["params"][1]


def test_the_watchdog_blames_the_cluster_for_any_other_wait():
    answer = _watchdog_answer("import time\nhost._run(['true'])\ntime.sleep(5)")
    assert answer["params"] == ["Ceph_unreachable", "the cluster did not answer"]
