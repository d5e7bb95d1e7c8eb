"""Resolve paths inside an image the way the image itself will see them after pivot_root.

Symlinks are followed relative to the image root — an absolute link target starts again at
the image root and `..` stops there — so checking an entrypoint can never wander onto the
host's files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from imageapi.errors import BadRequest

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SYMLINKS = 40


def resolve_in_root(root: str, path: str) -> str:
    """The host path that `path` names inside `root`; raises FileNotFoundError / OSError."""
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, part)
        st = os.lstat(host)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(40, "too many levels of symbolic links", path)
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
    return os.path.join(root, *done)


def find_entrypoint(root: str, word: str) -> str:
    """The entrypoint's path inside the image: `word` itself, or found in a clean PATH.

    Raises BadRequest unless it resolves (inside the image) to an executable regular file.
    """
    candidates = [word] if "/" in word else [f"{d}/{word}" for d in CLEAN_PATH.split(":")]
    if not word.startswith("/") and "/" in word:
        raise BadRequest(f"command: {word!r} must be an absolute path inside the image")
    for candidate in candidates:
        try:
            host = resolve_in_root(root, candidate)
            st = os.stat(host)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"command: {candidate} in the image is not a regular file")
        if not st.st_mode & 0o111:
            raise BadRequest(f"command: {candidate} in the image is not executable")
        if os.statvfs(host).f_flag & os.ST_NOEXEC:
            raise BadRequest(f"command: {candidate} is on a filesystem mounted noexec")
        return candidate
    where = word if "/" in word else f"{word} (searched {CLEAN_PATH})"
    raise BadRequest(f"command: {where} does not exist in the image")


def check_mountpoints(root: str, paths: Iterable[str]) -> None:
    """Each path must be a directory in the image, or the image writable so it can be made.

    Raises BadRequest: a read-only image (a bare squashfs) lacking /run, say, is the request's
    doing, to be refused before anything runs.
    """
    for path in paths:
        try:
            host = resolve_in_root(root, path)
        except FileNotFoundError:
            if not os.access(root, os.W_OK):  # a read-only filesystem answers EROFS
                raise BadRequest(
                    f"the image has no {path} and is read-only, so it cannot be made; "
                    "run the container on an overlay of it"
                ) from None
            continue
        except OSError as exc:
            raise BadRequest(f"{path} in the image cannot be resolved: {exc.strerror}") from None
        if not os.path.isdir(host):
            raise BadRequest(f"{path} in the image is not a directory")
