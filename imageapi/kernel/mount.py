"""mount(2), umount2(2) and the new mount API (fsopen, fsconfig, fsmount, move_mount) through
libc, and the translation of mount(8)-style option lists.

We call the syscalls directly rather than running mount(8): no dependency on util-linux
behaviour (helpers, fstab, mtab), and the errno reaches the caller intact.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import sys
from dataclasses import dataclass
from typing import NoReturn

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_statx = getattr(_libc, "statx", None)  # glibc >= 2.28
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]

AT_FDCWD = -100
STATX_ATTR_MOUNT_ROOT = 0x2000  # Linux >= 5.8
_STATX_SIZE = 256  # struct statx
_STATX_ATTRIBUTES = slice(8, 16)  # u64 stx_attributes
_STATX_ATTRIBUTES_MASK = slice(56, 64)  # u64 stx_attributes_mask: what this kernel reports

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# mount(2) copies one page of data and path_mount() puts a NUL in its last byte, so a longer
# string is silently cut: this is the longest that arrives whole.
MOUNT_DATA_MAX = os.sysconf("SC_PAGE_SIZE") - 1

# The new mount API (Linux 5.2; overlayfs takes `lowerdir+` one layer at a time from 6.8).
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOVE_MOUNT_F_EMPTY_PATH = 4
# fsconfig copies a string value with strndup_user(value, 256): longer ones are EINVAL.
FSCONFIG_VALUE_MAX = 255

# These syscalls got one number on every architecture but alpha; elsewhere we have none and
# report ENOSYS, as an older kernel would.
_SYSCALL_NUMBERS: dict[str, int] = (
    {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432}
    if os.uname().machine in ("x86_64", "aarch64")
    else {}
)

# mount(8) option words that are flags to mount(2) rather than filesystem data:
# word -> (flags to set, flags to clear).
_FLAG_WORDS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0),
    "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0),
    "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0),
    "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0),
    "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0),
    "nolazytime": (0, MS_LAZYTIME),
    "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "silent": (MS_SILENT, 0),
    "loud": (0, MS_SILENT),
}

# Words that would turn a mount into something else (a bind, a move, a remount, a
# propagation change) — never acceptable as a filesystem's options.
FORBIDDEN_WORDS = frozenset(
    {
        "bind", "rbind", "move", "remount", "defaults", "shared", "rshared", "slave", "rslave",
        "private", "rprivate", "unbindable", "runbindable", "mand", "nomand", "user", "users",
        "nouser", "owner", "group", "auto", "noauto", "_netdev", "nofail",
    }
)


@dataclass(frozen=True)
class MountOptions:
    flags: int
    data: str


def parse_options(words: list[str]) -> MountOptions:
    """Split mount(8)-style words into mount(2) flags and the filesystem's data string.

    The caller validates the words (no commas, no forbidden words); this only sorts them.
    """
    flags = 0
    data: list[str] = []
    for word in words:
        if word in _FLAG_WORDS:
            on, off = _FLAG_WORDS[word]
            flags = (flags | on) & ~off
        else:
            data.append(word)
    return MountOptions(flags, ",".join(data))


def _raise(path: str | None) -> NoReturn:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        _raise(target)


def umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        _raise(target)


def _syscall(name: str, path: str | None, *args: object) -> int:
    number = _SYSCALL_NUMBERS.get(name)
    if number is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)
    rc = _libc.syscall(ctypes.c_long(number), *args)
    if rc < 0:
        _raise(path)
    return int(rc)


def _with_fs_log(exc: OSError, fs_fd: int) -> OSError:
    """`exc` with the filesystem's own words from the context's log, which often say more
    than the errno ("overlay: Unknown parameter 'lowerdir+'")."""
    messages = []
    for _ in range(8):  # the kernel keeps the last 8
        try:
            line = os.read(fs_fd, 4096).decode(errors="replace").strip()
        except OSError:  # ENODATA: no more
            break
        messages.append(line[2:] if line[1:2] == " " else line)  # drop the "e "/"w " level
    if not messages:
        return exc
    return OSError(exc.errno, f"{exc.strerror}: {'; '.join(messages)}", exc.filename)


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    """A filesystem context of type `fstype`, to be set up with `fsconfig`."""
    return _syscall("fsopen", fstype, ctypes.c_char_p(fstype.encode()), ctypes.c_uint(flags))


def fsconfig(
    fs_fd: int, cmd: int, key: str | None = None, value: str | None = None, aux: int = 0,
    path: str | None = None,
) -> None:
    """One fsconfig(2) command; an error names `path` (by default the value)."""
    try:
        _syscall(
            "fsconfig", path if path is not None else value, ctypes.c_int(fs_fd),
            ctypes.c_uint(cmd), ctypes.c_char_p(key.encode() if key is not None else None),
            ctypes.c_char_p(value.encode() if value is not None else None), ctypes.c_int(aux),
        )
    except OSError as exc:
        raise _with_fs_log(exc, fs_fd) from None


def fsmount(fs_fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    """A detached mount of the created context's superblock; attach it with `move_mount`."""
    try:
        return _syscall("fsmount", None, ctypes.c_int(fs_fd), ctypes.c_uint(flags),
                        ctypes.c_uint(attr_flags))  # fmt: skip
    except OSError as exc:
        raise _with_fs_log(exc, fs_fd) from None


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int = 0) -> None:
    _syscall(
        "move_mount", to_path, ctypes.c_int(from_dfd), ctypes.c_char_p(from_path.encode()),
        ctypes.c_int(to_dfd), ctypes.c_char_p(to_path.encode()), ctypes.c_uint(flags),
    )


