"""fstatfs(2) through libc: which filesystem a file descriptor's file lives on.

`os.statvfs` has no `f_type`, the filesystem's magic number (`include/uapi/linux/magic.h`);
that is what tells a file of an image store from a file of the kernel's own interfaces
(/proc, /sys, ...), which look like regular files yet are no data. fstatfs works on an
O_PATH descriptor, so a file can be judged before it is opened for reading.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Statfs64(ctypes.Structure):
    """`struct statfs64` of glibc (`struct statfs` on 64-bit): f_type comes first."""

    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


# fstatfs64 is the large-file entry point on 32-bit glibc, an alias of fstatfs on 64-bit.
_fstatfs = getattr(_libc, "fstatfs64", None) or _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs64)]
_fstatfs.restype = ctypes.c_int

# Filesystems whose files are kernel interfaces, not data: magic -> name.
PSEUDO_FILESYSTEMS: dict[int, str] = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
    0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc",
    0x6E736673: "nsfs",
    0x09041934: "anon_inodefs",
    0x50495046: "pipefs",
    0x534F434B: "sockfs",
    0x19800202: "mqueue",
    0x07655821: "resctrl",
    0x6C6F6F70: "binderfs",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x6E667364: "nfsd",
    0x67596969: "rpc_pipefs",
    0xABBA1974: "xenfs",
    0x5345434D: "secretmem",
    0x444D4142: "dmabuf",
}


def fstatfs_type(fd: int, path: str = "") -> int:
    """The magic number (f_type) of the filesystem holding the open file `fd`."""
    buf = _Statfs64()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path or None)
    return buf.f_type & 0xFFFFFFFF  # magics are 32-bit; c_long may sign-extend one


def pseudo_filesystem(fd: int, path: str = "") -> str | None:
    """The name of the kernel-interface filesystem `fd` lives on, or None for a real one."""
    return PSEUDO_FILESYSTEMS.get(fstatfs_type(fd, path))
