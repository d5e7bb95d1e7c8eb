"""Bind-mount a directory of the host, e.g. an unpacked root filesystem used as an image.

The directory is bound (not recursively: filesystems mounted below it are not part of the
image) on a fresh `mount_*` directory, made private so that later mounts under the source do
not propagate into it, and remounted read-only unless `ro` is false (a plain bind ignores
MS_RDONLY; the remount keeps the source mount's nosuid/nodev/noexec). Like any mount it can be
an overlay's lower layer or a container's root.

Refused: paths that are not absolute directories, and directories inside imageapi's own
mount directory or containing it (one would pin imageapi's mounts, the other would expose
every overlay's private upper layer).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from imageapi.drivers import checks
from imageapi.drivers.base import Node, Spec, State
from imageapi.drivers.mountpoints import MountpointDriver, mount_error, remove_dir
from imageapi.errors import ApiError, BadRequest, SystemFault, describe_oserror
from imageapi.kernel import mount as kmount

_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES}


class BindMount(MountpointDriver):
    kind = "bind"
    noun = "bind mount"

    def normalize(self, spec: Spec) -> Spec:
        return checks.host_file_spec(spec)

    def check_available(self, spec: Spec) -> None:
        # Early and friendly; `build` checks again, on the directory it actually binds.
        path = spec["path"]
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _path_error(exc, path) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise BadRequest(f"path: {path} is not a directory")
        self._refuse_own(os.path.realpath(path), path)

    def _refuse_own(self, real: str, path: str) -> None:
        own = os.path.realpath(self.mount_dir)
        if real == own or real.startswith(own.rstrip("/") + "/"):
            raise BadRequest(f"path: {path} is inside imageapi's mount directory ({own})")
        if own.startswith(real.rstrip("/") + "/"):
            raise BadRequest(
                f"path: {path} contains imageapi's mount directory ({own}), "
                "which holds the private layers of other mounts"
            )

    def build(self, node: Node) -> State:
        path, ro = node.spec["path"], node.spec["ro"]
        # Pinned by an O_PATH descriptor: what is checked is what gets bound, even if the path
        # is changed meanwhile (mount(2) follows /proc/self/fd/N to the very directory).
        try:
            pinned = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _path_error(exc, path) from exc
        try:
            source = f"/proc/self/fd/{pinned}"
            self._refuse_own(os.readlink(source), path)
            target = self.fresh(node.id, "mount_")
            try:
                with self.step(node.id, "mount", path=str(target), source=path, fstype="bind"):
                    kmount.mount(source, str(target), None, kmount.MS_BIND)
            except OSError as exc:
                remove_dir(target)
                raise mount_error(exc, f"cannot bind-mount {path}") from exc
        finally:
            os.close(pinned)
        try:
            kmount.mount("", str(target), None, kmount.MS_PRIVATE)
            if ro:
                flags = kmount.mount_flags(str(target)) | kmount.MS_RDONLY
                kmount.mount("", str(target), None, kmount.MS_REMOUNT | kmount.MS_BIND | flags)
        except OSError as exc:
            kmount.umount(str(target), kmount.UMOUNT_NOFOLLOW)  # nothing can use it yet
            remove_dir(target)
            raise mount_error(exc, f"cannot make the bind mount of {path} read-only") from exc
        return {"mountpoint": str(target)}

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": node.id,
            "path": node.spec["path"],
            "ro": node.spec["ro"],
            "mountpoint": node.record["mountpoint"],
        }


def _path_error(exc: OSError, path: str) -> ApiError:
    if exc.errno in _PATH_ERRNOS:
        return BadRequest(describe_oserror(exc, "path: cannot open"))
    return SystemFault(describe_oserror(exc, f"cannot open {path}"))
