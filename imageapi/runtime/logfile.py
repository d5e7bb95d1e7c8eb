"""The per-container log file: `<logdir>/<id>-<unix time>.log`, one line per event.

Lines read `2021/02/11 00:08:34 container(7): container created` (the daemon's events) and
`2021/02/11 00:14:54 init: mounting /proc` (the helper's steps); the entrypoint's stdout and
stderr are appended to the same file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def stamp() -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S")


class ContainerLog:
    def __init__(self, log_dir: Path, cid: int) -> None:
        self.cid = cid
        self.path = log_dir / f"{cid}-{int(time.time())}.log"

    def event(self, message: str) -> None:
        line = f"{stamp()} container({self.cid}): {message}\n".encode()
        # O_APPEND: the container's own output is written to the same file concurrently.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            # A console left mid-line (a prompt, output without a newline): start a line of
            # our own, so that every event line stays one line that begins with its stamp.
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)
