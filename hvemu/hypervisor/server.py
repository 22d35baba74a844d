"""The control socket's server: :class:`ControlServer`, one task per connection, one reply per request.

Only the hypervisor (and tests' toy servers) load this module.  Every task it
starts lives in one :class:`asyncio.TaskGroup` that ``async with
ControlServer(...)`` enters and leaves in its caller's task: the accept loop
and, per connection, a task whose reader and worker are a task group of
their own.  A connection that fails (a bug in serving it) is logged with its
traceback and closed, and the others go on; a failure of the accept loop
itself ends the group, and with it the caller's ``async with`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import msgspec

from hvemu import protocol
from hvemu.abi import Errno
from hvemu.buffer_budget import BufferBudget
from hvemu.fdpass import FdLike, close_fds, hung_up, peer_credentials, raw_fds, release_fds
from hvemu.framing import Frame
from hvemu.protocol import HEADER_SIZE, MAX_FRAME, Msg, ProtocolError
from hvemu.stream import RECV_SIZE, FramedStream

log = logging.getLogger("hvemu.hypervisor.server")

#: Bytes of requests a server holds for all its clients at once (partial frames,
#: and complete ones not yet served): past it, no client brings in the OOM killer.
MAX_BUFFERED = 32 << 20
#: How often a connection whose peer half-closed is checked for a full hang-up.
HANGUP_POLL = 0.25


def errno_of(exc: BaseException) -> Errno:
    """The errno name to answer for an exception a handler raised.

    The exception's ``errno`` attribute when it is an errno name (or an int
    whose name is one), else ``ENOMEM`` for :class:`MemoryError`, ``ENOSYS`` for
    :class:`NotImplementedError`, ``EPERM`` for :class:`PermissionError`,
    ``ENOENT`` for :class:`FileNotFoundError`, and ``EINVAL`` for everything else
    (``ValueError``, ``TypeError``, ``KeyError``... and bugs).
    """
    code = getattr(exc, "errno", None)
    if isinstance(code, Errno):
        return code
    if isinstance(code, str) and code in Errno.__members__:
        return Errno(code)
    if isinstance(code, int):
        name = _errno.errorcode.get(code)
        if name is not None and name in Errno.__members__:
            return Errno(name)
    for kind, name in ((MemoryError, Errno.ENOMEM), (NotImplementedError, Errno.ENOSYS),
                       (PermissionError, Errno.EPERM), (FileNotFoundError, Errno.ENOENT)):
        if isinstance(exc, kind):
            return name
    return Errno.EINVAL


class ConnState:
    """What the server knows about one connection; a server's owner may know more in a subclass (``new_state``)."""

    _ids = itertools.count(1)

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        #: A number unique within the process.
        self.id = next(self._ids)
        #: Peer credentials read with ``SO_PEERCRED`` on accept.
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.connected_at = time.monotonic()
        self.requests = 0
        #: The task serving this connection (see :meth:`ControlServer.disconnect`).
        self.task: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"<ConnState #{self.id} pid={self.pid} uid={self.uid}>"


Reply = tuple[Msg, Sequence[FdLike]]
Handler = Callable[[ConnState, Msg], Awaitable[Reply]]


class _End(NamedTuple):
    """Queue item: no more requests; answer ``error`` (if any) then close."""

    error: ProtocolError | None


class _HungUp(Exception):
    pass


_Queue = asyncio.Queue[Frame | _End]


