"""What every mount driver shares: fresh directories under the mount dir, and errno mapping."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from imageapi.drivers.base import Driver, Node
from imageapi.errors import ApiError, BadRequest, Conflict, SystemFault, describe_oserror
from imageapi.kernel import mount as kmount

log = logging.getLogger(__name__)

# errno from mount(2) that the request itself caused (wrong fs type, bad option, ro device).
_CALLER_ERRNOS = {errno.EINVAL, errno.ENODEV, errno.EACCES, errno.EROFS, errno.ENOTBLK}


def fresh_dir(base: Path, prefix: str) -> Path:
    """A new, empty directory `<base>/<prefix>XXXXXXXX`, mode 0755."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(path, 0o755)
    return path


def remove_dir(path: Path, tree: bool = False) -> None:
    try:
        if tree:
            shutil.rmtree(path)
        else:
            os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot remove %s: %s", path, exc)


def mount_error(exc: OSError, what: str) -> ApiError:
    if exc.errno in _CALLER_ERRNOS:
        return BadRequest(describe_oserror(exc, what))
    if exc.errno == errno.EBUSY:
        return Conflict(describe_oserror(exc, what))
    return SystemFault(describe_oserror(exc, what))


def unmount(mountpoint: Path) -> None:
    """Unmount without MNT_DETACH: a busy mount stays and the caller is told (409)."""
    try:
        kmount.umount(str(mountpoint), kmount.UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.EINVAL and not kmount.is_mountpoint(str(mountpoint)):
            log.warning("%s was already unmounted outside imageapi", mountpoint)
            return
        if exc.errno == errno.EBUSY:
            raise Conflict(describe_oserror(exc, f"cannot unmount {mountpoint} (in use)")) from exc
        raise SystemFault(describe_oserror(exc, f"cannot unmount {mountpoint}")) from exc


class MountpointDriver(Driver):
    """A mount kind that mounts something on a fresh `mount_*` directory of its own."""

    collection = "mount"

    def __init__(self, mount_dir: Path) -> None:
        self.mount_dir = mount_dir

    def destroy(self, node: Node) -> None:
        target = Path(node.state["mountpoint"])
        unmount(target)
        remove_dir(target)
