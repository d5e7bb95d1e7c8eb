"""Real loop devices behind the simulated rbd devices, and the "is it open?" question."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

from .mounts import mount_points

LOSETUP = "losetup"


class LoopError(Exception):
    pass


def attach(image: Path, read_only: bool) -> str:
    """`losetup --find --show [--read-only] IMAGE`; returns the device path (/dev/loopN)."""
    cmd = [LOSETUP, "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    cmd.append(str(image))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise LoopError(f"{' '.join(cmd)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout.strip()


def detach(device: str) -> None:
    """`losetup -d`. On a device still held (mounted) the kernel only sets autoclear, so the
    loop goes away when its last user lets go: the closest thing to rbd's forced removal."""
    proc = subprocess.run(
        [LOSETUP, "-d", device], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise LoopError(f"losetup -d {device}: {proc.stderr.strip()}")


def is_read_only(device: str) -> bool:
    name = Path(device).name
    return Path(f"/sys/block/{name}/ro").read_text().strip() == "1"


def _claimed_exclusively(device: str) -> bool:
    """A mounted filesystem (or dm, md, another O_EXCL opener) holds the device: EBUSY."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def _open_by_a_process(rdev: int) -> bool:
    """Does any process have an fd on a block device numbered `rdev` (through any node)?"""
    # Never stat through a FUSE mount: it may be ours (we would be asking ourselves) or another
    # simulator's; device nodes do not live there anyway.
    fuse_prefixes = tuple(p.rstrip("/") + "/" for p in mount_points("fuse"))
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            link = f"{fd_dir}/{fd}"
            try:
                target = os.readlink(link)
                # Only real paths can be block devices; never stat our own FUSE files.
                if not target.startswith("/") or target.startswith(fuse_prefixes):
                    continue
                st = os.stat(link)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                return True
    return False


def in_use(device: str, rdev: int) -> bool:
    """rbd's open_count > 0: the kernel counts every open of the disk, so both an exclusive
    claim (mount) and any plain open fd count."""
    return _claimed_exclusively(device) or _open_by_a_process(rdev)
