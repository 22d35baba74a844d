"""Remove the control socket of a hypervisor that was killed (``kill -9`` included).

A killed process cannot unlink its socket file; the next hypervisor on the
same run directory removes a stale one, but until then it would sit there.
The janitor is a tiny child forked before the hypervisor opens anything: it
holds only the read end of a pipe whose write end only the hypervisor holds,
so the pipe reads EOF exactly when the hypervisor is gone, however it went.
It then removes the socket if it is still the one the hypervisor bound (same
device and inode, as reported once it listened) and nobody answers on it.

Segments need no janitor: every one is unlinked (or never named) as soon as
it exists, and dies with the last process holding it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
import time


class Janitor:
    """The hypervisor's side: :meth:`start` before anything is opened, :meth:`arm` once listening."""

    def __init__(self, path: str, pid: int, fd: int) -> None:
        self.path = path
        self.pid = pid
        self._fd = fd

    @classmethod
    def start(cls, path: str) -> Janitor:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (measured by the tests that kill its parent)
            code = 0
            try:
                os.close(w)
                _janitor(path, r)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(r)
        os.set_inheritable(w, False)
        return cls(path, pid, w)

    def arm(self) -> None:
        """Tell the janitor which socket file is ours (call once it is bound)."""
        st = os.stat(self.path)
        os.write(self._fd, f"{st.st_dev} {st.st_ino}\n".encode())

    def reap(self) -> None:
        """On a clean exit (the socket already removed): dismiss the janitor and wait for it."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._fd, b"done\n")
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _janitor(path: str, fd: int) -> None:  # pragma: no cover - runs in the forked child
    parent = os.getppid()
    # Hold nothing of the hypervisor's: close every other fd (stdio stays, for a message).
    os.closerange(3, fd)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # nobody reading the hypervisor's stdout waits for us
    os.close(null)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C to the group is for the hypervisor
    data = b""
    while True:
        try:
            chunk = os.read(fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    lines = data.split(b"\n")
    line = lines[0].split()
    if len(line) != 2 or b"done" in lines:
        return  # it never listened, or it stopped cleanly: nothing of ours to remove
    # EOF comes as the dead process's fds are closed, maybe before its listening
    # socket: wait until it is gone altogether (we are re-parented then).
    deadline = time.monotonic() + 10
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.001)
    dev, ino = int(line[0]), int(line[1])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # removed by a clean stop
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino):
        return  # not ours any more (a new hypervisor took the run directory)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        probe.close()
