"""The FUSE filesystem that looks like /sys/bus/rbd (mfusepy over libfuse3, multi-threaded)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import sys
import threading
import time
from typing import Any

# mfusepy takes libfuse 2 when both are installed (Ceph's packages pull in libfuse2), and this
# filesystem speaks libfuse 3 (its multi-threading options): name the library it must load.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy

from .cluster import RBD_FEATURES_SUPPORTED
from .kparse import PAGE_SIZE, KernelError
from .mounts import is_mounted
from .sim import Simulator

# Bus attributes (rbd_bus_attrs): the write-only ones (0200); supported_features is 0444.
BUS_WRITE_ONLY = ("add", "remove", "add_single_major", "remove_single_major")
SINGLE_MAJOR_ONLY = ("add_single_major", "remove_single_major")
SUPPORTED_FEATURES = f"0x{RBD_FEATURES_SUPPORTED:x}\n".encode()
# Device attributes (rbd_attrs): everything 0444 but these.
DEVICE_ATTR_MODES = {"config_info": 0o400, "refresh": 0o200}
DEVICE_ATTRS = (
    "size", "features", "major", "minor", "client_addr", "client_id", "cluster_fsid",
    "config_info", "pool", "pool_id", "pool_ns", "name", "image_id", "current_snap", "snap_id",
    "parent", "refresh",
)  # fmt: skip


def _err(code: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(code)


class SysfsRbd(mfusepy.Operations):
    """Paths: / (the bus dir), /devices/<id>/<attr>, /drivers (empty, as for every bus)."""

    use_ns = True

    def __init__(self, sim: Simulator, mountpoint: str, ready_out: Any = None) -> None:
        self.sim = sim
        self.mountpoint = os.path.realpath(mountpoint)
        self.ready_out = ready_out if ready_out is not None else sys.stdout
        self.started_ns = time.time_ns()

    # ------------------------------------------------------------------ lifecycle

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if config_3 is not None:
            # sysfs content changes under the client: no attribute, entry or data caching.
            config_3.entry_timeout = 0.0
            config_3.negative_timeout = 0.0
            config_3.attr_timeout = 0.0
            config_3.direct_io = 1
        threading.Thread(target=self._announce_ready, name="krbdsim-ready", daemon=True).start()

    def _announce_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                try:
                    os.stat(os.path.join(self.mountpoint, "devices"))  # a round trip via FUSE
                except OSError:
                    pass
                else:
                    print("ready", file=self.ready_out, flush=True)
                    return
            time.sleep(0.01)
        print("krbdsim: mount never became live", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ lookup

    def _resolve(self, path: str) -> tuple[str, Any]:
        """-> (kind, detail): kind is dir, bus_wo, bus_ro, dev_dir, dev_attr; or ENOENT."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return "dir", None
        if len(parts) == 1:
            name = parts[0]
            if name in ("devices", "drivers"):
                return "dir", name
            if name in BUS_WRITE_ONLY:
                # rbd_bus_is_visible(): *_single_major do not exist without single_major.
                if name in SINGLE_MAJOR_ONLY and not self.sim.single_major:
                    raise _err(errno.ENOENT)
                return "bus_wo", name
            if name == "supported_features":
                return "bus_ro", name
            raise _err(errno.ENOENT)
        if parts[0] != "devices":
            raise _err(errno.ENOENT)
        dev = self.sim.device(parts[1])
        if dev is None:
            raise _err(errno.ENOENT)
        if len(parts) == 2:
            return "dev_dir", dev
        if len(parts) == 3 and parts[2] in DEVICE_ATTRS:
            return "dev_attr", (dev, parts[2])
        raise _err(errno.ENOENT)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        kind, detail = self._resolve(path)
        t = self.started_ns
        base = {"st_uid": 0, "st_gid": 0, "st_atime": t, "st_mtime": t, "st_ctime": t}
        if kind in ("dir", "dev_dir"):
            return {**base, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0}
        if kind == "bus_wo":
            mode = 0o200
        elif kind == "bus_ro":
            mode = 0o444
        else:
            mode = DEVICE_ATTR_MODES.get(detail[1], 0o444)
        # sysfs reports every attribute as one page long.
        return {**base, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": PAGE_SIZE}

    def readdir(self, path: str, fh: int) -> list[str]:
        kind, detail = self._resolve(path)
        if kind == "dir" and detail is None:
            names = [
                n for n in BUS_WRITE_ONLY if self.sim.single_major or n not in SINGLE_MAJOR_ONLY
            ]
            return [".", "..", *names, "supported_features", "devices", "drivers"]
        if kind == "dir" and detail == "devices":
            return [".", "..", *self.sim.device_ids()]
        if kind == "dir":
            return [".", ".."]
        if kind == "dev_dir":
            return [".", "..", *DEVICE_ATTRS]
        raise _err(errno.ENOTDIR)

    # ------------------------------------------------------------------ I/O

    def open(self, path: str, flags: int) -> int:
        kind, detail = self._resolve(path)
        if kind in ("dir", "dev_dir"):
            raise _err(errno.EISDIR)
        accmode = flags & os.O_ACCMODE
        writable = kind == "bus_wo" or (kind == "dev_attr" and detail[1] == "refresh")
        # kernfs_fop_open(): reading needs a show(), writing a store(); root is no exception.
        if accmode in (os.O_RDONLY, os.O_RDWR) and writable:
            raise _err(errno.EACCES)
        if accmode in (os.O_WRONLY, os.O_RDWR) and not writable:
            raise _err(errno.EACCES)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        kind, detail = self._resolve(path)
        if kind == "bus_ro":
            data = SUPPORTED_FEATURES
        elif kind == "dev_attr" and detail[1] != "refresh":
            data = detail[0].attrs[detail[1]]
        else:
            raise _err(errno.EACCES)
        return data[offset : offset + size]

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        # `echo ... > add` opens with O_TRUNC; sysfs ignores the truncation.
        kind, _ = self._resolve(path)
        if kind in ("bus_wo", "dev_attr"):
            return 0
        raise _err(errno.EISDIR)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        kind, detail = self._resolve(path)
        # sysfs hands store() at most one page, NUL-terminated, whatever the file position.
        data = data[:PAGE_SIZE]
        if not data:
            return 0
        text = data.split(b"\0", 1)[0].decode("latin-1")
        try:
            if kind == "bus_wo":
                name = detail
                if name in ("add", "remove") and self.sim.single_major:
                    # add_store()/remove_store(): refused while single_major is on.
                    raise KernelError(errno.EINVAL, f"rbd: {name} refused with single_major")
                if name.startswith("add"):
                    self.sim.add(text)
                else:
                    self.sim.remove(text)
                return len(data)
            if kind == "dev_attr" and detail[1] == "refresh":
                return len(data)  # rbd_image_refresh(): the simulated header never changes
        except KernelError as exc:
            raise _err(exc.errno or errno.EIO) from None
        raise _err(errno.EACCES)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
MNT_DETACH = 2


def _umount(mountpoint: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.fsencode(mountpoint)
    if libc.umount2(target, 0) != 0 and ctypes.get_errno() == errno.EBUSY:
        # Someone still has a file open in it: detach now, the connection ends when they close.
        libc.umount2(target, MNT_DETACH)


def _stop_on_signal(mountpoint: str, done: threading.Event) -> None:
    """Wait for a stop signal, then unmount: libfuse's loop then ends with status 0.

    Doing this ourselves (instead of libfuse's handlers) tells a requested stop apart from a
    failure, which libfuse reports with the same return code.
    """
    sig = signal.sigwait(STOP_SIGNALS)
    print(f"krbdsim: {signal.Signals(sig).name}: unmounting {mountpoint}", file=sys.stderr)
    while not done.is_set():
        if is_mounted(mountpoint):
            _umount(mountpoint)
        done.wait(0.05)


def serve(sim: Simulator, mountpoint: str) -> None:
    """Mount and serve until a stop signal (SIGTERM, SIGINT, SIGHUP) or an unmount.

    Raises RuntimeError when libfuse fails (mount refused, loop error).
    """
    # Blocked in every thread (libfuse's workers inherit the mask), taken by sigwait alone.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    done = threading.Event()
    threading.Thread(
        target=_stop_on_signal, args=(mountpoint, done), name="krbdsim-signals", daemon=True
    ).start()
    ops = SysfsRbd(sim, mountpoint)
    try:
        mfusepy.FUSE(
            ops,
            mountpoint,
            foreground=True,
            allow_other=True,
            default_permissions=True,
            fsname="krbdsim",
            subtype="krbdsim",
            max_threads=16,
            max_idle_threads=8,
        )
    finally:
        done.set()
