"""The hypervisor's xenstore on ``<run dir>/xenstored.sock``: a thin asyncio driver of :class:`XenStore`.

Only the hypervisor's user may connect (``SO_PEERCRED``, as the control
socket).  Each connection's requests are answered in order; watch events go
to whichever connection registered the watch, as soon as the change is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct

from hvemu.xenstore import Outbox, XenStore, XsDecoder, XsError, socket_path

#: Unsent bytes (watch events, replies) a client may leave queued before it is hung up on.
WRITE_BUFFER_MAX = 4 << 20

log = logging.getLogger("hvemu.hypervisor.xenstored")

_UCRED = struct.Struct("iII")


class XenstoreServer:
    def __init__(self, run_dir: str) -> None:
        self.path = socket_path(run_dir)
        self.store = XenStore()
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._next_conn = 1
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # stale: the control socket's check said no hypervisor runs here
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers.values()):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def send(self, outbox: Outbox) -> None:
        """Deliver what a store operation produced (connections that went are skipped).

        A client that sets watches and never reads them would make the
        hypervisor hold its events without bound: past ``WRITE_BUFFER_MAX``
        unsent bytes it is hung up on (as xenstored drops a client whose
        watch events overflow).
        """
        for conn, msg in outbox:
            w = self._writers.get(conn)
            if w is not None and not w.is_closing():
                w.write(msg.encode())
                if w.transport.get_write_buffer_size() > WRITE_BUFFER_MAX:
                    log.warning("xenstore client %s reads none of its %d bytes of events: hung up on", conn,
                                w.transport.get_write_buffer_size())
                    w.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid != os.getuid():
                log.warning("xenstore: refused a connection from uid %d", uid)
                writer.close()
                return
        conn = self._next_conn
        self._next_conn += 1
        self._writers[conn] = writer
        decoder = XsDecoder()
        try:
            while data := await reader.read(65536):
                try:
                    msgs = decoder.feed(data)
                except XsError as exc:
                    log.warning("xenstore connection %d: %s; closing it", conn, exc)
                    return
                for msg in msgs:
                    self.send(self.store.handle(conn, msg))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.store.disconnect(conn)
            self._writers.pop(conn, None)
            writer.close()
