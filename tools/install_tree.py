"""Install this source tree with CMake into a prefix, as tests, benchmarks and the
demo use the plugins: from an installed tree, run as they are (no PYTHONPATH).

The vendored wheels come from the wheelhouse that scripts/wheels fills (the project's
install scripts run it), so an install needs no network and no pip of its own."""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(prefix, python=sys.executable, destdir=None):
    """cmake + make install into prefix (staged under destdir, as make's DESTDIR, when
    given, as packaging does); returns the xapi-storage-script plugin root on disk."""
    build = tempfile.mkdtemp(prefix="xcp-rbd-build-")
    wheelhouse = subprocess.check_output([os.path.join(ROOT, "scripts", "wheels")])
    subprocess.check_call(["cmake", "-DCMAKE_INSTALL_PREFIX=%s" % prefix,
                           "-DPYTHON_EXECUTABLE=%s" % python,
                           "-DXCP_RBD_WHEELHOUSE=%s" % wheelhouse.decode().strip(), ROOT],
                          cwd=build, stdout=subprocess.DEVNULL)
    env = dict(os.environ, DESTDIR=destdir) if destdir else None
    subprocess.check_call(["make", "install"], cwd=build, stdout=subprocess.DEVNULL, env=env)
    return (destdir or "") + os.path.join(prefix, "libexec", "xapi-storage-script")
