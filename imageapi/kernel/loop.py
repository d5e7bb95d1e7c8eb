"""Loop devices through the kernel's ioctl interface, not losetup(8).

The facts used here are those of the kernel's UAPI header `include/uapi/linux/loop.h` and of
`Documentation/ABI/testing/sysfs-block-loop`:

- `/dev/loop-control` answers `LOOP_CTL_GET_FREE` with the number N of an unbound device
  (creating one if none is free); the device is `/dev/loopN`.
- `LOOP_CONFIGURE` (Linux 5.8) binds a backing file descriptor and sets the flags in one call,
  taking a `struct loop_config`; older kernels need `LOOP_SET_FD` then `LOOP_SET_STATUS64`
  (a `struct loop_info64`). A device that is not free answers `EBUSY` — another process may
  take N between GET_FREE and the bind, so the caller tries again with a new N.
- `LO_FLAGS_AUTOCLEAR`: the kernel unbinds the device when its last opener closes it. So the
  process that sets a device up must keep it open for as long as the device should exist
  (`LoopDevice.fd`), or it is unbound the moment setup ends; closing that descriptor after the
  last mount has gone unbinds it, and a crashed daemon leaks no device.
- `LO_FLAGS_READ_ONLY` makes the device read-only; `LO_FLAGS_DIRECT_IO` asks for direct I/O on
  the backing file (no second copy of the image in the page cache), which the kernel silently
  drops when the backing file cannot do it: the flags read back with `LOOP_GET_STATUS64` say
  what it got.
- `LOOP_CLR_FD` unbinds (on recent kernels: marks for unbinding at the last close).
- `/sys/block/loopN/loop/backing_file` names the file a bound device reads, `/sys/block/loopN/ro`
  says whether it is read-only.

The backing file is opened by the caller and only needs to stay open during setup: the device
holds its own reference to it. Every failure is an `OSError` with errno and the path concerned.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# -- include/uapi/linux/loop.h -----------------------------------------------------------------

LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82


class LoopInfo64(ctypes.Structure):
    """`struct loop_info64` (232 bytes)."""

    _fields_ = [
        ("lo_device", ctypes.c_uint64),  # st_dev of the backing file (read-only)
        ("lo_inode", ctypes.c_uint64),  # st_ino of the backing file (read-only)
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),  # bytes, 0 == the whole file
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),  # obsolete
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * LO_KEY_SIZE),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class LoopConfig(ctypes.Structure):
    """`struct loop_config` (304 bytes), the argument of LOOP_CONFIGURE."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),  # 0: the kernel's choice
        ("info", LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


assert ctypes.sizeof(LoopInfo64) == 232 and ctypes.sizeof(LoopConfig) == 304

# errno of LOOP_CONFIGURE on kernels that do not know it (the loop driver's default case
# answers EINVAL; other block layers ENOTTY).
_UNKNOWN_IOCTL = {errno.EINVAL, errno.ENOTTY}
# How often to ask for another free device when the one we were given is taken meanwhile.
BUSY_RETRIES = 32


@dataclass
class LoopDevice:
    """A bound loop device, held open by us (`fd`) so that autoclear keeps it bound."""

    number: int
    path: str
    fd: int | None
    backing: tuple[int, int]  # (st_dev, st_ino) of the backing file
    read_only: bool
    direct_io: bool

    @property
    def name(self) -> str:
        return f"loop{self.number}"


@dataclass(frozen=True)
class Binding:
    """A bound loop device as sysfs shows it (ours or anybody's)."""

    name: str  # "loop3"
    backing_file: str
    read_only: bool
    backing: tuple[int, int] | None  # (st_dev, st_ino), None if the path cannot be stat'ed


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure, path: str) -> int:
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)  # type: ignore[call-overload]
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None


