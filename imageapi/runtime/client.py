"""The daemon's end of the helper (`imageapi.runtime.zygote`): start containers, hear of exits.

One helper process serves the whole daemon. Requests are serialised on the socket; a reader
thread routes the helper's answers to the waiting caller and each exit to the container's
watcher, run in a thread of its own so a slow watcher (it syncs a filesystem) never delays
another container's news.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

ExitHandler = Callable[[int], None]  # receives the waitpid status


class StartFailed(Exception):
    """The helper could not start the container; the message says which step failed."""


class Helper:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "imageapi.runtime.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the daemon must not reach it
        )
        theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._on_exit: dict[int, ExitHandler] = {}
        self._reader = threading.Thread(target=self._read, name="helper-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None and self._reader.is_alive()

    def start(self, request: dict[str, Any], on_exit: ExitHandler, timeout: float = 90) -> int:
        """Start a container; returns its init's host pid. `on_exit(status)` comes later."""
        cid = int(request["id"])
        answer: Future[dict[str, Any]] = Future()
        with self._lock:
            self._pending[cid] = answer
            self._on_exit[cid] = on_exit
            self._sock.send(json.dumps({"op": "start", **request}).encode())
        try:
            reply = answer.result(timeout)
        except BaseException:
            with self._lock:
                self._pending.pop(cid, None)
                self._on_exit.pop(cid, None)
            raise
        if reply["op"] != "started":
            with self._lock:
                self._on_exit.pop(cid, None)
            raise StartFailed(reply.get("error") or "the container did not start")
        return int(reply["pid"])

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                self._fail_all("the container helper exited")
                return
            message = json.loads(data)
            cid = int(message["id"])
            with self._lock:
                if message["op"] == "exited":
                    handler = self._on_exit.pop(cid, None)
                    waiter = None
                else:
                    handler = None
                    waiter = self._pending.pop(cid, None)
            if waiter is not None:
                waiter.set_result(message)
            if handler is not None:
                threading.Thread(
                    target=handler, args=(int(message["status"]),), name=f"watch-{cid}",
                    daemon=True,
                ).start()

    def _fail_all(self, why: str) -> None:
        with self._lock:
            waiters = list(self._pending.values())
            self._pending.clear()
        for waiter in waiters:
            waiter.set_result({"op": "failed", "error": why})
        if self._on_exit:
            log.error("%s; %d container(s) lose their watcher", why, len(self._on_exit))

    def close(self) -> None:
        """Let the helper go. With no container running it exits at once; otherwise it stays,
        reaping them and relaying their consoles, until the last has ended — never killed, or
        the containers of a node whose agent restarts would lose their consoles."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self._proc.wait(1)
        except subprocess.TimeoutExpired:
            log.info("the container helper (pid %d) stays for the containers still running",
                     self._proc.pid)
            self._proc.returncode = 0  # not ours to reap any more; keeps Popen from warning
