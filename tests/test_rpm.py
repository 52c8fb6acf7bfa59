"""The RPM scripts/rpm builds for XCP-ng 8.3: what it declares, what its scriptlets do
in a bare root, and that installing it gives exactly the CMake install tree."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from install_tree import install as install_tree  # noqa: E402

PYTHON_DIR = "/usr/lib/xcp-rbd/python"
PLUGIN_ROOT = "/usr/libexec/xapi-storage-script"
PLUGIN_SCRIPTS = (PLUGIN_ROOT + "/volume/org.xen.xapi.storage.rbd/plugin.py",
                  PLUGIN_ROOT + "/datapath/rbd+tapdisk/plugin.py")
# Directories the CMake tree has that belong to the system or to xapi-storage-script.
UNOWNED = {"/usr", "/usr/bin", "/usr/lib", "/usr/libexec", PLUGIN_ROOT,
           PLUGIN_ROOT + "/volume", PLUGIN_ROOT + "/datapath"}
# rpmlib() features the rpm of XCP-ng 8.3's dom0 (4.11) knows.
RPM_411_FEATURES = {"CompressedFileNames", "FileDigests", "PayloadFilesHavePrefix",
                    "PayloadIsXz", "PayloadIsBzip2", "PayloadIsLzma",
                    "VersionedDependencies", "ScriptletInterpreterArgs"}
CLASH_SECTION = "SR type clash with SMAPIv1 RBD drivers"

# The package is built where the project is developed (rpmbuild), not in the old-client root.
pytestmark = pytest.mark.skipif(not shutil.which("rpmbuild"), reason="no rpmbuild here")


def version():
    with open(os.path.join(ROOT, "libs", "xcp_rbd", "plugin.py")) as source:
        return re.search(r'^VERSION = "(.*)"$', source.read(), re.M).group(1)


@pytest.fixture(scope="module")
def package():
    out = subprocess.run([os.path.join(ROOT, "scripts", "rpm")], check=True,
                         env=dict(os.environ, XCP_RBD_RELEASE="1"),
                         stdout=subprocess.PIPE, universal_newlines=True).stdout
    path = out.strip().splitlines()[-1]
    assert os.path.isfile(path)
    return path


def query(package, *options):
    return subprocess.check_output(["rpm", "-qp"] + list(options) + [package],
                                   universal_newlines=True)


def rpm_in(root, *args):
    """rpm run on a scratch root (Debian's rpm wants --force-debian to install)."""
    force = ["--force-debian"] if "--force-debian" in subprocess.check_output(
        ["rpm", "--help"], universal_newlines=True) else []
    return subprocess.run(["rpm", "--root", root, "--nodeps"] + force + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)


def bare_root(path, systemctl=False, smapiv1_driver=False):
    """A root with nothing but a /bin/sh (and its libraries) and /dev for the scriptlets; with
    a systemctl that logs its arguments and says every unit is active; with a
    SMAPIv1 RBD driver."""
    shell = os.path.realpath("/bin/sh")
    libraries = re.findall(r"(/\S+) \(0x", subprocess.check_output(
        ["ldd", shell], universal_newlines=True))
    for source, target in [(shell, "/bin/sh")] + [(lib, lib) for lib in libraries]:
        os.makedirs(os.path.dirname(path + target), exist_ok=True)
        shutil.copy(source, path + target)
    os.mkdir(path + "/dev")  # the scriptlets' >/dev/null then makes a file there
    if systemctl:
        with open(path + "/bin/systemctl", "w") as script:
            script.write('#!/bin/sh\necho "$*" >> /systemctl.log\n')
        os.chmod(path + "/bin/systemctl", 0o755)
    if smapiv1_driver:
        os.makedirs(path + "/opt/xensource/sm")
        open(path + "/opt/xensource/sm/RBDSR.py", "w").close()
    return path


def entry(path):
    """What a tree comparison looks at: mode, and the link's target or the content."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "link", os.readlink(path)
    if stat.S_ISDIR(st.st_mode):
        return "dir", oct(stat.S_IMODE(st.st_mode))
    with open(path, "rb") as content:
        return "file", oct(stat.S_IMODE(st.st_mode)), content.read()


def tree(top):
    """{absolute path under top: entry} of everything below top."""
    found = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found["/" + os.path.relpath(path, top)] = entry(path)
    return found


@pytest.fixture(scope="module")
def cmake_tree(tmp_path_factory):
    destdir = str(tmp_path_factory.mktemp("cmake-destdir"))
    install_tree("/usr", python="/usr/bin/python3", destdir=destdir)
    return tree(destdir)


@pytest.fixture(scope="module")
def installed(package, tmp_path_factory):
    """The package installed (scriptlets run) in a root without systemctl or python3,
    next to a SMAPIv1 RBD driver."""
    root = bare_root(str(tmp_path_factory.mktemp("root")), smapiv1_driver=True)
    return root, rpm_in(root, "-i", package)


def test_header(package):
    assert query(package, "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}") == \
        "xcp-rbd %s 1 noarch" % version()
    assert os.path.basename(package) == "xcp-rbd-%s-1.noarch.rpm" % version()
    # EL7's rpm reads gzip, bzip2 and xz payloads, not zstd.
    assert query(package, "--qf", "%{PAYLOADCOMPRESSOR}") in ("gzip", "xz", "bzip2")


def test_requires_only_what_rpm_411_and_the_dom0_provide(package):
    requires = query(package, "--requires").splitlines()
    for line in requires:
        assert not line.startswith("(") and not re.search(r" (or|and|if|with) ", line), line
        assert "python(abi)" not in line and not re.search(r"python3\.\d", line), line
    features = {re.match(r"rpmlib\((\w+)\)", line).group(1)
                for line in requires if line.startswith("rpmlib(")}
    assert features <= RPM_411_FEATURES
    assert {line for line in requires if not line.startswith("rpmlib(")} == {
        "/bin/sh", "python3 >= 3.6", "librados2 >= 2:14.2.0", "librbd1 >= 2:14.2.0",
        "rbd-nbd >= 2:14.2.0"}


def test_scriptlets_restart_the_daemon_where_it_runs_and_warn_of_smapiv1(package):
    scripts = re.split(r"^(\w+) scriptlet \(using /bin/sh\):$",
                       query(package, "--scripts"), flags=re.M)
    scriptlets = dict(zip(scripts[1::2], scripts[2::2]))
    for name in ("postinstall", "postuninstall"):
        guard = scriptlets[name].index("systemctl is-active --quiet xapi-storage-script")
        assert scriptlets[name].index("systemctl restart xapi-storage-script") > guard
    assert "/opt/xensource/sm/" in scriptlets["preinstall"]
    assert CLASH_SECTION in scriptlets["preinstall"]


def test_install_in_a_bare_root_succeeds_and_warns_of_a_smapiv1_driver(installed):
    root, result = installed
    assert result.returncode == 0, result.stderr
    assert "SR type 'rbd' is claimed by both" in result.stderr
    assert "/opt/xensource/sm/RBDSR.py" in result.stderr
    assert CLASH_SECTION in result.stderr


def test_installed_tree_is_the_cmake_tree(package, installed, cmake_tree):
    root, _ = installed
    listed = set(query(package, "-l").splitlines())
    assert set(cmake_tree) - listed == UNOWNED
    assert listed <= set(cmake_tree)
    assert {path: entry(root + path) for path in listed} == \
        {path: cmake_tree[path] for path in listed}
    assert PYTHON_DIR + "/qemu/qmp/legacy.py" in listed
    assert PYTHON_DIR + "/xcp_rbd/volume_plugin.py" in listed
    assert not [path for path in listed if path.endswith(".pyc") or "__pycache__" in path
                or path.startswith(PYTHON_DIR + "/bin")]
    for script in PLUGIN_SCRIPTS:
        assert cmake_tree[script][2].startswith(b"#!/usr/bin/python3\n")
        assert cmake_tree[os.path.dirname(script) + "/Plugin.Query"] == ("link", "plugin.py")
    record, = [path for path in listed if path.endswith(".dist-info/RECORD")]
    lines = cmake_tree[record][2].decode().splitlines()
    assert lines and not [line for line in lines if line.startswith(("/", "../"))]


def test_installed_tree_imports_with_the_system_python(installed):
    root, _ = installed
    out = subprocess.check_output(
        ["/usr/bin/python3", "-I", "-B", "-c",
         "import sys; sys.path.insert(0, %r); import qemu.qmp.legacy, xcp_rbd.volume_plugin;"
         " print(qemu.qmp.legacy.__file__); print(xcp_rbd.volume_plugin.__file__)"
         % (root + PYTHON_DIR)], universal_newlines=True)
    assert [line.startswith(root + PYTHON_DIR + "/") for line in out.splitlines()] == \
        [True, True]


def test_install_and_erase_restart_a_running_daemon(package, tmp_path):
    root = bare_root(str(tmp_path), systemctl=True)
    for args in (["-i", package], ["-e", "xcp-rbd"]):
        result = rpm_in(root, *args)
        assert result.returncode == 0, result.stderr
    with open(root + "/systemctl.log") as log:
        assert log.read().splitlines() == [
            "is-active --quiet xapi-storage-script", "restart xapi-storage-script"] * 2
    assert not os.path.exists(root + "/usr/lib/xcp-rbd")
    assert "SR type 'rbd'" not in result.stderr
