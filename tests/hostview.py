"""What the host holds right now: mounts, loop devices, processes, files under a directory.

Tests take a snapshot before and after and demand they match, so a leak fails the test that
made it instead of surfacing later as somebody else's flake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def mounts() -> set[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount in our mount namespace."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, source = right.split()[:2]
            out.add((left.split()[4].replace("\\040", " "), fstype, source))
    return out


def loop_devices() -> dict[str, str]:
    """Bound loop devices -> backing file."""
    out = {}
    for dev in Path("/sys/block").glob("loop*"):
        backing = dev / "loop" / "backing_file"
        if backing.exists():
            out[dev.name] = backing.read_text().strip()
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cgroup2_mount() -> Path | None:
    for mountpoint, fstype, _source in sorted(mounts()):
        if fstype == "cgroup2":
            return Path(mountpoint)
    return None


def cgroup_tree(mount: Path) -> set[str]:
    """Every cgroup (directory) in the hierarchy, except the top-level `imageapi-*` roots that
    test runs and benchmarks make for themselves (each checks its own)."""
    return {
        rel for p in mount.rglob("*")
        if p.is_dir() and not (rel := str(p.relative_to(mount))).startswith("imageapi-")
    }


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def running(name: str) -> set[int]:
    """Live processes called `name` (comm), zombies left out: an orphan's end is reaped by
    PID 1 whenever it gets to it."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        if comm == name and rest.split()[0] != "Z":
            found.add(int(entry))
    return found


def tree(root: Path) -> set[str]:
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@dataclass(frozen=True)
class Snapshot:
    mounts: frozenset[tuple[str, str, str]]
    loops: frozenset[tuple[str, str]]

    @classmethod
    def take(cls, scope: Path | None = None) -> Snapshot:
        """Everything, or only what lies under `scope` (mountpoint, source or backing file),
        so tests running beside other work on the host judge only their own leaks."""
        prefix = str(scope) if scope else ""
        return cls(
            frozenset(m for m in mounts() if m[0].startswith(prefix) or m[2].startswith(prefix)),
            frozenset(kv for kv in loop_devices().items() if kv[1].startswith(prefix)),
        )

    def diff(self, later: Snapshot) -> list[str]:
        problems = []
        for m in sorted(later.mounts - self.mounts):
            problems.append(f"mount left behind: {m[0]} ({m[1]} from {m[2]})")
        for m in sorted(self.mounts - later.mounts):
            problems.append(f"mount vanished: {m[0]} ({m[1]})")
        for dev, backing in sorted(later.loops - self.loops):
            problems.append(f"loop device left behind: /dev/{dev} -> {backing}")
        return problems