class Loop:
    """The loop driver of one host: `/dev/loop-control`, `/dev/loopN`, `/sys/block/loopN`."""

    def __init__(
        self,
        dev_dir: Path = Path("/dev"),
        sysfs: Path = Path("/sys/block"),
        node_timeout: float = 5.0,
        use_configure: bool | None = None,
    ) -> None:
        self.dev_dir = dev_dir
        self.sysfs = sysfs
        self.node_timeout = node_timeout
        # None: try LOOP_CONFIGURE and remember when the kernel does not know it.
        self.use_configure = use_configure
        # Numbers of the devices this object holds, so that a detach never mistakes a device
        # that was reused meanwhile for one of our own attachments of the same file.
        self._held: set[int] = set()
        self._lock = threading.Lock()

    # -- setting up ------------------------------------------------------------------------

    def attach(
        self, backing_fd: int, *, read_only: bool, direct_io: bool = True, name: str = "",
        autoclear: bool = True, tag: str = "", partscan: bool = False,
    ) -> LoopDevice:
        """Bind a free loop device to the open file `backing_fd`, with autoclear unless told.

        The backing file must be open read-only for a read-only device and read-write
        otherwise; the caller may close it afterwards. The device is returned open: closing
        `LoopDevice.fd` (see `detach`) is what unbinds it once nothing else has it open.
        Without autoclear the device stays bound until `detach` clears it (whoever holds it).
        `tag` prefixes the device's `lo_file_name` (informational: 64 bytes the kernel keeps
        and reads back, which tools do not show): whoever set a device up can recognise it
        later (`tagged`) without any other record. (`lo_crypt_name` would be the natural
        place, but kernels since the loop driver lost its encryption no longer keep it.)
        """
        st = os.fstat(backing_fd)
        backing = (st.st_dev, st.st_ino)
        for _ in range(BUSY_RETRIES):
            number = self.get_free()
            path = str(self.dev_dir / f"loop{number}")
            try:
                fd = self._open_node(path, os.O_RDONLY if read_only else os.O_RDWR)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENODEV):  # removed meanwhile
                    continue
                raise
            try:
                flags = self._bind(fd, path, backing_fd, read_only, direct_io, name,
                                   autoclear, tag, partscan)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    log.debug("%s was taken by someone else; asking for another", path)
                    continue
                raise
            with self._lock:
                self._held.add(number)
            return LoopDevice(
                number=number, path=path, fd=fd, backing=backing,
                read_only=bool(flags & LO_FLAGS_READ_ONLY),
                direct_io=bool(flags & LO_FLAGS_DIRECT_IO),
            )  # fmt: skip
        raise OSError(
            errno.EBUSY, f"every free loop device was taken by others ({BUSY_RETRIES} tries)",
            str(self.dev_dir / "loop-control"),
        )  # fmt: skip

    def get_free(self) -> int:
        control = str(self.dev_dir / "loop-control")
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
        try:
            return _ioctl(fd, LOOP_CTL_GET_FREE, 0, control)
        finally:
            os.close(fd)

    def _open_node(self, path: str, mode: int) -> int:
        """Open /dev/loopN; a device GET_FREE has just created may need a moment for its node
        where /dev is not devtmpfs (udev creates it)."""
        deadline = time.monotonic() + self.node_timeout
        while True:
            try:
                return os.open(path, mode | os.O_CLOEXEC)
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _bind(
        self, fd: int, path: str, backing_fd: int, read_only: bool, direct_io: bool, name: str,
        autoclear: bool = True, tag: str = "", partscan: bool = False,
    ) -> int:
        """Bind and configure; returns the flags the device ended up with. `partscan`: the
        kernel reads the image's partition table (`/dev/loopNpM`)."""
        flags = (LO_FLAGS_AUTOCLEAR if autoclear else 0) | (LO_FLAGS_READ_ONLY if read_only
                                                             else 0)
        flags |= LO_FLAGS_PARTSCAN if partscan else 0
        if self.use_configure is not False:
            tries = [flags | LO_FLAGS_DIRECT_IO, flags] if direct_io else [flags]
            for want in tries:
                config = LoopConfig(fd=backing_fd)
                config.info.lo_flags = want
                _set_name(config.info, name, tag)
                try:
                    _ioctl(fd, LOOP_CONFIGURE, config, path)
                except OSError as exc:
                    if exc.errno in _UNKNOWN_IOCTL:
                        continue  # without direct I/O, or an old kernel: see below
                    raise
                self.use_configure = True
                return self.status(fd, path).lo_flags
        flags = self._bind_old(fd, path, backing_fd, direct_io, name, autoclear, tag, partscan)
        if self.use_configure is None:
            # EINVAL for LOOP_CONFIGURE, yet the old way works: a kernel before 5.8.
            log.info("LOOP_CONFIGURE is not known here: using LOOP_SET_FD from now on")
            self.use_configure = False
        return flags

    def _bind_old(self, fd: int, path: str, backing_fd: int, direct_io: bool, name: str,
                  autoclear: bool = True, tag: str = "", partscan: bool = False) -> int:
        """LOOP_SET_FD + LOOP_SET_STATUS64: read-only follows the backing file's open mode."""
        _ioctl(fd, LOOP_SET_FD, backing_fd, path)
        try:
            info = LoopInfo64()
            info.lo_flags = (LO_FLAGS_AUTOCLEAR if autoclear else 0) | (
                LO_FLAGS_PARTSCAN if partscan else 0)
            _set_name(info, name, tag)
            _ioctl(fd, LOOP_SET_STATUS64, info, path)
        except OSError:
            _clear_quietly(fd, path)
            raise
        if direct_io:
            try:
                _ioctl(fd, LOOP_SET_DIRECT_IO, 1, path)
            except OSError as exc:
                log.debug("%s: no direct I/O (%s)", path, exc.strerror)
        return self.status(fd, path).lo_flags

    def adopt(self, number: int, backing: tuple[int, int], read_only: bool,
              tag: str = "") -> LoopDevice | None:
        """Hold again a device bound earlier (by a previous run of the daemon): None unless
        `/dev/loopN` is still bound to that very file (st_dev, st_ino) — and carries `tag`,
        so one that somebody bound to the same file since is never taken for ours."""
        path = str(self.dev_dir / f"loop{number}")
        try:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                return None
            raise
        try:
            info = self.status(fd, path)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENXIO:
                return None
            raise
        if (info.lo_device, info.lo_inode) != tuple(backing) or not _tagged(info, tag):
            os.close(fd)
            return None
        with self._lock:
            self._held.add(number)
        return LoopDevice(number=number, path=path, fd=fd, backing=(backing[0], backing[1]),
                          read_only=bool(info.lo_flags & LO_FLAGS_READ_ONLY),
                          direct_io=bool(info.lo_flags & LO_FLAGS_DIRECT_IO))

    def tagged(self, tag: str) -> list[tuple[int, tuple[int, int]]]:
        """(number, backing) of every bound device whose `lo_crypt_name` is `tag`."""
        found = []
        for dev in sorted(self.sysfs.glob("loop[0-9]*")):
            if not (dev / "loop").is_dir():
                continue  # not bound
            path = str(self.dev_dir / dev.name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                info = self.status(fd, path)
            except OSError:
                continue
            finally:
                os.close(fd)
            if _tagged(info, tag):
                found.append((int(dev.name[4:]), (info.lo_device, info.lo_inode)))
        return found

    def clear(self, number: int, backing: tuple[int, int], tag: str = "") -> bool:
        """Unbind `/dev/loopN` if it is bound to that file, carries `tag` and nobody of ours
        holds it."""
        device = LoopDevice(number, str(self.dev_dir / f"loop{number}"), None,
                            (backing[0], backing[1]), True, False)
        return self._ours_and_bound(device, clear=True, tag=tag)

    # -- looking -----------------------------------------------------------------------------

    def status(self, fd: int, path: str) -> LoopInfo64:
        """LOOP_GET_STATUS64; ENXIO when the device is not bound."""
        info = LoopInfo64()
        _ioctl(fd, LOOP_GET_STATUS64, info, path)
        return info

    def bindings(self) -> list[Binding]:
        """Every bound loop device of the host, from sysfs."""
        found = []
        for dev in sorted(self.sysfs.glob("loop[0-9]*")):
            try:
                backing_file = (dev / "loop" / "backing_file").read_text().rstrip("\n")
                read_only = (dev / "ro").read_text().strip() == "1"
            except OSError:
                continue  # not bound (no loop/backing_file), or gone meanwhile
            try:
                st = os.stat(backing_file)
                backing: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except (OSError, ValueError):
                backing = None  # deleted, or in another mount namespace
            found.append(Binding(dev.name, backing_file, read_only, backing))
        return found

    # -- tearing down ------------------------------------------------------------------------

    def detach(self, device: LoopDevice, wait: float = 2.0, force: bool = False) -> bool:
        """Let the device go: refuse (EBUSY) while it is mounted or otherwise claimed
        exclusively, else close our descriptor and unbind it. Returns whether it is unbound
        now; if another process still has it open, it is left to autoclear, which unbinds it
        when that process closes it. `force` skips the refusal: a device still claimed is
        left to autoclear too.
        """
        if device.fd is not None:
            # An exclusive open fails while a filesystem (or anything else) claims the device:
            # then nothing changes and we keep holding it. Reopened through our descriptor, so
            # it is this very device whatever happened to its node in /dev.
            try:
                probe = os.open(
                    f"/proc/self/fd/{device.fd}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC
                )
            except OSError as exc:
                if not (force and exc.errno == errno.EBUSY):
                    raise OSError(exc.errno, exc.strerror, device.path) from None
            else:
                os.close(probe)
            fd, device.fd = device.fd, None
            with self._lock:
                self._held.discard(device.number)
            os.close(fd)  # with autoclear, the last close unbinds it
        if self._ours_and_bound(device, clear=True):
            deadline = time.monotonic() + wait
            while self._ours_and_bound(device, clear=False):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
        return True

    def _ours_and_bound(self, device: LoopDevice, clear: bool, tag: str = "") -> bool:
        """Whether the device is still bound to our backing file; with `clear`, LOOP_CLR_FD it
        (in case something turned autoclear off). A device someone else has bound to another
        file since, or that another attachment of ours holds now, is left alone."""
        with self._lock:
            if device.number in self._held:
                return False
        try:
            fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                return False
            raise
        try:
            try:
                info = self.status(fd, device.path)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return False
                raise
            if (info.lo_device, info.lo_inode) != device.backing or not _tagged(info, tag):
                return False
            if clear:
                try:
                    _ioctl(fd, LOOP_CLR_FD, 0, device.path)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
            return True
        finally:
            os.close(fd)  # if it was the last opener, this close unbinds it


def _tagged(info: LoopInfo64, tag: str) -> bool:
    return not tag or bytes(info.lo_file_name).startswith(tag.encode() + b" ")


def _set_name(info: LoopInfo64, name: str, tag: str = "") -> None:
    raw = ((tag.encode() + b" ") if tag else b"") + os.fsencode(name)
    raw = raw[: LO_NAME_SIZE - 1]
    ctypes.memmove(info.lo_file_name, raw, len(raw))


def _clear_quietly(fd: int, path: str) -> None:
    try:
        _ioctl(fd, LOOP_CLR_FD, 0, path)
    except OSError as exc:
        log.error("%s: cannot unbind after a failed setup: %s", path, exc)
