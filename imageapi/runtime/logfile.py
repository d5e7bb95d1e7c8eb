"""The per-container log file: `<logdir>/<id>-<unix time>.log`, one line per event.

Lines read `2021/02/11 00:08:34 container(7): container created` (the daemon's events) and
`2021/02/11 00:14:54 init: mounting /proc` (the helper's steps); the entrypoint's stdout and
stderr are appended to the same file.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def stamp() -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S")


class ContainerLog:
    """Never raises: a log that cannot be written (a full disk) must not stop a container's
    lifecycle. Lost lines are counted, said once in the daemon's log, and noted in this log
    as soon as it takes writes again."""

    def __init__(self, log_dir: Path, cid: int, path: Path | None = None) -> None:
        self.cid = cid
        self.path = path or log_dir / f"{cid}-{int(time.time())}.log"
        self._lock = threading.Lock()
        self._lost = 0
        self._lost_why = ""

    def event(self, message: str) -> None:
        line = f"{stamp()} container({self.cid}): {message}\n".encode()
        with self._lock:
            if self._lost:
                note = f"{stamp()} container({self.cid}): {self._lost} log line(s) were lost: "
                line = f"{note}{self._lost_why}\n".encode() + line
            try:
                self._append(line)
            except OSError as exc:
                if not self._lost:
                    self._lost_why = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    log.warning("container %d: cannot write its log %s (%s): its events are "
                                "dropped until it can", self.cid, self.path, exc.strerror)
                self._lost += 1
                return
            if self._lost:
                log.info("container %d: its log takes writes again", self.cid)
            self._lost = 0

    def _append(self, line: bytes) -> None:
        # O_APPEND: the container's own output is written to the same file concurrently.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            # A console left mid-line (a prompt, output without a newline): start a line of
            # our own, so that every event line stays one line that begins with its stamp.
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
