"""A xenstore of the hypervisor's own: the path tree, its watches and Xen's wire protocol, sans-I/O.

Xen's tools find their domains' settings in xenstore (``xenpaging`` watches
``/local/domain/<id>/memory/target-tot_pages`` and ``@releaseDomain``), so the
hypervisor keeps one and serves it on ``xenstored.sock`` in its run directory
with xenstored's own wire protocol (``public/io/xs_wire.h``): a 16-byte header
``struct xsd_sockmsg { u32 type, req_id, tx_id, len; }`` then ``len`` bytes of
NUL-separated strings.  Errors are ``XS_ERROR`` with the errno's name.

:class:`XenStore` is the tree and the watches: every operation returns what
must be sent, to whom (the reply and any watch events it fired), so no caller
can forget to deliver an event.  :class:`XsDecoder` de-frames bytes.
:class:`XsClient` is a small blocking client (``hvemu xenstore``).  What is
left out: transactions (``XS_TRANSACTION_START`` answers ``ENOSYS``) and
permissions (everything is readable and writable by the hypervisor's user,
the only one who can reach the socket).
"""

from __future__ import annotations

import enum
import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("hvemu.xenstore")

SOCKET_NAME = "xenstored.sock"
#: ``XENSTORE_PAYLOAD_MAX``.
PAYLOAD_MAX = 4096
_HEADER = struct.Struct("<IIII")
HEADER_SIZE = _HEADER.size
#: The special watch paths (no node behind them).
RELEASE_DOMAIN = "@releaseDomain"
INTRODUCE_DOMAIN = "@introduceDomain"
#: Where a domain's own keys live.
DOMAIN_PATH = "/local/domain/{domid}"
#: xenpaging's "flush-cache" goes here (``/local/domain/0/device-model/<id>/command``).
DEVICE_MODEL_COMMAND = "/local/domain/0/device-model/{domid}/command"


class XsType(enum.IntEnum):
    """``enum xsd_sockmsg_type``."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


@dataclass(frozen=True)
class XsMsg:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload


class XsError(Exception):
    """A request xenstored refuses: ``errno`` is the name sent back (``ENOENT``, ``EINVAL``...)."""

    def __init__(self, errno: str, message: str = "") -> None:
        super().__init__(f"{errno}: {message}" if message else errno)
        self.errno = errno


class XsDecoder:
    """Feed bytes, get whole messages back; a frame over ``PAYLOAD_MAX`` raises :class:`XsError`."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[XsMsg]:
        self._buf += data
        out: list[XsMsg] = []
        while len(self._buf) >= HEADER_SIZE:
            kind, req_id, tx_id, length = _HEADER.unpack_from(self._buf, 0)
            if length > PAYLOAD_MAX:
                raise XsError("E2BIG", f"a {length}-byte payload exceeds {PAYLOAD_MAX}")
            if len(self._buf) < HEADER_SIZE + length:
                break
            out.append(XsMsg(kind, req_id, tx_id, bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])))
            del self._buf[:HEADER_SIZE + length]
        return out


def watch_event(path: str, token: str) -> XsMsg:
    return XsMsg(XsType.WATCH_EVENT, 0, 0, path.encode() + b"\0" + token.encode() + b"\0")


def _strings(payload: bytes) -> list[str]:
    """The NUL-terminated strings of a payload (a missing last NUL is tolerated)."""
    parts = payload.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    try:
        return [p.decode() for p in parts]
    except UnicodeDecodeError:
        raise XsError("EINVAL", "paths and tokens are UTF-8") from None


def _is_under(path: str, watched: str) -> bool:
    """Does a change to ``path`` fire a watch on ``watched`` (the node or anything below it)?"""
    return path == watched or path.startswith(watched.rstrip("/") + "/")


#: What a call produces: (connection, message) pairs to send, in order.
Outbox = list[tuple[int, XsMsg]]


