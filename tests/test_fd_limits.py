"""File descriptors: the daemon raises its soft limit, bounds its connections at accept(), drops
connections that send nothing, and its log stays small when descriptors run out anyway.

Each server runs under `prlimit` with a small limit. Before these fixes, 80 idle TCP
connections at RLIMIT_NOFILE 64 left the daemon unable to answer and writing identical
`accept()` tracebacks at megabytes a second.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imageapi.cli import RepeatFilter
from tests import hostview
from tests.conftest import Server, need_privileges, start_server

IDLE = 80
LOG_BUDGET = 200_000  # bytes over the whole test
HEAD_TIMEOUT = 10.0  # imageapi.cli.REQUEST_HEAD_TIMEOUT


def nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) of "Max open files" in /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Server]:
    """A server whose open-file limit is 64, soft and hard."""
    need_privileges()
    server = start_server(tmp_path / "run", wrapper=["prlimit", "--nofile=64:64", "--"])
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, server.log_text()[-5000:]


def idle_connections(server: Server, count: int) -> list[socket.socket]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conns = []
    for _ in range(count):
        conn = socket.create_connection((host, int(port)), timeout=5)
        conns.append(conn)
    return conns


def answers(server: Server, timeout: float = 3.0) -> int | str:
    try:
        return httpx.get(f"{server.url}/imageapi/v1/attach/loopback", timeout=timeout).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def closed_by_server(conn: socket.socket) -> bool:
    """The server has closed `conn` (what it sent before, a 503, is read and dropped)."""
    conn.settimeout(0.5)
    try:
        while True:
            if not conn.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    need_privileges()
    server = start_server(tmp_path / "run", wrapper=["prlimit", "--nofile=64:4096", "--"])
    try:
        assert nofile(server.proc.pid) == (4096, 4096)
        assert "open-file limit raised from 64 to 4096" in server.log_text()
        helpers = [p for p in hostview.descendants(server.proc.pid)
                   if hostview.comm(p) == "imageapi-helper"]  # fmt: skip
        assert helpers and all(nofile(p)[0] == 4096 for p in helpers), "the helper inherits it"
    finally:
        assert server.stop() == 0


def test_idle_connections_do_not_lock_the_daemon_out(limited: Server) -> None:
    pid = limited.proc.pid
    conns = idle_connections(limited, IDLE)
    try:
        started = time.monotonic()
        while time.monotonic() - started < HEAD_TIMEOUT + 5:
            began = time.monotonic()
            status = answers(limited)
            assert status == 200, f"no answer {time.monotonic() - started:.1f} s in: {status}"
            assert time.monotonic() - began < 2, "answered, but slowly"
            assert fd_count(pid) <= 64
            time.sleep(0.5)
        # None of them sent a request: the daemon has closed every one by now.
        still_open = [c for c in conns if not closed_by_server(c)]
        assert not still_open, f"{len(still_open)} silent connections still open"
        assert fd_count(pid) < 20, "their descriptors are free again"
    finally:
        for conn in conns:
            conn.close()
    size = limited.log.stat().st_size
    assert size < LOG_BUDGET, f"log is {size} bytes:\n{limited.log_text()[-3000:]}"
    assert "Traceback" not in limited.log_text()


def test_running_out_of_descriptors_does_not_flood_the_log(
    limited: Server, tmp_path: Path
) -> None:
    """The daemon's own objects hold descriptors too (a loop device per attachment): with
    those and 80 connections, accept() finds none free. The daemon frees one by closing an idle
    connection or refuses the waiting one; it logs that a few times, not once per try."""
    image = tmp_path / "image.img"
    image.write_bytes(b"\0" * 2**20)
    ids = []
    try:
        with httpx.Client(base_url=f"{limited.url}/imageapi/v1", timeout=10) as api:
            for _ in range(30):  # read-only: one file may be attached any number of times
                answer = api.post("/attach/loopback", json={"path": str(image)})
                assert answer.status_code == 201, answer.text
                ids.append(answer.json()["id"])
        conns = idle_connections(limited, IDLE)
        try:
            answered = []
            started = time.monotonic()
            while time.monotonic() - started < 15:
                answered.append(answers(limited))
                assert fd_count(limited.proc.pid) <= 64
                time.sleep(0.5)
            assert set(answered[2:]) == {200}, f"answers: {answered}"
        finally:
            for conn in conns:
                conn.close()
    finally:
        with httpx.Client(base_url=f"{limited.url}/imageapi/v1", timeout=10) as api:
            for lid in ids:
                assert api.delete(f"/attach/loopback/{lid}").status_code == 200
    assert not [dev for dev, backing in hostview.loop_devices().items()
                if backing == str(image)], "loop devices left behind"  # fmt: skip
    text = limited.log_text()
    assert len(text) < LOG_BUDGET, f"log is {len(text)} bytes:\n{text[-3000:]}"
    assert "Too many open files" not in text  # asyncio's accept() traceback, never reached
    said = re.findall(r"out of file descriptors \(limit 64\)[^\n]*", text)
    assert said, "the test never ran the daemon out of descriptors"
    for line in set(said):
        assert said.count(line) <= 10, f"not rate-limited: {said.count(line)} times {line!r}"


# -- the log's rate limit on its own -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")


def test_repeated_records_are_counted_not_written() -> None:
    handler, clock = Collect(), Clock()
    handler.addFilter(RepeatFilter(handler, burst=3, template_burst=20, window=60, clock=clock))
    logger = logging.getLogger("test.repeats")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        for _ in range(1000):  # one fault in a tight loop
            logger.error("socket.accept() out of system resource")
        for i in range(10):  # ordinary records: one template, other values
            logger.info("attached %s", f"/images/{i}")
        assert handler.lines == 3 * ["test.repeats ERROR socket.accept() out of system resource"] \
            + [f"test.repeats INFO attached /images/{i}" for i in range(10)]
        for i in range(30):  # a flood with changing values: the template's ceiling
            logger.warning("fd %d gone", i)
        assert len(handler.lines) == 13 + 20
        clock.now += 61  # the window has passed: the next record brings the counts
        logger.error("socket.accept() out of system resource")
        assert "test.repeats ERROR suppressed 997 repeats of " \
            "'socket.accept() out of system resource' in 60 s" in handler.lines
        assert "test.repeats WARNING suppressed 10 records like 'fd %d gone' in 60 s" \
            in handler.lines
        assert handler.lines[-1] == "test.repeats ERROR socket.accept() out of system resource"
    finally:
        logger.removeHandler(handler)


def test_the_rate_limit_remembers_a_bounded_number_of_kinds() -> None:
    handler, clock = Collect(), Clock()
    repeats = RepeatFilter(handler, burst=2, window=60, max_kinds=100, clock=clock)
    handler.addFilter(repeats)
    logger = logging.getLogger("test.kinds")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        for _ in range(5):
            logger.error("the same fault")
        for i in range(10_000):  # a busy daemon: every record another
            logger.info("request %d", i)
        assert len(repeats._kinds) <= 100
        assert len(handler.lines) == 2 + 1000, "the template's ceiling survives the pruning"
        clock.now += 61
        logger.info("later")
        assert "test.kinds ERROR suppressed 3 repeats of 'the same fault' in 60 s" \
            in handler.lines, "so does a flood's count"
        assert "test.kinds INFO suppressed 9000 records like 'request %d' in 60 s" \
            in handler.lines
    finally:
        logger.removeHandler(handler)
