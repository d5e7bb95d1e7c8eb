"""openat2(2) through libc's syscall(): open a path resolved inside a directory taken as `/`.

With RESOLVE_IN_ROOT the kernel itself keeps the walk inside the directory — an absolute
symlink starts again there and `..` stops there — so a path inside an image is looked up the
way the image sees it after pivot_root, never through the host's tree. Needs Linux >= 5.6.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# Looked up at import, so the helper's forks (spares, inits) inherit it ready: a first call
# would otherwise cost each container another ~0.1 ms.
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# openat2 came after the syscall tables were unified: the same number everywhere but alpha.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "ppc64le": 437, "s390x": 437, "riscv64": 437}
_NR_OPENAT2 = _SYS_OPENAT2.get(platform.machine())

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# A rename or mount racing a `..` makes the kernel answer EAGAIN rather than risk an escape.
_EAGAIN_RETRIES = 16


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """The new file descriptor; OSError(errno, strerror, path) on failure."""
    if _NR_OPENAT2 is None:
        raise OSError(errno.ENOSYS, "openat2: unknown syscall number on this architecture", path)
    how = OpenHow(flags, mode, resolve)
    encoded = os.fsencode(path)
    for _ in range(_EAGAIN_RETRIES):
        fd = _syscall(ctypes.c_long(_NR_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(encoded),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    raise OSError(err, os.strerror(err), path)


def open_in_root(rootfd: int, path: str, flags: int) -> int:
    """Open `path` inside the directory `rootfd` as if it were `/` (close-on-exec).

    Magic links (/proc/PID/root, /proc/self/fd/N) are refused, not followed: they would jump
    to wherever they point on the host.
    """
    return openat2(rootfd, path, flags | os.O_CLOEXEC, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
