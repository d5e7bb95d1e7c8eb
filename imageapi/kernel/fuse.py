"""A FUSE filesystem of one regular file, spoken straight over /dev/fuse.

The kernel's side of the protocol is `include/uapi/linux/fuse.h` (protocol 7.x); the facts used:

- The filesystem is mounted with mount(2), fstype `fuse.<subtype>`, data
  `fd=N,rootmode=40000,user_id=0,group_id=0,...` naming an open /dev/fuse. Every request is one
  read(2) of that descriptor: a 40-byte `fuse_in_header` (len, opcode, unique, nodeid, uid, gid,
  pid, total_extlen, padding) and the opcode's arguments; every answer is one write(2): a
  16-byte `fuse_out_header` (len, error as -errno, unique) and the result. A read fails with
  ENODEV once the filesystem is unmounted; a reply to a request the kernel has given up on
  (interrupted, aborted) fails with ENOENT.
- The read buffer must hold the largest request: a WRITE of `max_write` bytes after its two
  headers, and never less than FUSE_MIN_READ_BUFFER (8 KiB).
- INIT comes first. Since 7.28 the answer may raise `max_pages` (FUSE_MAX_PAGES) from 32 to 256:
  reads and writes of up to 1 MiB per request instead of 128 KiB. `max_background` is how many
  asynchronous requests (readahead, direct I/O) the kernel keeps in flight.
- FOPEN_KEEP_CACHE keeps the file's page cache across opens (for a file that cannot change under
  the kernel); FOPEN_DIRECT_IO bypasses the page cache.
- FORGET, BATCH_FORGET and INTERRUPT get no answer.

Why not libfuse: libfuse 3.14 (Debian 12) reads requests into a 132 KiB buffer, so it cannot
negotiate requests larger than 128 KiB, and through ctypes every request costs a Python callback
with argument conversion; both showed in measurements (see HACKING.md, "RBD in user space").
Here a request is one readv into a reused buffer and one writev of the answer, whose data
goes from the backend's buffer to the kernel without another copy.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from imageapi.kernel import mount as kmount

log = logging.getLogger(__name__)

KERNEL_VERSION = 7
# What we speak: 7.31 has max_pages (7.28) and everything we use; kernels newer than that
# speak our minor to us.
KERNEL_MINOR = 31
MIN_READ_BUFFER = 8192
PAGE = 4096
MAX_PAGES = 256

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, GETXATTR, LISTXATTR, FLUSH, INIT = 20, 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS = 27, 28, 29, 30, 34
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 36, 38, 42, 43
# Requests that would change the namespace of a fixed layout.
NAMESPACE_CHANGES = frozenset({5, 6, 8, 9, 10, 11, 12, 13, 21, 24, 35, 45, 51})
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags (fuse_init_in.flags / fuse_init_out.flags).
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15
FUSE_MAX_PAGES = 1 << 22
WANTED_FLAGS = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

ROOT_ID, FILE_ID = 1, 2
DT_DIR, DT_REG = 4, 8
# Nothing here ever changes on its own: the kernel may keep names and attributes for a day.
VALID = 86400

IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header, 40 bytes
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header, 16 bytes
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # fuse_entry_out before its attr
ATTR_OUT = struct.Struct("<QII")  # fuse_attr_out before its attr
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")  # fuse_init_out, 64 bytes
INIT_OUT_COMPAT_22 = struct.Struct("<IIIIHHI")  # before time_gran (7.23): 24 bytes
OPEN_OUT = struct.Struct("<QIi")
RW_IN = struct.Struct("<QQIIQII")  # fuse_read_in / fuse_write_in, 40 bytes
WRITE_OUT = struct.Struct("<II")
FALLOCATE_IN = struct.Struct("<QQQII")
KSTATFS = struct.Struct("<QQQQQIIII6I")  # fuse_kstatfs, 80 bytes
DIRENT = struct.Struct("<QQII")

Buffer = bytes | bytearray | memoryview


class Reply:
    """The answer to one request; `ok` or `error` exactly once, from any thread."""

    __slots__ = ("_fd", "unique")

    def __init__(self, fd: int, unique: int) -> None:
        self._fd = fd
        self.unique = unique

    def ok(self, *payload: Buffer) -> None:
        self._send(0, payload)

    def error(self, code: int) -> None:
        self._send(-abs(code), ())

    def _send(self, err: int, payload: Sequence[Buffer]) -> None:
        length = OUT_HEADER.size + sum(len(p) for p in payload)
        try:
            os.writev(self._fd, [OUT_HEADER.pack(length, err, self.unique), *payload])
        except OSError as exc:
            # ENOENT: the kernel gave up on the request (interrupted); ENODEV: unmounted.
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("fuse: cannot answer request %d: %s", self.unique, exc)


class Backend(Protocol):
    """What the one file reads and writes. Each call answers through `reply` — at once or
    later from another thread (`reply.ok(data)` for a read; `reply.ok()` otherwise)."""

    size: int
    writable: bool

    def read(self, offset: int, length: int, reply: Reply) -> None: ...

    def write(self, offset: int, data: bytes, reply: Reply) -> None: ...

    def flush(self, reply: Reply) -> None: ...

    def discard(self, offset: int, length: int, reply: Reply) -> None: ...

    def write_zeroes(self, offset: int, length: int, reply: Reply) -> None: ...


class OneFileFs:
    """A root directory (mode 0700) holding one file `name` (0400, or 0600 when writable),
    both root's; the kernel checks permissions (default_permissions) and only root may enter
    (no allow_other)."""

    def __init__(self, backend: Backend, name: str = "image", *, max_background: int = 64,
                 keep_cache: bool = False, direct_io: bool = False) -> None:
        self.backend = backend
        self.name = name.encode()
        self.max_background = max(1, min(max_background, 0xFFFF))
        self.keep_cache = keep_cache
        self.direct_io = direct_io
        self.fd = -1
        self.mountpoint = ""
        self.max_pages = 32
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        now = time.time()
        self._time = (int(now), int((now % 1) * 1e9))
        self.requests = 0

    # -- mounting ----------------------------------------------------------------------------

    def mount(self, mountpoint: str, source: str, read_only: bool, threads: int = 4) -> None:
        """Mount and start serving; returns once the kernel has done its INIT."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        flags = kmount.MS_NOSUID | kmount.MS_NODEV | kmount.MS_NOEXEC
        if read_only:
            flags |= kmount.MS_RDONLY
        data = (f"fd={fd},rootmode={stat.S_IFDIR:o},user_id=0,group_id=0,default_permissions,"
                f"max_read={MAX_PAGES * PAGE}")
        try:
            kmount.mount(source, mountpoint, f"fuse.{source.split(':')[0]}", flags, data)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.mountpoint = mountpoint
        for i in range(threads):
            t = threading.Thread(target=self._serve, name=f"fuse-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if not self._ready.wait(30):
            raise OSError(errno.ETIMEDOUT, "the kernel sent no FUSE INIT", mountpoint)

    def set_readahead(self, kib: int) -> None:
        """The kernel's readahead for the file (its bdi's read_ahead_kb): INIT can only lower
        it below the 128 KiB default, root can raise it through sysfs."""
        st = os.stat(self.mountpoint)
        bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        with open(bdi, "w") as f:
            f.write(str(kib))

    def unmount(self, lazy: bool = False) -> None:
        """Unmount (EBUSY while the file is open, e.g. by a loop device, unless `lazy`)."""
        kmount.umount(self.mountpoint, kmount.UMOUNT_NOFOLLOW
                      | (kmount.MNT_DETACH if lazy else 0))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the session to end (the filesystem unmounted and released)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                return False
        return True

    def close(self) -> None:
        """Drop the connection: whatever still uses the file gets ENOTCONN from now on."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- serving -----------------------------------------------------------------------------

    def _serve(self) -> None:
        size = MAX_PAGES * PAGE + PAGE  # a WRITE of max_write bytes and its headers
        buf = mmap.mmap(-1, max(size, MIN_READ_BUFFER))  # untouched pages cost no memory
        view = memoryview(buf)
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: a request interrupted before we read it
                if exc.errno not in (errno.ENODEV, errno.EBADF):
                    log.error("fuse: reading requests: %s", exc)
                return
            try:
                self._dispatch(view, n)
            except Exception:  # a bug must not end the thread that serves a node's OS
                log.exception("fuse: request failed")

    def _dispatch(self, view: memoryview, n: int) -> None:
        _len, op, unique, node, _uid, _gid, _pid, _ext, _pad = IN_HEADER.unpack_from(view)
        if op in NO_REPLY:
            return
        self.requests += 1
        reply = Reply(self.fd, unique)
        body = view[IN_HEADER.size:n]
        if op == READ:
            _fh, offset, length, *_ = RW_IN.unpack_from(body)
            end = min(offset + length, self.backend.size)
            if node != FILE_ID:
                reply.error(errno.EISDIR)
            elif end <= offset:
                reply.ok()
            else:
                self.backend.read(offset, end - offset, reply)
        elif op == WRITE:
            _fh, offset, length, *_ = RW_IN.unpack_from(body)
            if not self.backend.writable:
                reply.error(errno.EROFS)
            elif offset + length > self.backend.size:
                reply.error(errno.ENOSPC)  # a block device does not grow
            else:
                data = bytes(body[RW_IN.size:RW_IN.size + length])
                self.backend.write(offset, data, _WriteReply(reply, length))
        elif op == INIT:
            self._init(body, reply)
        elif op == LOOKUP:
            name = bytes(body).split(b"\0", 1)[0]
            if node == ROOT_ID and name == self.name:
                reply.ok(ENTRY_OUT.pack(FILE_ID, 0, VALID, VALID, 0, 0), self._attr(FILE_ID))
            else:
                reply.error(errno.ENOENT)
        elif op == GETATTR:
            if node in (ROOT_ID, FILE_ID):
                reply.ok(ATTR_OUT.pack(VALID, 0, 0), self._attr(node))
            else:
                reply.error(errno.ENOENT)
        elif op == OPEN:
            flags = (FOPEN_DIRECT_IO if self.direct_io else 0) | \
                (FOPEN_KEEP_CACHE if self.keep_cache else 0)
            reply.ok(OPEN_OUT.pack(0, flags, 0))
        elif op == OPENDIR:
            reply.ok(OPEN_OUT.pack(0, 0, 0))
        elif op == READDIR:
            _fh, offset, length, *_ = RW_IN.unpack_from(body)
            reply.ok(self._dirents(offset, length))
        elif op == FSYNC:
            if self.backend.writable:
                self.backend.flush(reply)
            else:
                reply.ok()
        elif op == FALLOCATE:
            self._fallocate(body, reply)
        elif op == STATFS:
            blocks = self.backend.size // PAGE
            reply.ok(KSTATFS.pack(blocks, 0, 0, 2, 0, PAGE, 255, PAGE, 0, *([0] * 6)))
        elif op in (RELEASE, RELEASEDIR, FLUSH, FSYNCDIR, ACCESS, DESTROY):
            reply.ok()
        elif op == SETATTR:
            reply.error(errno.EPERM)  # a fixed size, mode and owner
        elif op in NAMESPACE_CHANGES:
            reply.error(errno.EPERM)
        else:
            reply.error(errno.ENOSYS)  # xattrs, locks, ioctl, lseek...: the kernel copes

    def _init(self, body: memoryview, reply: Reply) -> None:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major > KERNEL_VERSION:
            # Answer with our major only: the kernel then sends INIT again in ours.
            reply.ok(INIT_OUT_COMPAT_22.pack(KERNEL_VERSION, KERNEL_MINOR, 0, 0, 0, 0, 0))
            return
        if major < KERNEL_VERSION:
            reply.error(errno.EPROTO)
            return
        minor = min(minor, KERNEL_MINOR)
        want = flags & WANTED_FLAGS
        if want & FUSE_MAX_PAGES:
            self.max_pages = MAX_PAGES
        max_write = self.max_pages * PAGE
        congestion = max(1, self.max_background * 3 // 4)
        if minor < 23:
            reply.ok(INIT_OUT_COMPAT_22.pack(KERNEL_VERSION, minor, max_readahead, want,
                                             self.max_background, congestion, max_write))
        else:
            reply.ok(INIT_OUT.pack(KERNEL_VERSION, minor, max_readahead, want,
                                   self.max_background, congestion, max_write, 1,
                                   self.max_pages, 0, 0, *([0] * 7)))
        self._ready.set()

    def _attr(self, node: int) -> bytes:
        sec, nsec = self._time
        if node == ROOT_ID:
            return ATTR.pack(ROOT_ID, 0, 0, sec, sec, sec, nsec, nsec, nsec,
                             stat.S_IFDIR | 0o700, 2, 0, 0, 0, PAGE, 0)
        size = self.backend.size
        mode = stat.S_IFREG | (0o600 if self.backend.writable else 0o400)
        return ATTR.pack(FILE_ID, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
                         mode, 1, 0, 0, 0, PAGE, 0)

    def _dirents(self, offset: int, length: int) -> bytes:
        out = b""
        entries = [(ROOT_ID, b".", DT_DIR), (ROOT_ID, b"..", DT_DIR), (FILE_ID, self.name, DT_REG)]
        for index, (ino, name, kind) in enumerate(entries[offset:], offset + 1):
            entry = DIRENT.pack(ino, index, len(name), kind) + name
            entry += b"\0" * (-len(entry) % 8)
            if len(out) + len(entry) > length:
                break
            out += entry
        return out

    def _fallocate(self, body: memoryview, reply: Reply) -> None:
        _fh, offset, length, mode, _pad = FALLOCATE_IN.unpack_from(body)
        end = min(offset + length, self.backend.size)
        if not self.backend.writable:
            reply.error(errno.EROFS)
        elif mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            self.backend.discard(offset, max(0, end - offset), reply)
        elif mode in (FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            self.backend.write_zeroes(offset, max(0, end - offset), reply)
        elif mode in (0, FALLOC_FL_KEEP_SIZE) and offset + length <= self.backend.size:
            reply.ok()  # every byte of the image is already there
        else:
            reply.error(errno.EOPNOTSUPP)


class _WriteReply(Reply):
    """A write's answer says how many bytes were written."""

    __slots__ = ("_inner", "_length")

    def __init__(self, inner: Reply, length: int) -> None:
        self._inner = inner
        self._length = length

    def ok(self, *payload: Buffer) -> None:
        self._inner.ok(WRITE_OUT.pack(self._length, 0))

    def error(self, code: int) -> None:
        self._inner.error(code)