class XenStore:
    """The tree (path -> value) and the watches (connection, path, token), with no I/O.

    ControlClient ids are the caller's; id 0 is the hypervisor itself (it never
    receives anything).  Relative paths are relative to ``/local/domain/0``,
    the toolstack's domain, as xenstored resolves them for dom0's tools.
    """

    HYPERVISOR = 0

    def __init__(self) -> None:
        self.nodes: dict[str, bytes] = {"/": b"", "/local": b"", "/local/domain": b""}
        self.watches: list[tuple[int, str, str]] = []
        self.domains: set[int] = set()
        #: Writes to a device model's command path (domid, value), newest last, for the curious.
        self.device_model_commands: list[tuple[int, str]] = []

    # ------------------------------------------------------------ paths
    @staticmethod
    def canonical(path: str) -> str:
        if path.startswith("@"):
            if path not in (RELEASE_DOMAIN, INTRODUCE_DOMAIN):
                raise XsError("EINVAL", f"no special path {path!r}")
            return path
        if not path.startswith("/"):
            path = "/local/domain/0/" + path
        if "//" in path or (len(path) > 1 and path.endswith("/")) or len(path) > 3072:
            raise XsError("EINVAL", f"bad path {path!r}")
        return path

    def _children(self, path: str) -> list[str]:
        prefix = "/" if path == "/" else path + "/"
        return sorted({p[len(prefix):].split("/", 1)[0] for p in self.nodes
                       if p.startswith(prefix) and p != prefix and p != "/"})

    def _subtree(self, path: str) -> Iterator[str]:
        prefix = path + "/"
        for p in list(self.nodes):
            if p == path or p.startswith(prefix):
                yield p

    def _fire(self, path: str, *, removed: bool = False) -> Outbox:
        """Events for a change of ``path``: watches on it or above it; a removal also fires watches below."""
        out: Outbox = []
        for conn, watched, token in self.watches:
            if conn == self.HYPERVISOR:
                continue
            if watched.startswith("@") or path.startswith("@"):
                hit = watched == path
            else:
                hit = _is_under(path, watched) or (removed and _is_under(watched, path))
            if hit:
                out.append((conn, watch_event(path, token)))
        return out

    # ------------------------------------------------------------ operations (raise XsError)
    def read(self, path: str) -> bytes:
        path = self.canonical(path)
        if path not in self.nodes:
            raise XsError("ENOENT", path)
        return self.nodes[path]

    def directory(self, path: str) -> list[str]:
        path = self.canonical(path)
        if path not in self.nodes:
            raise XsError("ENOENT", path)
        return self._children(path)

    def write(self, path: str, value: bytes) -> Outbox:
        path = self.canonical(path)
        if path.startswith("@"):
            raise XsError("EINVAL", f"{path} is not a node")
        parts = path.split("/")
        for i in range(2, len(parts)):
            self.nodes.setdefault("/".join(parts[:i]), b"")
        self.nodes[path] = bytes(value)
        self._note_command(path, value)
        return self._fire(path)

    def mkdir(self, path: str) -> Outbox:
        path = self.canonical(path)
        if path in self.nodes:
            return []
        return self.write(path, b"")

    def rm(self, path: str) -> Outbox:
        path = self.canonical(path)
        if path not in self.nodes or path in ("/", "/local", "/local/domain"):
            raise XsError("ENOENT" if path not in self.nodes else "EINVAL", path)
        for p in self._subtree(path):
            del self.nodes[p]
        return self._fire(path, removed=True)

    def watch(self, conn: int, path: str, token: str) -> Outbox:
        """Add a watch; as xenstored, it fires once at once (``path`` and ``token``)."""
        path = self.canonical(path)
        if (conn, path, token) in self.watches:
            raise XsError("EEXIST", f"watch {path} {token}")
        self.watches.append((conn, path, token))
        return [(conn, watch_event(path, token))]

    def unwatch(self, conn: int, path: str, token: str) -> None:
        path = self.canonical(path)
        try:
            self.watches.remove((conn, path, token))
        except ValueError:
            raise XsError("ENOENT", f"no watch {path} {token}") from None

    def disconnect(self, conn: int) -> None:
        self.watches = [w for w in self.watches if w[0] != conn]

    def _note_command(self, path: str, value: bytes) -> None:
        parts = path.split("/")
        if len(parts) == 7 and parts[:5] == ["", "local", "domain", "0", "device-model"] \
                and parts[6] == "command" and parts[5].isdigit():
            text = value.decode(errors="replace")
            self.device_model_commands.append((int(parts[5]), text))
            del self.device_model_commands[:-16]
            log.info("device model of domain %s asked to %r (accepted: hvemu has no device model cache)",
                     parts[5], text)

    # ------------------------------------------------------------ the hypervisor's own writes
    def introduce_domain(self, domid: int, name: str, target_kib: int, max_kib: int) -> Outbox:
        base = DOMAIN_PATH.format(domid=domid)
        out: Outbox = []
        out += self.write(f"{base}/name", (name or f"domain{domid}").encode())
        out += self.write(f"{base}/domid", str(domid).encode())
        out += self.write(f"{base}/memory/static-max", str(max_kib).encode())
        out += self.write(f"{base}/memory/target", str(target_kib).encode())
        self.domains.add(domid)
        return out + self._fire(INTRODUCE_DOMAIN)

    def release_domain(self, domid: int) -> Outbox:
        self.domains.discard(domid)
        base = DOMAIN_PATH.format(domid=domid)
        out = self.rm(base) if base in self.nodes else []
        dm = f"/local/domain/0/device-model/{domid}"
        if dm in self.nodes:
            out += self.rm(dm)
        return out + self._fire(RELEASE_DOMAIN)

    def set_target(self, domid: int, target_kib: int) -> Outbox:
        """What ``xl mem-set`` writes (``memory/target``), and the key xenpaging follows."""
        base = DOMAIN_PATH.format(domid=domid)
        return (self.write(f"{base}/memory/target", str(target_kib).encode())
                + self.write(f"{base}/memory/target-tot_pages", str(target_kib).encode()))

    # ------------------------------------------------------------ the wire
    def handle(self, conn: int, msg: XsMsg) -> Outbox:
        """Answer one request from ``conn``: its reply first, then the watch events it fired."""
        try:
            reply, events = self._dispatch(conn, msg)
        except XsError as exc:
            return [(conn, XsMsg(XsType.ERROR, msg.req_id, msg.tx_id, exc.errno.encode() + b"\0"))]
        return [(conn, XsMsg(msg.type, msg.req_id, msg.tx_id, reply)), *events]

    def _dispatch(self, conn: int, msg: XsMsg) -> tuple[bytes, Outbox]:
        args = _strings(msg.payload)
        kind = msg.type
        if msg.tx_id != 0:
            raise XsError("ENOSYS", "transactions are not modelled")

        def one() -> str:
            if len(args) != 1:
                raise XsError("EINVAL", f"{XsType(kind).name} takes one argument")
            return args[0]

        if kind == XsType.READ:
            return self.read(one()), []
        if kind == XsType.DIRECTORY:
            return b"".join(c.encode() + b"\0" for c in self.directory(one())), []
        if kind == XsType.WRITE:
            path, _, value = msg.payload.partition(b"\0")
            return b"OK\0", self.write(path.decode(errors="replace"), value)
        if kind == XsType.MKDIR:
            return b"OK\0", self.mkdir(one())
        if kind == XsType.RM:
            return b"OK\0", self.rm(one())
        if kind == XsType.WATCH:
            if len(args) != 2:
                raise XsError("EINVAL", "XS_WATCH takes a path and a token")
            return b"OK\0", self.watch(conn, args[0], args[1])
        if kind == XsType.UNWATCH:
            if len(args) != 2:
                raise XsError("EINVAL", "XS_UNWATCH takes a path and a token")
            self.unwatch(conn, args[0], args[1])
            return b"OK\0", []
        if kind == XsType.GET_DOMAIN_PATH:
            domid = _domid(one())
            return DOMAIN_PATH.format(domid=domid).encode() + b"\0", []
        if kind == XsType.IS_DOMAIN_INTRODUCED:
            domid = _domid(one())
            return (b"T\0" if domid == 0 or domid in self.domains else b"F\0"), []
        if kind == XsType.RESET_WATCHES:
            self.disconnect(conn)
            return b"OK\0", []
        if kind in (XsType.GET_PERMS, XsType.SET_PERMS):
            if kind == XsType.GET_PERMS:
                self.read(one())
                return b"n0\0", []
            return b"OK\0", []
        raise XsError("ENOSYS", f"operation {kind} is not modelled")


