"""Living in the cgroup systemd delegated to us (`Delegate=yes`).

With delegation the unit's cgroup subtree is ours, but cgroup2 allows processes only in leaves
once child cgroups have controllers enabled ("no internal processes"). So the daemon moves
itself into `<unit cgroup>/daemon` before it starts anything, and the containers' cgroups go
beside it, in `<unit cgroup>/imageapi`:

    system.slice/imageapi.service/     delegated: no processes here
      daemon/                          the daemon, its helper, containers without a cgroup
      imageapi/container-N/            a systemd container's own subtree

That leaves the runtime free to enable controllers for the containers (`cgroup.subtree_control`
of the unit's cgroup and below), which the kernel refuses while a process sits in the unit's
cgroup itself.

The move happens only when all of these hold, so a daemon started by hand, by a test, or by
a program that itself runs in some delegated unit stays where it was put:
- `$INVOCATION_ID` is set and `$SYSTEMD_EXEC_PID` is our pid (systemd executed this very
  process, not an ancestor of it);
- our cgroup2 cgroup carries systemd's `trusted.delegate` xattr ("1") and its
  `trusted.invocation_id` is ours.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from imageapi.runtime import cgroups

log = logging.getLogger(__name__)

LEAF = "daemon"
CONTAINERS = "imageapi"


def own_cgroup(mount: Path) -> Path:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/")
    return mount


def _xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode(errors="replace").strip().strip("\0")
    except OSError:
        return None


def delegated_cgroup() -> Path | None:
    """The cgroup systemd delegated to this invocation of the daemon, or None."""
    invocation = os.environ.get("INVOCATION_ID", "").replace("-", "").lower()
    if not invocation or os.environ.get("SYSTEMD_EXEC_PID") != str(os.getpid()):
        return None
    mount = cgroups.cgroup2_mount()
    if mount is None:
        return None
    path = own_cgroup(mount)
    if path == mount or _xattr(path, "trusted.delegate") != "1":
        return None
    recorded = (_xattr(path, "trusted.invocation_id") or "").replace("-", "").lower()
    return path if recorded == invocation else None


def enter_leaf(delegated: Path) -> Path:
    """Move this process (every thread of it) into `<delegated>/daemon`; returns the leaf."""
    leaf = delegated / LEAF
    leaf.mkdir(mode=0o755, exist_ok=True)
    (leaf / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return leaf


def settle() -> Path | None:
    """Under systemd with delegation: enter the leaf and return where the containers' cgroups
    belong (`<delegated>/imageapi`); otherwise change nothing and return None."""
    delegated = delegated_cgroup()
    if delegated is None:
        return None
    try:
        leaf = enter_leaf(delegated)
    except OSError as exc:
        log.warning("cannot move into a leaf of the delegated cgroup %s: %s", delegated, exc)
        return None
    root = delegated / CONTAINERS
    log.info("cgroup %s is delegated to us: running in %s, containers' cgroups in %s",
             delegated, leaf, root)
    return root
