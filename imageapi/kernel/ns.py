"""Namespaces and process-root syscalls through libc: unshare, pivot_root, syncfs.

Python 3.11 (our floor) has no os.unshare, and no libc has a pivot_root wrapper, so these
go through ctypes; every failure is an OSError with errno and path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# The API's namespace names -> unshare flags.
NAMESPACE_FLAGS = {
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "cgroup": CLONE_NEWCGROUP,
    "net": CLONE_NEWNET,
    "time": CLONE_NEWTIME,
    "user": CLONE_NEWUSER,
}

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), what)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        _fail("unshare")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(38, "pivot_root: unknown syscall number on this architecture", new_root)
    if _libc.syscall(number, new_root.encode(), put_old.encode()) != 0:
        _fail(new_root)


def syncfs(path: str) -> None:
    """Flush one filesystem (the one holding `path`), not every filesystem like sync(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            _fail(path)
    finally:
        os.close(fd)
