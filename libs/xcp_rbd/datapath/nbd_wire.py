"""The NBD protocol, as far as the datapath speaks it itself (the mirror relay,
relay.py): fixed newstyle handshakes and simple replies, one request at a time.

dom0 has no NBD library for Python, and the part needed is small (the NBD
protocol document, "doc/proto.md" of the NBD project):

- serve_handshake: the server side, accepting any export name, through
  NBD_OPT_EXPORT_NAME (tapdisk's client, which names its export
  "tapdisk_client" with a trailing NUL) or NBD_OPT_GO / NBD_OPT_INFO;
- client_handshake: the client side, NBD_OPT_GO with the export's name;
- Connection: requests and simple replies on a negotiated socket.
"""

import socket
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP = 2 ** 31 + 1
INFO_EXPORT = 0
TRANSMISSION_HAS_FLAGS, TRANSMISSION_READ_ONLY, TRANSMISSION_SEND_FLUSH = 1, 2, 4
TRANSMISSION_SEND_TRIM = 32
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
EIO = 5

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class NbdError(Exception):
    """The peer broke the protocol, went away, or answered a request with an error."""


class RequestFailed(NbdError):
    """The server answered a request with an error (the connection stays usable)."""


def recv_exact(sock, length):
    data = bytearray()
    while len(data) < length:
        chunk = sock.recv(min(length - len(data), 1 << 20))
        if not chunk:
            raise NbdError("the peer closed the connection")
        data += chunk
    return bytes(data)


def _option_reply(sock, option, kind, data=b""):
    sock.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, kind, len(data)) + data)


def serve_handshake(sock, size, flags):
    """The server's side, up to transmission; returns the export name asked for."""
    sock.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT,
                                        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    [client_flags] = struct.unpack(">I", recv_exact(sock, 4))
    flags |= TRANSMISSION_HAS_FLAGS
    while True:
        magic, option, length = struct.unpack(">QII", recv_exact(sock, 16))
        if magic != IHAVEOPT:
            raise NbdError("not an NBD client")
        data = recv_exact(sock, length)
        if option == OPT_EXPORT_NAME:
            sock.sendall(struct.pack(">QH", size, flags)
                         + (b"" if client_flags & FLAG_NO_ZEROES else bytes(124)))
            return data
        if option in (OPT_GO, OPT_INFO):
            _option_reply(sock, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))
            _option_reply(sock, option, REP_ACK)
            if option == OPT_GO:
                [name_length] = struct.unpack(">I", data[:4])
                return data[4:4 + name_length]
        elif option == OPT_ABORT:
            _option_reply(sock, option, REP_ACK)
            raise NbdError("the client aborted the handshake")
        else:
            _option_reply(sock, option, REP_ERR_UNSUP)


def client_handshake(sock, export):
    """The client's side with NBD_OPT_GO; returns (size, transmission flags)."""
    if recv_exact(sock, 8) != NBDMAGIC or struct.unpack(
            ">Q", recv_exact(sock, 8))[0] != IHAVEOPT:
        raise NbdError("not a newstyle NBD server")
    [server_flags] = struct.unpack(">H", recv_exact(sock, 2))
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise NbdError("the NBD server does not speak fixed newstyle")
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)))
    name = export.encode("utf-8")
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    size = flags = None
    while True:
        magic, _, kind, length = struct.unpack(">QIII", recv_exact(sock, 20))
        payload = recv_exact(sock, length)
        if magic != OPTION_REPLY_MAGIC:
            raise NbdError("not an NBD option reply")
        if kind == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
            size, flags = struct.unpack(">QH", payload[2:12])
        elif kind == REP_ACK and size is not None:
            return size, flags
        elif kind & 2 ** 31:
            raise NbdError("the NBD server refused export %r: %s" % (
                export, payload.decode("utf-8", "replace") or "error %d" % (kind - 2 ** 31)))


class Connection(object):
    """Requests and simple replies on a socket past its handshake."""

    def __init__(self, sock, size=None, flags=0):
        self.sock = sock
        self.size = size
        self.flags = flags
        self._handle = 0

    @classmethod
    def connect_unix(cls, path, export):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            size, flags = client_handshake(sock, export)
        except (OSError, NbdError):
            sock.close()
            raise
        return cls(sock, size, flags)

    # The client's side.
    def request(self, command, offset=0, length=0, data=b""):
        """One request, waiting for its reply: the data read, or NbdError."""
        self._handle += 1
        self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, command, self._handle, offset,
                                        len(data) or length) + data)
        if command == CMD_DISC:
            return b""
        magic, error, handle = _REPLY.unpack(recv_exact(self.sock, _REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdError("unexpected NBD reply")
        if error:
            raise RequestFailed("the NBD server answered error %d" % error)
        return recv_exact(self.sock, length) if command == CMD_READ else b""

    def pwrite(self, data, offset):
        self.request(CMD_WRITE, offset, data=data)

    def flush(self):
        self.request(CMD_FLUSH)

    # The server's side.
    def next_request(self):
        """(command, handle, offset, length, data) of the client's next request."""
        magic, _, command, handle, offset, length = _REQUEST.unpack(
            recv_exact(self.sock, _REQUEST.size))
        if magic != REQUEST_MAGIC:
            raise NbdError("not an NBD request")
        data = recv_exact(self.sock, length) if command == CMD_WRITE else b""
        return command, handle, offset, length, data

    def reply(self, handle, error=0, data=b""):
        self.sock.sendall(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data)

    def disconnect(self):
        """The client's goodbye (the server then closes), or just the close."""
        try:
            self.request(CMD_DISC)
        except (OSError, NbdError):
            pass  # a peer already gone
        self.sock.close()