# statvfs(3) f_flag bits -> the mount(2) flags that set them on a mount.
_ST_TO_MS = (
    (os.ST_RDONLY, MS_RDONLY),
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
)


def mount_flags(path: str) -> int:
    """The per-mount flags of the mount holding `path`, as mount(2) flags.

    A remount of a bind mount (MS_REMOUNT | MS_BIND) replaces all of them, so whoever remounts
    passes these along to keep `nosuid`, `nodev`, `noexec` and the atime mode.
    """
    f_flag = os.statvfs(path).f_flag
    flags = 0
    for st, ms in _ST_TO_MS:
        if f_flag & st:
            flags |= ms
    if not f_flag & (os.ST_NOATIME | os.ST_RELATIME):
        flags |= MS_STRICTATIME
    return flags


def is_mountpoint(path: str) -> bool:
    """True when `path` (symlinks followed) is the root of a mount.

    statx's STATX_ATTR_MOUNT_ROOT answers in microseconds, where reading mountinfo takes a
    quarter of a millisecond (a container start asks twice); mountinfo is the fallback for a
    kernel or libc without it.
    """
    try:
        attributes = _statx_attributes(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if attributes is not None:
        value, known = attributes
        if known & STATX_ATTR_MOUNT_ROOT:
            return bool(value & STATX_ATTR_MOUNT_ROOT)
    real = os.path.realpath(path)
    return any(entry.mountpoint == real for entry in mountinfo())


def _statx_attributes(path: str) -> tuple[int, int] | None:
    """(stx_attributes, stx_attributes_mask) of `path`, or None without statx."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(AT_FDCWD, os.fsencode(path), 0, 0, buf) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return None
        raise OSError(err, os.strerror(err), path)
    raw = buf.raw
    return (int.from_bytes(raw[_STATX_ATTRIBUTES], sys.byteorder),
            int.from_bytes(raw[_STATX_ATTRIBUTES_MASK], sys.byteorder))  # fmt: skip


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal; filesystems' options also
    # escape their separators (overlayfs: ',' and '=').
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def super_options(options: str) -> list[tuple[str, str]]:
    """A mountinfo super-options field as (key, value) pairs in the kernel's order, values
    unescaped (a bare flag has value ""). Commas inside values are escaped, so the split is safe."""
    pairs = []
    for item in options.split(","):
        key, _, value = item.partition("=")
        pairs.append((_unescape(key), _unescape(value)))
    return pairs


def mountinfo(pid: str = "self") -> list[MountEntry]:
    entries = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            fstype, source, *rest = right.split()
            entries.append(
                MountEntry(
                    mount_id=int(parts[0]),
                    parent_id=int(parts[1]),
                    major_minor=parts[2],
                    root=_unescape(parts[3]),
                    mountpoint=_unescape(parts[4]),
                    fstype=fstype,
                    source=_unescape(source),
                    options=rest[0] if rest else "",
                )
            )
    return entries
