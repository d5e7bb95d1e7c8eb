"""What every mount driver shares: fresh directories under the mount dir, and errno mapping."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageapi.drivers.base import Driver, Node
from imageapi.errors import ApiError, BadRequest, Conflict, SystemFault, describe_oserror
from imageapi.journal import Intent
from imageapi.kernel import mount as kmount

log = logging.getLogger(__name__)

# errno from mount(2) that the request itself caused (wrong fs type, bad option, ro device).
_CALLER_ERRNOS = {errno.EINVAL, errno.ENODEV, errno.EACCES, errno.EROFS, errno.ENOTBLK}


def mounted_as(target: str) -> kmount.MountEntry | None:
    """The mount at exactly `target` (the topmost, if stacked), or None."""
    found = None
    for entry in kmount.mountinfo():
        if entry.mountpoint == target:
            found = entry
    return found


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


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount without MNT_DETACH: a busy mount stays and the caller is told (409). With
    `lazy` (a forced delete), a mount still busy is detached now and goes when its last user
    does."""
    try:
        try:
            kmount.umount(str(mountpoint), kmount.UMOUNT_NOFOLLOW)
        except OSError as exc:
            if not (lazy and exc.errno == errno.EBUSY):
                raise
            log.warning("%s is busy: detached lazily (a forced delete)", mountpoint)
            kmount.umount(str(mountpoint), kmount.UMOUNT_NOFOLLOW | kmount.MNT_DETACH)
    except OSError as exc:
        # EINVAL: not a mountpoint; ENOENT: not even a directory (a destroy cut short after
        # its rmdir, finished at recovery): either way, already done.
        if exc.errno in (errno.EINVAL, errno.ENOENT) and not kmount.is_mountpoint(
            str(mountpoint)
        ):
            log.warning("%s was already unmounted outside imageapi", mountpoint)
            return
        if exc.errno == errno.EBUSY:
            raise Conflict(describe_oserror(exc, f"cannot unmount {mountpoint} (in use)")) from exc
        raise SystemFault(describe_oserror(exc, f"cannot unmount {mountpoint}")) from exc


class MountpointDriver(Driver):
    """A mount kind that mounts something on a fresh `mount_*` directory of its own.

    Each directory it makes and each mount it makes is a step of the record (`mkdir`,
    `mount`), so recovery can roll back those of an object that was never committed."""

    collection = "mount"
    # The directories of a record, besides the mountpoint, that are ours to remove.
    private_dirs: tuple[str, ...] = ()

    def __init__(self, mount_dir: Path) -> None:
        self.mount_dir = mount_dir

    def fresh(self, node_id: int, prefix: str) -> Path:
        """A new, empty directory `<mount dir>/<prefix>XXXXXXXX`, mode 0755, announced first."""
        while True:
            path = self.mount_dir / f"{prefix}{secrets.token_hex(4)}"
            with self.step(node_id, "mkdir", path=str(path)):
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    continue
            os.chmod(path, 0o755)
            return path

    def fstype_of(self, node: Node) -> str | None:
        """What mountinfo must show at the mountpoint (None: anything)."""
        return None

    def destroy(self, node: Node, force: bool = False) -> None:
        target = Path(node.record["mountpoint"])
        with self.step(node.id, "unmount", path=str(target)):
            unmount(target, lazy=force)
        with self.step(node.id, "rmdir", path=str(target)):
            remove_dir(target)
            for key in self.private_dirs:
                remove_dir(Path(node.record[key]), tree=True)

    def adopt(self, node: Node) -> str | None:
        target = node.record["mountpoint"]
        entry = mounted_as(target)
        if entry is None:
            return f"{target} is not mounted"
        want = self.fstype_of(node)
        if want is not None and entry.fstype != want:
            return f"{target} holds a {entry.fstype} filesystem, not {want}"
        return None

    def undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> str | None:
        path = str(intent.detail.get("path", ""))
        if not path.startswith(str(self.mount_dir).rstrip("/") + "/") or held("*", path):
            return None
        if intent.effect == "mount" and kmount.is_mountpoint(path):
            unmount(Path(path))
            return f"unmounted {path}"
        if intent.effect == "mkdir" and os.path.lexists(path):
            remove_dir(Path(path), tree=not kmount.is_mountpoint(path))
            return f"removed {path}"
        return None
