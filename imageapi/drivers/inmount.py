"""Files and directories given as a path inside another mount (the 0.2 `base: "mount"`).

The path is resolved by the kernel inside the mount's root (openat2 RESOLVE_IN_ROOT): an
absolute symlink or a `..` in the image stays in the image, and never reaches the host.
"""

from __future__ import annotations

import errno
import os

from imageapi.drivers.base import Node
from imageapi.errors import ApiError, BadRequest, SystemFault, describe_oserror
from imageapi.kernel.resolve import open_in_root

_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES,
                errno.EXDEV, errno.EPERM}  # fmt: skip


def base_mount(node: Node) -> Node | None:
    """The mount a `base: "mount"` object stands on (its one need), or None."""
    if node.spec.get("base") != "mount":
        return None
    return node.needs[0][1]


def pin_in_mount(mount: Node, path: str, flags: int) -> int:
    """An O_PATH descriptor of `path` inside `mount`'s root (close it)."""
    root = mount.record["mountpoint"]
    try:
        rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SystemFault(describe_oserror(exc, f"cannot open mount {mount.id}")) from exc
    try:
        return open_in_root(rootfd, path, os.O_PATH | flags)
    except OSError as exc:
        raise _error(exc, path, mount.id) from exc
    finally:
        os.close(rootfd)


def host_view(mount: Node, path: str) -> str:
    """Where the path is on the host, for messages and v1 views."""
    return os.path.join(mount.record["mountpoint"], path)


def _error(exc: OSError, path: str, mount_id: int) -> ApiError:
    if exc.errno in _PATH_ERRNOS:
        return BadRequest(describe_oserror(exc, f"path: cannot open {path!r} in mount {mount_id}"))
    return SystemFault(describe_oserror(exc, f"cannot open {path!r} in mount {mount_id}"))