def _domid(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise XsError("EINVAL", f"domid {text!r}") from None
    if not 0 <= value < 0x7FF0:
        raise XsError("EINVAL", f"domid {text!r}")
    return value


def socket_path(run_dir: str) -> str:
    import os

    return os.path.join(run_dir, SOCKET_NAME)


class XsClient:
    """A blocking client of the hypervisor's xenstore (what ``hvemu xenstore`` uses)."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._decoder = XsDecoder()
        self._pending: list[XsMsg] = []
        self._events: list[XsMsg] = []
        self._req = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> XsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self) -> XsMsg:
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("xenstore closed the connection")
            self._pending += self._decoder.feed(data)
        return self._pending.pop(0)

    def request(self, kind: XsType, payload: bytes) -> bytes:
        self._req += 1
        self.sock.sendall(XsMsg(kind, self._req, 0, payload).encode())
        while True:
            msg = self._next()
            if msg.type == XsType.WATCH_EVENT:
                self._events.append(msg)
                continue
            if msg.type == XsType.ERROR:
                raise XsError(msg.payload.rstrip(b"\0").decode(errors="replace"))
            return msg.payload

    def read(self, path: str) -> bytes:
        return self.request(XsType.READ, path.encode() + b"\0")

    def write(self, path: str, value: bytes) -> None:
        self.request(XsType.WRITE, path.encode() + b"\0" + value)

    def rm(self, path: str) -> None:
        self.request(XsType.RM, path.encode() + b"\0")

    def directory(self, path: str) -> list[str]:
        return _strings(self.request(XsType.DIRECTORY, path.encode() + b"\0"))

    def watch(self, path: str, token: str) -> None:
        self.request(XsType.WATCH, path.encode() + b"\0" + token.encode() + b"\0")

    def read_watch(self) -> tuple[str, str]:
        """The next watch event, ``(path, token)`` (blocks)."""
        msg = self._events.pop(0) if self._events else None
        while msg is None:
            m = self._next()
            if m.type == XsType.WATCH_EVENT:
                msg = m
        path, token = (_strings(msg.payload) + ["", ""])[:2]
        return path, token
