"""Bad days: a log filesystem that is full, a spare init that never answers.

The server of this module writes its container logs to a 256 KiB tmpfs of its own, so a
container that writes to its console fills it for real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import hostview
from tests.conftest import Server, Stack
from tests.test_containers import wait_for, wait_state

LOG_FS_SIZE = 256 * 1024
# Ends at once on a stop request (a shell as PID 1 ignores an untrapped SIGTERM).
IDLE = "/bin/sh -c \"trap 'exit 0' TERM; while :; do sleep 0.1; done\""


@pytest.fixture(scope="module")
def log_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("logfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LOG_FS_SIZE},mode=0700", "tmpfs",
                    str(path)], check=True)
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def server_args(log_fs: Path) -> list[str]:
    return ["--log-dir", str(log_fs)]


@pytest.fixture
def clean_logs(log_fs: Path) -> Iterator[Path]:
    yield log_fs
    for entry in log_fs.iterdir():  # logs are kept after a delete; this fs is tiny
        entry.unlink()


@pytest.fixture
def image(stack: Stack) -> Iterator[int]:
    """One rbd mount of the image, for many overlays (an image is mapped once)."""
    mount = stack.api.post("/mount", {"kind": "rbd", "rbd": {
        "fs_type": "squashfs", "mount_options": ["ro"], "rbd": stack.rbd_spec()}})
    yield mount["mount_id"]
    stack.api.delete(f"/mount/rbd/{mount['mount_id']}")


def overlay_on(image: int) -> dict[str, Any]:
    return {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "mount_id": image}]}}


def helper_pid(server: Server) -> int:
    found = [p for p in hostview.descendants(server.proc.pid)
             if hostview.comm(p) == "imageapi-helper"]
    assert len(found) == 1, found
    return found[0]


def spare_pid(server: Server, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in hostview.descendants(server.proc.pid)
                 if hostview.comm(p) == "imageapi-spare"]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "the helper made no spare init"
        time.sleep(0.02)


def wait_text(read: Any, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got = read()
        if text in got:
            return got
        assert time.monotonic() < deadline, f"{text!r} never appeared"
        time.sleep(0.05)


def test_a_full_log_filesystem_stops_nothing(stack: Stack, clean_logs: Path, image: int) -> None:
    api, server = stack.api, stack.server
    helper = helper_pid(server)
    filler = clean_logs / "filler"
    filler.write_bytes(b"\0" * (64 * 1024))  # freed later, so that space can return
    quiet = api.post("/container", {"mount": overlay_on(image), "command": IDLE,
                                    "state": "running"})
    # tmpfs fills page by page: pad this log to a page boundary, so that the next line
    # needs a page the full filesystem does not have.
    with open(quiet["logfile"], "ab") as f:
        if f.tell() % 4096:
            f.write(b"#" * (-f.tell() % 4096 - 1) + b"\n")
    assert os.path.getsize(quiet["logfile"]) % 4096 == 0
    writer = api.post("/container", {"mount": overlay_on(image), "state": "running",
                                     "command": (
        "/bin/sh -c \"trap 'exit 0' TERM; i=0; while [ $i -lt 4000 ]; do "
        "echo line-$i-" + "x" * 90 + "; i=$((i+1)); done > /dev/console; "
        "while [ ! -e /go ]; do sleep 0.1; done; echo after-space-returned > /dev/console; "
        "while :; do sleep 0.1; done\""
    )})
    # 400 KB of console output into what is left of 256 KB: the helper hits ENOSPC.
    wait_text(server.log_text, f"container {writer['id']}: cannot write its log")
    assert os.statvfs(clean_logs).f_bavail == 0
    assert helper_pid(server) == helper, "the helper died of a full log"
    assert api.get(f"/container/{writer['id']}")["state"] == "running"

    # Its log full, a container still stops (its event line is lost, not its signal).
    api.get(f"/container/{quiet['id']}/exited")
    assert wait_state(stack, f"/container/{quiet['id']}", {"exited", "dead"}, 10)["state"] \
        == "exited"
    wait_text(server.log_text, f"container {quiet['id']}: cannot write its log")
    assert api.delete(f"/container/{quiet['id']}")["state"] == "exited"
    # New containers start on a full disk too.
    again = api.post("/container", {"mount": overlay_on(image), "command": "/bin/true",
                                    "state": "running"})
    assert wait_state(stack, f"/container/{again['id']}", {"exited", "dead"})["state"] \
        == "exited"
    api.delete(f"/container/{again['id']}")

    # Space returns: the log says how much it lost, then goes on.
    filler.unlink()
    Path(writer["mount"]["overlay"]["mountpoint"], "go").touch()
    log = wait_text(lambda: Path(writer["logfile"]).read_text(errors="replace"),
                    "after-space-returned")
    lost = log[:log.index("after-space-returned")]
    assert "bytes of console output were lost: ENOSPC" in lost
    assert "line-3999" not in log
    assert server.log_text().count(f"container {writer['id']}: cannot write its log") == 1
    assert api.delete(f"/container/{writer['id']}")["state"] == "exited"
    assert helper_pid(server) == helper


def test_a_stuck_spare_delays_no_start(stack: Stack, clean_logs: Path, image: int) -> None:
    server = stack.server
    stuck = spare_pid(server)
    os.kill(stuck, signal.SIGSTOP)
    try:
        _starts_beside(stack, image, stuck)
    finally:
        try:
            os.kill(stuck, signal.SIGKILL)  # whatever happened, never leave it stopped
        except ProcessLookupError:
            pass


def _starts_beside(stack: Stack, image: int, stuck: int) -> None:
    api, server = stack.api, stack.server
    results: dict[str, Any] = {}

    def start(key: str) -> None:
        began = time.monotonic()
        reply = api.request("POST", "/container", json={"mount": overlay_on(image),
                                                        "command": IDLE, "state": "running"})
        results[key] = (reply, time.monotonic() - began)

    first = threading.Thread(target=start, args=("first",))
    first.start()
    time.sleep(0.2)  # the first start is given to the stopped spare
    start("second")
    first.join()
    for key in ("first", "second"):
        reply, took = results[key]
        assert reply.status_code == 201, reply.text
        assert took < 10, f"{key} start took {took:.1f} s"
        assert reply.json()["state"] == "running"
    assert "did not answer within" in server.log_text()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{stuck}"):  # killed, and reaped by the helper
        assert time.monotonic() < deadline, "the stuck spare was not discarded"
        time.sleep(0.02)
    assert spare_pid(server) != stuck  # and replaced
    for key in ("first", "second"):
        cid = results[key][0].json()["id"]
        assert api.delete(f"/container/{cid}")["state"] == "exited"


def test_a_spare_that_died_is_replaced(stack: Stack, clean_logs: Path, image: int) -> None:
    api, server = stack.api, stack.server
    dead = spare_pid(server)
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{dead}"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    c = api.post("/container", {"mount": overlay_on(image), "command": IDLE,
                                "state": "running"})
    wait_for(Path(f"/proc/{c['pid']}"))
    assert api.delete(f"/container/{c['id']}")["state"] == "exited"
    assert spare_pid(server) != dead


def test_containers_that_end_at_once_are_all_seen(stack: Stack, clean_logs: Path,
                                                  image: int) -> None:
    # An init that execs and ends at once can be reaped before the helper has read that its
    # start succeeded: its end must still be reported, every time.
    api = stack.api
    ovl = api.post("/mount", overlay_on(image))["overlay"]
    mount = {"kind": "overlay", "mount_id": ovl["id"]}
    made = []

    def start() -> None:
        made.append(api.post("/container", {"mount": mount, "command": "/bin/true",
                                            "state": "running"}))

    threads = [threading.Thread(target=start) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 24
    for c in made:
        assert wait_state(stack, f"/container/{c['id']}", {"exited", "dead"}, 20)["state"] \
            == "exited"
    for c in made:
        api.delete(f"/container/{c['id']}")
    api.delete(f"/mount/overlay/{ovl['id']}")


def test_a_container_starts_with_the_usual_open_file_limit(stack: Stack, clean_logs: Path,
                                                           image: int) -> None:
    c = stack.api.post("/container", {"mount": overlay_on(image), "state": "running",
                                      "command": "/bin/sh -c 'ulimit -n; ulimit -Hn'"})
    wait_state(stack, f"/container/{c['id']}", {"exited"})
    # The daemon's own soft limit is its hard one (raised at start); the container's is not.
    numbers = [line for line in Path(c["logfile"]).read_text().splitlines() if line.isdigit()]
    hard = Path(f"/proc/{stack.server.proc.pid}/limits").read_text()
    assert numbers[0] == "1024", numbers
    assert numbers[1] in hard
    stack.api.delete(f"/container/{c['id']}")
