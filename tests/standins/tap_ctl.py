"""tap-ctl (blktap v3.55.5 control/tap-ctl*.c): `spawn` prints the new
tapdisk's pid; `allocate` prints /dev/xen/blktap-2/tapdev<minor>; attach,
open (-a type:path, -R, -2 secondary), pause, unpause (-2), close, destroy
(close + detach + free), stats (JSON) and list (`pid=N minor=M state=0x...
args=...`) talk to the tapdisk over its control socket. Errors go to stderr
("<command> failed: ..."), with the errno as the exit status."""

import json
import os
import socket
import subprocess
import sys
import time

from standins import kernel, tapdisk

SPAWN_TIMEOUT = 10


def _options(args):
    options, index = {}, 0
    while index < len(args):
        if args[index] == "-R":
            options["-R"] = True
        else:
            options[args[index]] = args[index + 1]
            index += 1
        index += 1
    return options


def _send(pid, message):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(tapdisk.CONTROL, "ctl%d" % pid))
    except OSError as exc:
        raise tapdisk.ControlError(exc.errno, "couldn't connect to tapdisk %d: %s"
                                   % (pid, exc.strerror))
    with sock, sock.makefile("rw") as stream:
        stream.write(json.dumps(message) + "\n")
        stream.flush()
        line = stream.readline()
    if not line:
        raise tapdisk.ControlError(5, "tapdisk %d closed the connection" % pid)
    reply = json.loads(line)
    if reply["error"]:
        raise tapdisk.ControlError(reply["error"], reply["message"])
    return reply["result"]


def spawn():
    launcher = os.path.join(os.path.dirname(sys.argv[0]), "tapdisk")
    process = subprocess.Popen([sys.executable, launcher], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # tapdisk's daemon(0, 0)
    deadline = time.time() + SPAWN_TIMEOUT
    while not os.path.exists(os.path.join(tapdisk.CONTROL, "ctl%d" % process.pid)):
        if process.poll() is not None or time.time() > deadline:
            raise tapdisk.ControlError(5, "tapdisk did not start")
        time.sleep(0.01)
    print(process.pid)


def run(command, args):
    options = _options(args)
    pid, minor = int(options.get("-p", 0)), int(options.get("-m", -1))
    if command == "spawn":
        return spawn()
    if command == "allocate":
        print("/dev/xen/blktap-2/tapdev%d" % kernel.count("minor"))
    elif command == "free":
        pass
    elif command == "attach":
        _send(pid, {"op": "attach", "minor": minor})
    elif command == "open":
        _send(pid, {"op": "open", "minor": minor, "params": options["-a"],
                    "read_only": options.get("-R", False), "secondary": options.get("-2")})
    elif command in ("pause", "close", "detach"):
        _send(pid, {"op": command, "minor": minor})
    elif command == "unpause":
        _send(pid, {"op": "unpause", "minor": minor, "params": options.get("-a"),
                    "secondary": options.get("-2")})
    elif command == "destroy":
        _send(pid, {"op": "detach", "minor": minor})
    elif command == "stats":
        print(json.dumps(_send(pid, {"op": "stats", "minor": minor})))
    elif command == "list":
        for name in sorted(os.listdir(tapdisk.CONTROL)):
            if name.startswith("ctl") and name[3:].isdigit():
                for vbd_minor, state, params in _send(int(name[3:]), {"op": "list"}):
                    print("pid=%s minor=%d state=0x%08x args=%s"
                          % (name[3:], vbd_minor, state, params or ""))
    else:
        raise tapdisk.ControlError(22, "unknown command")


def main(argv):
    kernel.journal(["tap-ctl"] + argv)
    try:
        run(argv[0], argv[1:])
    except tapdisk.ControlError as exc:
        sys.stderr.write("%s failed: %s\n" % (argv[0], exc))
        return exc.code or 1
    return 0
