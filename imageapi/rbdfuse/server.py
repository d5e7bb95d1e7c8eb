"""The FUSE server of one user-space rbd mapping: librbd behind a one-file FUSE filesystem.

Started by the daemon (`python -I -m imageapi.rbdfuse FD`, FD a listening unix socket,
`<dir>/server.sock`, mode 0600) and never a part of it: its own session, no parent-death
signal, SIGINT/SIGHUP/SIGTERM ignored — it serves the file a loop device reads the node's
running OS from, so a daemon that stops or restarts must leave it running, and the next daemon
finds it again through the socket. It ends only when asked (`stop`), when its filesystem is
unmounted under it, or when its attach fails.

Protocol (version 1), SOCK_SEQPACKET, one JSON object per message, one request per connection:
  daemon -> server  {"op": "attach", "version": 1, ...the mapping, with its key}   (first, once)
                    {"op": "hello"}                       (a daemon finding it again)
                    {"op": "stop", "force": bool}
  server -> daemon  {"op": "attached", ...status}
                    | {"op": "failed", "errno": N, "error": T, "local": bool (this host's fault)}
                    {"op": "status", ...status}
                    {"op": "stopped"} | {"op": "busy", "error": T}
The key reaches the server over that socket only: never in its argv, its environment or a
file. librados gets it through its configuration in memory (`key`).

Attaching, in order, within the mapping's `timeout` (a watchdog answers ETIMEDOUT with the
step that hung and exits: librados' own OSD timeout would also cut the mapping's I/O later,
so it stays off): connect (client_mount_timeout and rados_mon_op_timeout are the timeout),
check the fsid, open the pool and namespace, open the image — read-only for a read-only or
snapshot mapping, with librbd's access and modify time updates off so that such a mapping
never writes to the cluster — take the exclusive lock if asked, mount the FUSE filesystem.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import prctl

from imageapi.kernel import fuse
from imageapi.rbdfuse import bindings

log = logging.getLogger("imageapi.rbdfuse")

PROTOCOL_VERSION = 1
SOCKET_NAME = "server.sock"
MOUNT_NAME = "fs"
FILE_NAME = "image"
MESSAGE_MAX = 1 << 16
# The kernel's readahead on a read-only image's file: boot reads are mostly sequential runs
# within files, and librbd answers 1 MiB requests in parallel (HACKING.md has the numbers).
READAHEAD_KIB = 8192
FUSE_THREADS = 4
STOP_WAIT = 10.0
# Every reply is a 1 MiB buffer, librados' and then Python's: freed, glibc keeps them in its
# heaps (about 80 MiB after a burst of reads). A server idle this long after requests gives
# them back (malloc_trim); a fixed mmap threshold would too, at 15-20% of the throughput.
TRIM_AFTER = 2.0
_libc = ctypes.CDLL(None)


class AttachFailed(Exception):
    def __init__(self, code: int, message: str, local: bool = False) -> None:
        super().__init__(message)
        self.errno = code
        self.local = local  # a fault of this host (no FUSE, no bindings), not of the request


class RbdBackend:
    """The FUSE file's I/O, as librbd's asynchronous calls: each answers from librbd's
    completion thread, so the number in flight is the kernel's (max_background), not ours."""

    def __init__(self, image: Any, size: int, writable: bool, trim: bool) -> None:
        self.image = image
        self.size = size
        self.writable = writable
        self.trim = trim

    def read(self, offset: int, length: int, reply: fuse.Reply) -> None:
        def done(completion: Any, data: bytes | None) -> None:
            result = completion.get_return_value()
            if result < 0 or data is None:
                reply.error(-result if result < 0 else errno.EIO)
            else:
                reply.ok(data)

        self._submit(reply, self.image.aio_read, offset, length, done)

    def write(self, offset: int, data: bytes, reply: fuse.Reply) -> None:
        self._submit(reply, self.image.aio_write, data, offset, _answer(reply))

    def flush(self, reply: fuse.Reply) -> None:
        self._submit(reply, self.image.aio_flush, _answer(reply))

    def discard(self, offset: int, length: int, reply: fuse.Reply) -> None:
        if not self.trim:
            reply.error(errno.EOPNOTSUPP)  # options.notrim
            return
        self._submit(reply, self.image.aio_discard, offset, length, _answer(reply))

    def write_zeroes(self, offset: int, length: int, reply: fuse.Reply) -> None:
        if not self.trim:
            reply.error(errno.EOPNOTSUPP)
            return
        self._submit(reply, self.image.aio_write_zeroes, offset, length, _answer(reply))

    @staticmethod
    def _submit(reply: fuse.Reply, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:  # the image was closed under a late request, a librbd error
            reply.error(getattr(exc, "errno", None) or errno.EIO)


def _answer(reply: fuse.Reply) -> Any:
    def done(completion: Any) -> None:
        result = completion.get_return_value()
        if result < 0:
            reply.error(-result)
        else:
            reply.ok()

    return done


class Mapping:
    """One attached image: the cluster connection, the image, the FUSE filesystem."""

    def __init__(self, directory: Path, request: dict[str, Any]) -> None:
        self.dir = directory
        self.request = request
        self.step = "starting"
        self.cluster: Any = None
        self.ioctx: Any = None
        self.image: Any = None
        self.fs: fuse.OneFileFs | None = None
        self.size = 0
        self.global_id = 0
        self.librbd = ""

    @property
    def read_only(self) -> bool:
        return bool(self.request["read_only"])

    @property
    def mountpoint(self) -> Path:
        return self.dir / MOUNT_NAME

    def attach(self) -> None:
        r = self.request
        self.step = "loading the Ceph bindings"
        try:
            rados, rbd = bindings.load()
        except bindings.BindingsMissing as exc:
            raise AttachFailed(errno.ENOPKG, str(exc), local=True) from None
        self.librbd = ".".join(map(str, rbd.RBD().version()))
        timeout = str(r["timeout"])
        conf = {
            "mon_host": ",".join(r["monitors"]),
            "key": r["key"],
            "client_mount_timeout": timeout,
            "rados_mon_op_timeout": timeout,
            # Our own messages say what failed; librados' would go to the daemon's log.
            "log_to_stderr": "false",
            "err_to_stderr": "false",
            "log_file": "",
            "admin_socket": "",
            "keyring": "",
            **r.get("conf", {}),
        }
        r["key"] = ""  # librados keeps its own copy
        if self.read_only:
            # librbd updates an image's access time even when it is opened read-only or at
            # a snapshot (every rbd_atime_update_interval): off, so nothing is ever written.
            conf["rbd_atime_update_interval"] = "0"
            conf["rbd_mtime_update_interval"] = "0"
            conf["rbd_cache"] = "false"  # the kernel's page cache of the FUSE file is the cache
        self.step = "setting up the client"
        self.cluster = rados.Rados(rados_id=r["name"], conf=conf)
        self.step = f"connecting to the monitors ({conf['mon_host']})"
        self.cluster.connect()
        self.global_id = int(self.cluster.get_instance_id())
        if r.get("fsid"):
            self.step = "checking the cluster's fsid"
            fsid = self.cluster.get_fsid()
            if fsid != r["fsid"]:
                raise AttachFailed(errno.EINVAL, f"the cluster's fsid is {fsid}, not {r['fsid']}")
        self.step = f"opening pool {r['pool']}"
        self.ioctx = self.cluster.open_ioctx(r["pool"])
        if r.get("namespace"):
            self.ioctx.set_namespace(r["namespace"])
        if r.get("abort_on_full"):
            self.ioctx.set_osdmap_full_try()  # ENOSPC on a full pool instead of waiting
        self.step = f"opening image {r['image']}" + (f"@{r['snapshot']}" if r.get("snapshot")
                                                     else "")
        self.image = rbd.Image(self.ioctx, r["image"], snapshot=r.get("snapshot") or None,
                               read_only=self.read_only)
        if r.get("exclusive"):
            self.step = "taking the exclusive lock"
            self.image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        self.size = int(self.image.size())
        self.step = "mounting the FUSE filesystem"
        backend = RbdBackend(self.image, self.size, not self.read_only, not r.get("notrim"))
        # A read-only image cannot change under the kernel: its page cache is kept and read
        # ahead. A read-write one bypasses it (the loop device above uses direct I/O too), so
        # that a write is in librbd when the block layer says it is done.
        self.fs = fuse.OneFileFs(backend, FILE_NAME, max_background=int(r["queue_depth"]),
                                 keep_cache=self.read_only, direct_io=not self.read_only)
        source = f"imageapi-rbd:{r['pool']}/{r['image']}" + (
            f"@{r['snapshot']}" if r.get("snapshot") else "")
        try:
            self.mountpoint.mkdir(mode=0o700, exist_ok=True)
            self.fs.mount(str(self.mountpoint), source, self.read_only, FUSE_THREADS)
            if self.read_only:
                self.fs.set_readahead(READAHEAD_KIB)
        except OSError as exc:
            raise AttachFailed(exc.errno or errno.EIO, str(exc), local=True) from exc
        self.step = "attached"

    def status(self) -> dict[str, Any]:
        r = self.request
        path = self.mountpoint / FILE_NAME
        st = os.stat(path)
        return {"version": PROTOCOL_VERSION, "pid": os.getpid(), "pool": r["pool"],
                "namespace": r.get("namespace", ""), "image": r["image"],
                "snapshot": r.get("snapshot", ""), "read_only": self.read_only,
                "file": str(path), "backing": [st.st_dev, st.st_ino], "size": self.size,
                "global_id": self.global_id, "librbd": self.librbd,
                "requests": self.fs.requests if self.fs else 0}

    def close(self) -> None:
        """Release the cluster: the image (flushed; its watch and lock), the client session."""
        image, ioctx, cluster = self.image, self.ioctx, self.cluster
        self.image = self.ioctx = self.cluster = None
        for what, obj, action in (("image", image, "close"), ("pool", ioctx, "close"),
                                  ("client", cluster, "shutdown")):
            if obj is not None:
                try:
                    getattr(obj, action)()
                except Exception as exc:
                    log.error("closing the %s: %s", what, exc)


def _error_of(exc: BaseException) -> tuple[int, str]:
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = errno.EIO
    return code, str(exc) or type(exc).__name__


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.send(json.dumps(message).encode())
    except OSError as exc:
        log.warning("could not answer %s: %s", message.get("op"), exc)


def _receive(conn: socket.socket, timeout: float) -> dict[str, Any] | None:
    ready, _, _ = select.select([conn], [], [], timeout)
    if not ready:
        return None
    data = conn.recv(MESSAGE_MAX)
    return json.loads(data) if data else None


def _attach(mapping: Mapping, conn: socket.socket) -> str:
    """Attach within the request's timeout and answer: "attached", "failed", or "hung" (a
    librados call still running: only exiting the process ends it)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            mapping.attach()
            outcome["ok"] = True
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="attach", daemon=True)
    worker.start()
    worker.join(float(mapping.request["timeout"]))
    local = False
    if worker.is_alive():
        result = "hung"
        code, message = errno.ETIMEDOUT, (f"no answer within {mapping.request['timeout']} s "
                                          f"while {mapping.step}")
    elif "error" in outcome:
        result = "failed"
        code, message = _error_of(outcome["error"])
        message = f"{mapping.step}: {message}"
        local = bool(getattr(outcome["error"], "local", False))
    else:
        _send(conn, {"op": "attached", **mapping.status()})
        return "attached"
    log.error("attach failed: %s (%s)", message, errno.errorcode.get(code, code))
    _send(conn, {"op": "failed", "errno": code, "error": message,
                 "local": result == "failed" and local})
    return result


def _serve(mapping: Mapping, listener: socket.socket) -> int:
    """Answer daemons until asked to stop or until the filesystem goes; the exit status."""
    assert mapping.fs is not None
    ended_r, ended_w = os.pipe()

    def watch_session() -> None:
        assert mapping.fs is not None
        mapping.fs.wait()
        os.write(ended_w, b"x")

    threading.Thread(target=watch_session, name="session", daemon=True).start()
    trimmed_at = 0
    while True:
        ready, _, _ = select.select([listener, ended_r], [], [], TRIM_AFTER)
        if not ready:
            busy = mapping.fs.requests
            if busy != trimmed_at:
                _libc.malloc_trim(0)
                trimmed_at = busy
            continue
        if ended_r in ready:
            log.warning("the filesystem was unmounted outside imageapi: the mapping is gone")
            mapping.fs.close()
            mapping.close()
            return 0
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        with conn:
            try:
                message = _receive(conn, 10)
            except (OSError, ValueError):
                continue
            if not message:
                continue
            if message.get("op") == "hello":
                _send(conn, {"op": "status", **mapping.status()})
            elif message.get("op") == "stop":
                if _stop(mapping, bool(message.get("force")), conn):
                    return 0
            else:
                _send(conn, {"op": "failed", "errno": errno.EINVAL,
                             "error": f"unknown request {message.get('op')!r}"})


def _stop(mapping: Mapping, force: bool, conn: socket.socket) -> bool:
    assert mapping.fs is not None
    try:
        mapping.fs.unmount(lazy=force)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            _send(conn, {"op": "busy", "error": "the image file is still open (a loop device)"})
            return False
        if exc.errno != errno.EINVAL:  # EINVAL: not mounted any more
            _send(conn, {"op": "failed", "errno": exc.errno, "error": str(exc)})
            return False
    # Forced, the file may still be open (a loop device): its connection goes with us.
    if not mapping.fs.wait(1.0 if force else STOP_WAIT):
        log.warning("the filesystem is still in use: dropping its connection")
    mapping.fs.close()
    mapping.close()
    with contextlib.suppress(OSError):
        mapping.mountpoint.rmdir()
    _send(conn, {"op": "stopped"})
    log.info("stopped")
    return True


def main(argv: list[str]) -> int:
    listen_fd = int(argv[0])
    directory = Path(argv[1])
    prctl.set_name("imageapi-rbd")
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        # Serving a node's OS: only an explicit stop through the socket ends it.
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"imageapi-rbd[{directory.name}]: %(message)s")
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(True)
    ready, _, _ = select.select([listener], [], [], 30)
    if not ready:
        log.error("no daemon connected")
        return 1
    conn, _ = listener.accept()
    with conn:
        request = _receive(conn, 30)
        if not request or request.get("op") != "attach" or \
                request.get("version") != PROTOCOL_VERSION:
            _send(conn, {"op": "failed", "errno": errno.EPROTO, "error": "expected attach v1"})
            return 1
        mapping = Mapping(directory, request)
        result = _attach(mapping, conn)
        if result != "attached":
            _cleanup_failed(mapping, hung=result == "hung")
            return 1
    log.info("serving %s/%s%s (%s, %d bytes, librbd %s)", request["pool"], request["image"],
             f"@{request['snapshot']}" if request.get("snapshot") else "",
             "read-only" if mapping.read_only else "read-write", mapping.size, mapping.librbd)
    return _serve(mapping, listener)


def _cleanup_failed(mapping: Mapping, hung: bool) -> None:
    if mapping.fs is not None and mapping.fs.fd >= 0:
        with contextlib.suppress(OSError):
            mapping.fs.unmount(lazy=True)
        mapping.fs.close()
    with contextlib.suppress(OSError):
        mapping.mountpoint.rmdir()
    if hung:
        # The attach thread is inside librados: exiting is the only way to end it, and it
        # ends the client's sessions with it.
        logging.shutdown()
        os._exit(1)
    mapping.close()
