"""What every benchmark here shares (each runs as `python bench/NAME.py`, with this folder on
its path)."""

from __future__ import annotations

import socket
import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
