"""One cgroup2 directory per running container, under a root the daemon owns.

The helper moves the container's first process into it before unsharing the cgroup
namespace, so the container (and a systemd in it) sees that directory as `/sys/fs/cgroup` and
everything it creates stays below it. Removed when the container ends.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def default_root() -> Path | None:
    """`<cgroup2 mount>/<our own cgroup>/imageapi` — inside what we were given (Delegate=yes)."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    own = "/"
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                own = line[3:].strip()
    return mount / own.lstrip("/") / "imageapi"


def _populated(path: Path) -> bool:
    try:
        return "populated 1" in (path / "cgroup.events").read_text()
    except OSError:
        return False


class CgroupTree:
    def __init__(self, root: Path) -> None:
        self.root = root

    def create(self, cid: int) -> Path:
        """`container-<id>`, or `container-<id>.<n>` when a container of an earlier daemon run
        (ids start again at 1) still lives in that name: it must never be disturbed."""
        self.root.mkdir(mode=0o755, exist_ok=True)
        name = f"container-{cid}"
        for n in range(1, 1000):
            path = self.root / name
            if not path.exists():
                break
            if not _populated(path):
                self.remove(path)  # an empty leftover of an earlier run
                break
            name = f"container-{cid}.{n}"
        path.mkdir(mode=0o755)
        return path

    def remove(self, path: Path, timeout: float = 5.0) -> None:
        """rmdir bottom-up (a systemd inside makes a tree); kill stragglers if it is busy."""
        deadline = time.monotonic() + timeout
        killed = False
        while path.exists():
            try:
                # Deepest first: a cgroup can only go once its children have.
                for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
                    os.rmdir(dirpath)
            except FileNotFoundError:
                pass  # a child went meanwhile: walk again
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.error("cannot remove cgroup %s: %s", path, exc)
                    raise
                if not killed and (path / "cgroup.kill").exists():
                    (path / "cgroup.kill").write_text("1")
                    killed = True
                time.sleep(0.01)

    def close(self) -> None:
        try:
            self.root.rmdir()
        except OSError:
            pass  # not empty (containers still running) or never made
