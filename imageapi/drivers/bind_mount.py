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
from pathlib import Path
from typing import Any

from imageapi.drivers import checks, inmount
from imageapi.drivers.base import Need, Node, Spec, State
from imageapi.drivers.generic import generic_need
from imageapi.drivers.mountpoints import MountpointDriver, mount_error, remove_dir, unmount
from imageapi.errors import ApiError, BadRequest, SystemFault, describe_oserror
from imageapi.kernel import mount as kmount

_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES}


class BindMount(MountpointDriver):
    kind = "bind"
    noun = "bind mount"

    def normalize(self, spec: Spec) -> Spec:
        out = checks.host_file_spec(spec)
        if "base" in out:  # the 0.2 shape: `recursive` too
            recursive = spec.get("recursive", False)
            if not isinstance(recursive, bool):
                raise BadRequest("recursive: must be true or false")
            out["recursive"] = recursive
            if out["base"] == "mount":
                generic_need(out["mount"], "mount")
        return out

    def needs(self, spec: Spec) -> list[Need]:
        return [generic_need(spec["mount"], "mount")] if spec.get("base") == "mount" else []

    def check_available(self, spec: Spec) -> None:
        # Early and friendly; `build` checks again, on the directory it actually binds.
        if spec.get("base") == "mount":
            return  # checked in the mount, once it exists
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
        recursive = bool(node.spec.get("recursive"))
        rec = kmount.MS_REC if recursive else 0
        mount = inmount.base_mount(node)
        # Pinned by an O_PATH descriptor: what is checked is what gets bound, even if the path
        # is changed meanwhile (mount(2) follows /proc/self/fd/N to the very directory).
        if mount is not None:
            pinned = inmount.pin_in_mount(mount, path, os.O_DIRECTORY)
            path = inmount.host_view(mount, path)
        else:
            try:
                pinned = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise _path_error(exc, path) from exc
        try:
            source = f"/proc/self/fd/{pinned}"
            if mount is None:  # inside one of our mounts is the point of base "mount"
                self._refuse_own(os.readlink(source), path)
            target = self.fresh(node.id, "mount_")
            try:
                with self.step(node.id, "mount", path=str(target), source=path, fstype="bind"):
                    kmount.mount(source, str(target), None, kmount.MS_BIND | rec)
            except OSError as exc:
                remove_dir(target)
                raise mount_error(exc, f"cannot bind-mount {path}") from exc
        finally:
            os.close(pinned)
        try:
            kmount.mount("", str(target), None, kmount.MS_PRIVATE | rec)
            if ro:
                # A bind remount changes one mount: each one of a recursive bind, top first.
                for where in [str(target), *(_below(str(target)) if recursive else [])]:
                    flags = kmount.mount_flags(where) | kmount.MS_RDONLY
                    kmount.mount("", where, None, kmount.MS_REMOUNT | kmount.MS_BIND | flags)
        except OSError as exc:
            self._unmount_tree(target)  # nothing can use it yet
            remove_dir(target)
            raise mount_error(exc, f"cannot make the bind mount of {path} read-only") from exc
        return {"mountpoint": str(target)}

    def destroy(self, node: Node, force: bool = False) -> None:
        if node.spec.get("recursive"):
            # The mounts below the top go first, deepest first; the top is the usual step.
            for where in reversed(_below(node.record["mountpoint"])):
                unmount(Path(where), lazy=force)
        super().destroy(node, force)

    @staticmethod
    def _unmount_tree(target: Path) -> None:
        for where in [*reversed(_below(str(target))), str(target)]:
            kmount.umount(where, kmount.UMOUNT_NOFOLLOW)

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        # Shown in the shape it was made with: v1's {path, ro}, or 0.2's with `base`.
        spec = node.spec
        view: dict[str, Any] = {"id": node.id, "path": spec["path"]}
        if "base" in spec:
            view["base"] = spec["base"]
            mount = inmount.base_mount(node)
            if mount is not None:
                ref: dict[str, Any] = {"kind": mount.kind, "mount_id": mount.id}
                if node.owns(mount):
                    ref[mount.kind] = embed(mount)
                view["mount"] = ref
            view["recursive"] = spec["recursive"]
        view["ro"] = spec["ro"]
        view["mountpoint"] = node.record["mountpoint"]
        return view


def _below(target: str) -> list[str]:
    """The mountpoints strictly below `target`, shallowest first (mountinfo's order)."""
    where = os.path.realpath(target).rstrip("/") + "/"
    return [e.mountpoint for e in kmount.mountinfo() if e.mountpoint.startswith(where)]


def _path_error(exc: OSError, path: str) -> ApiError:
    if exc.errno in _PATH_ERRNOS:
        return BadRequest(describe_oserror(exc, "path: cannot open"))
    return SystemFault(describe_oserror(exc, f"cannot open {path}"))
