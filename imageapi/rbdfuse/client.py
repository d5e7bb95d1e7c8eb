"""The daemon's end of the FUSE servers (`imageapi.rbdfuse.server`): start one per mapping,
find it again after a restart, stop it.

Each server has a directory of its own, `<run_dir>/rbd/<attachment id>/` (0700): its socket
`server.sock` (0600) and its mountpoint `fs/`, which holds the one file a loop device reads.
The directory is all a daemon needs to find a server again: connect, say hello, hear what it
serves. A server outlives the daemon that started it (its own session, nothing tied to the
daemon's life), like the container helper.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageapi.kernel import mount as kmount
from imageapi.rbdfuse.server import (
    MESSAGE_MAX,
    MOUNT_NAME,
    PROTOCOL_VERSION,
    SOCKET_NAME,
)

# Beyond the attach's own timeout (the server's watchdog answers then): starting Python and
# importing librados.
START_GRACE = 15.0
STOP_TIMEOUT = 30.0

# Servers this process started, by pid: reaped when they end (a later daemon's are not its
# children; init reaps those).
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


class ServerError(Exception):
    def __init__(self, code: int, message: str, local: bool = True) -> None:
        super().__init__(message)
        self.errno = code
        self.message = message
        self.local = local  # this host's fault (no FUSE, a dead server), not the request's


class ServerBusy(ServerError):
    """The image file is still open (the loop device over it was not released)."""


@dataclass(frozen=True)
class Started:
    pid: int
    start_time: int  # /proc/PID/stat field 22: tells the server from a later user of its pid
    status: dict[str, Any]


def start(directory: Path, request: dict[str, Any], timeout: float) -> Started:
    """Start a server in `directory` (which must not exist) and have it attach `request`
    (its key included: it goes over the socket only). Raises ServerError with the errno and
    message of a failure; leaves nothing behind then."""
    directory.mkdir(mode=0o700, parents=False)
    proc: subprocess.Popen[bytes] | None = None
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old_umask = os.umask(0o177)  # 0600 from its creation on
            try:
                listener.bind(os.fspath(directory / SOCKET_NAME))
            finally:
                os.umask(old_umask)
            listener.listen(8)
            # Nothing of the daemon's Ceph environment (CEPH_ARGS would add options to
            # librados) reaches it: the request is the whole configuration.
            env = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "imageapi.rbdfuse", str(listener.fileno()),
                 str(directory)],
                pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # neither the daemon's signals nor its end reach it
            )
        finally:
            listener.close()
        with _children_lock:
            _children[proc.pid] = proc
        # Reaped as soon as it ends, whenever that is (killed, or its filesystem unmounted
        # under it): no zombie waits for the detach.
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
        reply = _ask(directory, {"op": "attach", "version": PROTOCOL_VERSION, **request},
                     timeout + START_GRACE)
        if reply is None:
            raise ServerError(errno.ETIMEDOUT, f"the FUSE server did not answer within "
                              f"{timeout + START_GRACE:g} s", local=False)
        if reply.get("op") != "attached":
            raise ServerError(int(reply.get("errno") or errno.EIO),
                              str(reply.get("error") or "the FUSE server failed"),
                              local=bool(reply.get("local")))
        return Started(proc.pid, start_time(proc.pid) or 0, reply)
    except BaseException:
        if proc is not None:
            _end(proc.pid, None, wait=5.0)
        cleanup(directory)
        raise


def hello(directory: Path, timeout: float = 5.0) -> dict[str, Any] | None:
    """What the server in `directory` serves; None if no server answers there."""
    try:
        reply = _ask(directory, {"op": "hello"}, timeout)
    except ServerError:
        return None
    if reply is None or reply.get("op") != "status":
        return None
    return reply


def stop(directory: Path, pid: int, start: int, force: bool = False,
         timeout: float = STOP_TIMEOUT) -> None:
    """Have the server unmount, release the image and its client session, and exit. Raises
    ServerBusy while the file is open (unless `force`: then it is detached lazily and its
    users get errors). A server that does not answer is killed; one that is gone is fine."""
    try:
        reply = _ask(directory, {"op": "stop", "force": force}, timeout)
    except ServerError:
        reply = None  # nothing listens any more: gone, or never ready
    if reply is not None and reply.get("op") == "busy":
        raise ServerBusy(errno.EBUSY, str(reply.get("error")))
    if reply is not None and reply.get("op") != "stopped":
        raise ServerError(int(reply.get("errno") or errno.EIO), str(reply.get("error")))
    _end(pid, start, wait=10.0 if reply is not None else 0.0)
    cleanup(directory)


def kill(pid: int, start: int) -> None:
    """End a server for good (a mapping rolled back, one nothing records)."""
    _end(pid, start, wait=0.0)


def start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    return start_time(pid) == start


def cleanup(directory: Path) -> None:
    """Remove a server's directory; its filesystem, if still mounted, is detached lazily."""
    mountpoint = directory / MOUNT_NAME
    with contextlib.suppress(OSError):
        if kmount.is_mountpoint(str(mountpoint)):
            kmount.umount(str(mountpoint), kmount.UMOUNT_NOFOLLOW | kmount.MNT_DETACH)
    shutil.rmtree(directory, ignore_errors=True)


def _end(pid: int, start: int | None, wait: float) -> None:
    """Wait up to `wait` seconds for the server to exit, then SIGKILL it; reap it if ours."""
    with _children_lock:
        child = _children.pop(pid, None)
    if child is not None:
        try:
            child.wait(wait)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return
    if start is None or not alive(pid, start):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not alive(pid, start):
            return  # the pid was reused between the check and the open
        if not select.select([pidfd], [], [], wait)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 5.0)
    finally:
        os.close(pidfd)


def _ask(directory: Path, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """One request on a connection of its own; None if no answer came in time."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + timeout
    try:
        try:
            sock.connect(os.fspath(directory / SOCKET_NAME))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ServerError(errno.ENOTCONN, f"no FUSE server in {directory}") from exc
        sock.send(json.dumps(message).encode())
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([sock], [], [], left)
            if ready:
                data = sock.recv(MESSAGE_MAX)
                return json.loads(data) if data else None
    except OSError as exc:
        raise ServerError(exc.errno or errno.EIO, f"the FUSE server in {directory}: "
                          f"{exc.strerror}") from exc
    finally:
        sock.close()
