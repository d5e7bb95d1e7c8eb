"""Resolve paths inside an image the way the image itself will see them after pivot_root.

Symlinks are followed relative to the image root — an absolute link target starts again at
the image root and `..` stops there. The walk holds a descriptor of each directory and opens
one name at a time without following it, so the host's own path lookup never runs on the
image's names: neither a symlink nor a concurrent change (an overlay is writable) can make a
check wander onto the host's files. These checks give clear answers before anything runs;
the container's init resolves in the image by itself again when it mounts (`rootfs`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from imageapi.errors import BadRequest
from imageapi.runtime.rootfs import MOUNTPOINTS

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SYMLINKS = 40
_O_ENTRY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Top-level directories the container gets from the kernel (proc, a tmpfs, sysfs): what
# the image has there is hidden at run time.
_KERNEL_DIRS = frozenset(p.strip("/") for p in MOUNTPOINTS)


@dataclass
class Walk:
    """How far a path resolves inside an image: `fd` (O_PATH) holds the last component found,
    `found` is its path inside the image and `missing` what is left from the first name that
    does not exist (empty when the whole path resolved)."""

    fd: int
    found: list[str]
    missing: list[str] = field(default_factory=list)

    def where(self) -> str:
        return "/" + "/".join(self.found + self.missing)

    def __enter__(self) -> Walk:
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def walk_in_root(rootfd: int, path: str) -> Walk:
    """Resolve `path` inside the directory `rootfd`; raises OSError (ELOOP, ENOTDIR)."""
    fds: list[int] = []  # the directories walked into below the root, owned here
    names: list[str] = []
    todo = _parts(path)
    links = 0
    try:
        while todo:
            part = todo.pop(0)
            if part == "..":
                if fds:
                    os.close(fds.pop())
                    names.pop()
                continue
            try:
                fd = os.open(part, _O_ENTRY, dir_fd=fds[-1] if fds else rootfd)
            except FileNotFoundError:
                todo.insert(0, part)
                break
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                target = os.readlink("", dir_fd=fd)  # the link the O_PATH fd holds
                os.close(fd)
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                if target.startswith("/"):
                    while fds:
                        os.close(fds.pop())
                    names.clear()
                todo = _parts(target) + todo
                continue
            fds.append(fd)
            names.append(part)
            if todo and not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/" + "/".join(names))
        return Walk(os.dup(fds[-1] if fds else rootfd), list(names), todo)
    finally:
        for fd in fds:
            os.close(fd)


def _open_root(root: str) -> int:
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def find_entrypoint(root: str, word: str) -> str:
    """The entrypoint's path inside the image: `word` itself, or found in a clean PATH.

    Raises BadRequest unless it resolves (inside the image) to an executable regular file.
    """
    candidates = [word] if "/" in word else [f"{d}/{word}" for d in CLEAN_PATH.split(":")]
    if not word.startswith("/") and "/" in word:
        raise BadRequest(f"command: {word!r} must be an absolute path inside the image")
    rootfd = _open_root(root)
    try:
        for candidate in candidates:
            try:
                walk = walk_in_root(rootfd, candidate)
            except OSError:
                continue
            with walk:
                if walk.missing:
                    continue
                st = os.fstat(walk.fd)
                if not stat.S_ISREG(st.st_mode):
                    raise BadRequest(f"command: {candidate} in the image is not a regular file")
                if not st.st_mode & 0o111:
                    raise BadRequest(f"command: {candidate} in the image is not executable")
                if os.statvfs(walk.fd).f_flag & os.ST_NOEXEC:
                    raise BadRequest(f"command: {candidate} is on a filesystem mounted noexec")
                return candidate
    finally:
        os.close(rootfd)
    where = word if "/" in word else f"{word} (searched {CLEAN_PATH})"
    raise BadRequest(f"command: {where} does not exist in the image")


def check_mountpoints(root: str, paths: Iterable[str]) -> None:
    """Each path must be a directory in the image, or the image writable so it can be made.

    Raises BadRequest: a read-only image (a bare squashfs) lacking /run, say, is the request's
    doing, to be refused before anything runs. The kernel's mountpoints (`/proc`, `/dev`,
    `/sys`) must be directories of the image's own, not symlinks; the others are followed
    inside the image and must not lead into those, nor onto the image's root.
    """
    writable = os.access(root, os.W_OK)  # a read-only filesystem answers EROFS
    rootfd = _open_root(root)
    try:
        for path in paths:
            if path in MOUNTPOINTS:
                _check_kernel_mountpoint(rootfd, path, writable)
            else:
                _check_mountpoint(rootfd, path, writable)
    finally:
        os.close(rootfd)


def _read_only(path: str, how: str = "") -> BadRequest:
    return BadRequest(f"the image has no {path}{how} and is read-only, so it cannot be made; "
                      "run the container on an overlay of it")


def _check_kernel_mountpoint(rootfd: int, path: str, writable: bool) -> None:
    name = path.strip("/")
    try:
        mode = os.stat(name, dir_fd=rootfd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        if not writable:
            raise _read_only(path) from None
        return
    if stat.S_ISLNK(mode):
        target = os.readlink(name, dir_fd=rootfd)
        raise BadRequest(f"{path} in the image is a symlink (to {target}); it must be a "
                         f"directory, on which the container gets the kernel's {path}")
    if not stat.S_ISDIR(mode):
        raise BadRequest(f"{path} in the image is not a directory")


def _check_mountpoint(rootfd: int, path: str, writable: bool) -> None:
    try:
        walk = walk_in_root(rootfd, path)
    except OSError as exc:
        raise BadRequest(f"{path} in the image cannot be resolved: {exc.strerror}"
                         + (f" ({exc.filename})" if exc.filename != path else "")) from None
    with walk:
        where = walk.where()
        how = f" (its symlinks lead to {where})" if where != "/" + "/".join(_parts(path)) else ""
        top = (walk.found + walk.missing)[:1]
        if not top:
            raise BadRequest(f"{path} in the image leads to the image's root itself")
        if top[0] in _KERNEL_DIRS:
            raise BadRequest(f"{path} in the image leads to {where}, under /{top[0]}, which "
                             "the container gets from the kernel")
        if walk.missing:
            if not writable:
                raise _read_only(path, how)
            return
        if not stat.S_ISDIR(os.fstat(walk.fd).st_mode):
            raise BadRequest(f"{path} in the image is not a directory{how}")
