"""Install this source tree with CMake into a prefix, as tests, benchmarks and the
demo use the plugins: from an installed tree, run as they are (no PYTHONPATH)."""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(prefix, python=sys.executable):
    """cmake + make install into prefix; returns the xapi-storage-script plugin root."""
    build = tempfile.mkdtemp(prefix="xcp-rbd-build-")
    subprocess.check_call(["cmake", "-DCMAKE_INSTALL_PREFIX=%s" % prefix,
                           "-DPYTHON_EXECUTABLE=%s" % python, ROOT],
                          cwd=build, stdout=subprocess.DEVNULL)
    subprocess.check_call(["make", "install"], cwd=build, stdout=subprocess.DEVNULL)
    return os.path.join(prefix, "libexec", "xapi-storage-script")
