"""systemd-run --scope (systemd 219 src/run/run.c): asks systemd for a transient
scope unit holding its own pid, then execs the command, which therefore runs,
with whatever it forks, in that unit's cgroup of the name=systemd hierarchy
(the slice's directory, then <unit>.scope). Here the stand-in does systemd's
part itself under XCP_RBD_FAKE_CGROUP, the hierarchy's root for the test. A
unit name in use fails ("Unit ... already exists", exit 1)."""

import os
import sys

from standins import kernel


def _parse(argv):
    options, index = {}, 0
    while index < len(argv) and argv[index].startswith("-"):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if arg == "--scope":
            options["scope"] = True
        elif "=" in arg:
            key, _, value = arg.partition("=")
            options[key] = value
        else:
            options[arg] = argv[index + 1]
            index += 1
        index += 1
    return options, argv[index:]


def main(argv):
    kernel.journal(["systemd-run"] + argv)
    options, command = _parse(argv)
    if not options.get("scope") or not command:
        sys.stderr.write("systemd-run: the stand-in knows --scope only\n")
        return 1
    unit = options["--unit"] + ".scope"
    slice_dir = os.path.join(os.environ["XCP_RBD_FAKE_CGROUP"],
                             options.get("--slice", "system.slice"))
    scope = os.path.join(slice_dir, unit)
    if os.path.isdir(scope):
        with open(os.path.join(scope, "cgroup.procs")) as stream:
            if stream.read().strip():
                sys.stderr.write("Failed to start transient scope unit: Unit %s already "
                                 "exists.\n" % unit)
                return 1
        os.rmdir(scope)  # systemd collects a scope whose processes have all gone
    os.makedirs(scope)
    with open(os.path.join(scope, "cgroup.procs"), "w") as stream:
        stream.write(str(os.getpid()))
    sys.stderr.write("Running scope as unit %s.\n" % unit)
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write("Failed to execute: %s\n" % exc)
        return 1