class ControlServer:
    """Serve framed requests on a Unix stream socket at ``path``.

    ``handler(state, msg)`` is awaited for every decoded request and returns
    ``(reply, fds)``; ``fds`` items are lent ``int`` fds or objects with
    ``fileno()``/``close()`` that the server closes once sent (see
    :data:`FdLike`).  The reply's ``fds`` field, if any, must name as many fds
    as are given.

    Per connection: requests are answered one at a time, in order (a slow
    handler delays only its own connection).  A frame that does not decode is
    answered ``Error(EINVAL)`` and the connection goes on; an oversized length
    prefix (the stream can no longer be trusted), or EOF inside a frame when
    the peer only shut down writing, is answered ``Error(EINVAL)`` then the
    connection is closed.  A request that carries fds is refused (``EINVAL``).
    A handler exception becomes an ``Error`` whose errno is
    :func:`errno_of` the exception, and is logged.  When the peer hangs up
    (closes both directions) the request in progress is cancelled and queued
    ones are dropped; if it only shut down writing, the requests already
    received are answered first.

    ``check_peer(uid) -> bool`` runs on accept with the peer's ``SO_PEERCRED``
    uid; a refused peer gets ``Error(EPERM)`` and is closed (and is never seen
    by ``handler``/``on_disconnect``).  ``on_disconnect(state)`` is called once
    for every accepted connection when it ends, including at server close.

    Lifetime: ``async with ControlServer(...) as server``, and nothing else:
    every task the server starts lives in the task group it enters there (the
    accept loop; under it, a task group of the connections, each with its
    reader and worker).  :meth:`close` (idempotent, also done on leaving)
    cancels them all, closes the listening socket and removes the socket
    file.  :meth:`fail` ends the server with an error, raised out of the
    ``async with`` (the body is cancelled first), for what its owner learns
    outside any task (a reader callback, see :mod:`hvemu.readiness`).
    """

    def __init__(self, path: str, handler: Handler, *,
                 on_disconnect: Callable[[ConnState], object] | None = None,
                 new_state: Callable[[int, int, int], ConnState] = ConnState,
                 check_peer: Callable[[int], bool] | None = None,
                 backlog: int = 128, mode: int = 0o600, max_frame: int = MAX_FRAME,
                 queue_depth: int = 64, max_buffered: int = MAX_BUFFERED) -> None:
        self.path = path
        self._handler = handler
        self._on_disconnect = on_disconnect
        #: Makes each connection's state from the peer's pid, uid and gid (the one object per connection).
        self._new_state = new_state
        self._check_peer = check_peer
        self._backlog = backlog
        self._mode = mode
        self._max_frame = max_frame
        self._queue_depth = queue_depth
        #: Request bytes held for all connections, and for each (see :mod:`hvemu.buffer_budget`);
        #: the total always leaves room for one frame of the largest size.
        self.buffers = BufferBudget(max(max_buffered, max_frame + HEADER_SIZE + RECV_SIZE), 2 * max_frame)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None
        self._conns: dict[int, ConnState] = {}

    def disconnect(self, state: ConnState) -> None:
        """Close one connection from the server's side (``on_disconnect`` still runs for it).

        The request in progress on it, if any, is cancelled.  A handler may not
        disconnect its own connection this way (it would cancel itself).
        """
        task = state.task
        if task is None or task.done():
            return
        if task is asyncio.current_task():
            raise RuntimeError("a handler cannot disconnect its own connection")
        task.cancel()

    # ------------------------------------------------------------ lifetime
    @property
    def connections(self) -> list[ConnState]:
        """The connections being served now."""
        return list(self._conns.values())

    @property
    def serving(self) -> bool:
        return self._main is not None and not self._main.done()

    async def __aenter__(self) -> ControlServer:
        if self._main is not None:
            raise RuntimeError("ControlServer already started")
        self._listener = self._bind()
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        self._main = tg.create_task(self._run(), name=f"control-server {self.path}")
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            await self.close()
        finally:
            if tg is not None:
                await tg.__aexit__(et, ev, tb)  # raises what fail() gave it, with the body's error
        return None

    async def close(self) -> None:
        """Stop accepting, cancel every connection, remove the socket file (idempotent)."""
        main = self._main
        if main is not None and not main.done():
            main.cancel()
            await asyncio.wait({main})
        self._unbind()

    def fail(self, exc: BaseException) -> None:
        """End the server with ``exc``: its task group cancels the ``async with`` body and raises it."""
        tg = self._tg
        if tg is None:  # not serving, or already stopping: nothing left to end
            return

        async def failed() -> None:
            raise exc

        tg.create_task(failed(), name=f"control-server {self.path}: failed")

    def _bind(self) -> socket.socket:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.setblocking(False)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing stale socket %s", path)
                os.unlink(path)
            except BlockingIOError:
                raise RuntimeError(f"a server is already listening on {path}") from None
            else:
                raise RuntimeError(f"a server is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under a private name first, then renamed into place: a
        # client that sees the socket file can connect (no ECONNREFUSED before listen).
        # The name is no longer than the real one (a socket path has at most 107 bytes).
        staging = os.path.join(os.path.dirname(path), f".{os.getpid()}")
        if len(staging) > len(path):
            staging = path
        try:
            sock.setblocking(False)
            if staging != path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
            sock.bind(staging)
            try:
                os.chmod(staging, self._mode)
                sock.listen(self._backlog)
                if staging != path:
                    os.rename(staging, path)
                st = os.stat(path)
                self._inode = (st.st_dev, st.st_ino)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
                raise
        except BaseException:
            sock.close()
            raise
        return sock

    def _unbind(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()
        if self._inode is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._inode = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        assert listener is not None
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    try:
                        sock, _ = await loop.sock_accept(listener)
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except Exception as exc:
                        # EMFILE, ENFILE, ENOBUFS...: back off, keep serving.
                        log.error("accept on %s failed: %s", self.path, exc)
                        await asyncio.sleep(0.1)
                        continue
                    tg.create_task(self._serve(sock))
        finally:
            self._unbind()

    # ------------------------------------------------------------ per connection
    async def _serve(self, sock: socket.socket) -> None:
        state: ConnState | None = None
        stream: FramedStream | None = None
        try:
            pid, uid, gid = peer_credentials(sock)
            stream = FramedStream(sock, max_frame=self._max_frame, max_fds=0, budget=self.buffers)
            if self._check_peer is not None and not self._check_peer(uid):
                log.warning("refusing connection from pid %d uid %d", pid, uid)
                err = protocol.Error(errno=Errno.EPERM, message=f"uid {uid} may not use this control socket")
                await asyncio.wait_for(stream.send(protocol.encode(err)), 5)
                stream.discard_input()
                return
            state = self._new_state(pid, uid, gid)
            state.task = asyncio.current_task()
            self._conns[state.id] = state
            log.debug("connection %s", state)
            await self._serve_conn(state, stream)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection %s failed", state)
        finally:
            if stream is not None:
                stream.close()
            else:
                sock.close()
            if state is not None:
                self._conns.pop(state.id, None)
                log.debug("disconnected %s", state)
                if self._on_disconnect is not None:
                    try:
                        self._on_disconnect(state)
                    except Exception:
                        log.exception("on_disconnect(%s) failed", state)

    async def _serve_conn(self, state: ConnState, stream: FramedStream) -> None:
        queue: _Queue = asyncio.Queue(self._queue_depth)
        try:
            async with asyncio.TaskGroup() as tg:  # the first of the two to end ends the other
                reader = tg.create_task(self._reader(stream, queue), name=f"conn#{state.id} reader")
                worker = tg.create_task(self._worker(state, stream, queue), name=f"conn#{state.id} worker")
                reader.add_done_callback(lambda _: worker.cancel())
                worker.add_done_callback(lambda _: reader.cancel())
        finally:
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, Frame):
                    close_fds(item.fds)

    async def _put(self, stream: FramedStream, queue: _Queue, item: Frame | _End) -> None:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        while True:  # a pipelining client: wait for room, but notice a hang-up meanwhile
            try:
                await asyncio.wait_for(queue.put(item), HANGUP_POLL)
                return
            except TimeoutError:
                if stream.sock is None or hung_up(stream.sock):
                    if isinstance(item, Frame):
                        close_fds(item.fds)
                    raise _HungUp() from None

    async def _reader(self, stream: FramedStream, queue: _Queue) -> None:
        """Feed the worker; return when the peer has hung up (the worker is then cancelled)."""
        try:
            while True:
                try:
                    frames = await stream.read_frames()
                except ProtocolError as exc:
                    if stream.sock is None or hung_up(stream.sock):
                        return
                    await self._put(stream, queue, _End(exc))
                    break
                except OSError:
                    return
                if not frames:
                    if stream.sock is None or hung_up(stream.sock):
                        return
                    await self._put(stream, queue, _End(None))
                    break
                for frame in frames:
                    await self._put(stream, queue, frame)
        except _HungUp:
            return
        # Half-closed or broken: the worker finishes; keep an eye on a full hang-up.
        while stream.sock is not None and not hung_up(stream.sock):
            await asyncio.sleep(HANGUP_POLL)

    async def _worker(self, state: ConnState, stream: FramedStream, queue: _Queue) -> None:
        while True:
            item = await queue.get()
            try:
                if isinstance(item, _End):
                    if item.error is not None:
                        log.info("%s: %s; closing", state, item.error.message)
                        err = protocol.Error(errno=item.error.errno, message=item.error.message)
                        await stream.send(protocol.encode(err))
                        stream.discard_input()
                    return
                state.requests += 1
                try:
                    reply, fds = await self._answer(state, item)
                finally:
                    stream.release(item)
                await self._send_reply(state, stream, reply, fds)
            except OSError as exc:
                log.debug("%s: peer gone while replying: %s", state, exc)
                return

    async def _answer(self, state: ConnState, frame: Frame) -> Reply:
        if frame.ctrunc or frame.fds:
            close_fds(frame.fds)
            return protocol.Error(errno=Errno.EINVAL, message="requests may not carry file descriptors"), ()
        try:
            msg = protocol.decode_request(frame.body)
        except ProtocolError as exc:
            log.info("%s: %s", state, exc.message)
            return protocol.Error(errno=exc.errno, message=exc.message), ()
        try:
            result = await self._handler(state, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = errno_of(exc)
            text = getattr(exc, "message", None)
            if not isinstance(text, str) or not text:
                text = str(exc) or type(exc).__name__
            if isinstance(getattr(exc, "errno", None), str):
                log.info("%s: %s -> %s: %s", state, type(msg).__name__, code, text)
            else:
                log.error("%s: handler failed on %s", state, type(msg).__name__, exc_info=exc)
                text = f"{type(exc).__name__}: {text}"
            return protocol.Error(errno=code, message=text), ()
        if (not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], Msg)
                or not isinstance(result[1], Sequence)):
            log.error("%s: handler returned %r for %s, not (reply, fds)", state, result, type(msg).__name__)
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Sequence):
                release_fds(result[1])
            return protocol.Error(errno=Errno.EINVAL, message="internal error: bad handler result"), ()
        return result

    async def _send_reply(self, state: ConnState, stream: FramedStream, reply: Msg,
                          fds: Sequence[FdLike]) -> None:
        try:
            data: bytes | None = None
            names = getattr(reply, "fds", None)
            expected = len(names) if isinstance(names, list) else 0
            if expected != len(fds):
                log.error("%s: %s announces %d fds but the handler gave %d", state, type(reply).__name__,
                          expected, len(fds))
                reply = protocol.Error(errno=Errno.EINVAL, message="internal error: reply fds mismatch")
                release_fds(fds)
                fds = ()
            try:
                data = protocol.encode(reply)
            except (ProtocolError, msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
                log.error("%s: cannot encode %s: %s", state, type(reply).__name__, exc)
                data = protocol.encode(protocol.Error(errno=Errno.EINVAL,
                                                      message=f"internal error: reply not encodable: {exc}"))
                release_fds(fds)
                fds = ()
            try:
                await stream.send(data, raw_fds(fds))
            except OSError as exc:
                # A bad fd from the handler fails the very first sendmsg, before
                # any byte went out: answer that instead of dropping the peer.
                if not fds or exc.errno not in (_errno.EBADF, _errno.EINVAL) or stream.broken is not None:
                    raise
                log.error("%s: cannot pass the fds of %s: %s", state, type(reply).__name__, exc)
                await stream.send(protocol.encode(protocol.Error(
                    errno=Errno.EINVAL, message=f"internal error: cannot pass the reply's fds: {exc}")))
        finally:
            release_fds(fds)
