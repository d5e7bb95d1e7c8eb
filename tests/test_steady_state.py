"""Steady state: 200 container lifecycles (create running, stop, delete) leave the daemon and its
helper where they were — the same number of open descriptors, about the same memory.

One overlay (of a loopback-attached squashfs) serves every container in turn. The first
`WARM_UP` cycles let caches, thread pools and the allocator settle; the rest must not move the
descriptor counts (within `FD_SLACK`) nor grow the resident sets by `RSS_SLACK` or more.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests import hostview
from tests.conftest import Stack

CYCLES = 200
WARM_UP = 20
FD_SLACK = 2
RSS_SLACK = 8 * 2**20  # bytes
COMMAND = "/bin/sh -c 'trap \"exit 0\" TERM; sleep 1000 & wait'"
SIGTERM_BIT = 1 << (15 - 1)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def catches_sigterm(pid: int) -> bool:
    """The trap is set (SigCgt): a SIGTERM before it would wait for the stop timeout's SIGKILL,
    as PID 1 of a namespace ignores signals it has no handler for."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    return False


def helper_of(daemon: int) -> int:
    helpers = [p for p in hostview.descendants(daemon) if hostview.comm(p) == "imageapi-helper"]
    assert len(helpers) == 1, f"helpers: {helpers}"
    return helpers[0]


def measure(daemon: int, helper: int) -> dict[str, int]:
    return {"daemon fds": fds(daemon), "helper fds": fds(helper),
            "daemon rss": rss(daemon), "helper rss": rss(helper)}  # fmt: skip


def until(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.fixture
def overlay(stack: Stack, squashfs_image: Path, tmp_path: Path) -> Any:
    image = tmp_path / "image.sqsh"
    shutil.copyfile(squashfs_image, image)
    api = stack.api
    mnt = api.post("/mount/loopback", {"fs_type": "squashfs", "mount_options": ["ro"],
                                       "loopback": {"path": str(image)}})  # fmt: skip
    ovl = api.post("/mount/overlay", {"lower": [{"kind": "loopback", "mount_id": mnt["id"]}]})
    yield ovl
    api.delete(f"/mount/overlay/{ovl['id']}")
    api.delete(f"/mount/loopback/{mnt['id']}")


def cycle(stack: Stack, overlay: Any) -> None:
    api = stack.api
    c = api.post("/container", {"mount": {"kind": "overlay", "mount_id": overlay["id"]},
                                "command": COMMAND, "state": "running"})  # fmt: skip
    assert c["state"] == "running", c
    until(lambda: catches_sigterm(c["pid"]), f"container {c['id']} never set its trap")
    api.get(f"/container/{c['id']}/exited")

    def exited() -> bool:
        return api.get(f"/container/{c['id']}")["state"] in ("exited", "dead")

    until(exited, f"container {c['id']} did not stop")
    assert api.get(f"/container/{c['id']}")["state"] == "exited"
    api.delete(f"/container/{c['id']}")
    Path(c["logfile"]).unlink(missing_ok=True)  # the test's disk, not the daemon's memory


def test_lifecycles_leave_descriptors_and_memory_flat(stack: Stack, overlay: Any) -> None:
    daemon = stack.server.proc.pid
    helper = helper_of(daemon)
    started = time.monotonic()
    for _ in range(WARM_UP):
        cycle(stack, overlay)
    before = measure(daemon, helper)
    for _ in range(CYCLES - WARM_UP):
        cycle(stack, overlay)
    after = measure(daemon, helper)
    elapsed = time.monotonic() - started
    print(f"\n{CYCLES} cycles in {elapsed:.1f} s; after {WARM_UP}: {before}; at the end: {after}")
    assert helper_of(daemon) == helper, "the helper was replaced"
    for what in ("daemon fds", "helper fds"):
        moved = after[what] - before[what]
        assert abs(moved) <= FD_SLACK, f"{what}: {before[what]} -> {after[what]}"
    for what in ("daemon rss", "helper rss"):
        grew = after[what] - before[what]
        assert grew < RSS_SLACK, f"{what} grew by {grew / 2**20:.1f} MiB over {CYCLES - WARM_UP}"
    assert stack.api.get("/container") == []
