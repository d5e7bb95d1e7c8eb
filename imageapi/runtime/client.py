"""The daemon's end of the helper (`imageapi.runtime.zygote`): start containers, hear of exits.

One helper process serves the whole daemon, and outlives it: it listens on
`<run_dir>/helper.sock`, and a daemon that starts connects to the helper already there (its
containers keep running across the restart) or starts a new one. The greeting (`hello`) says
which containers the helper runs and which ended while no daemon listened, with their real
exit status; each exit report is acknowledged once recorded, so none is lost in a crash.

Requests are serialised on the socket; a reader thread routes the helper's answers to the
waiting caller and each exit to the container's watcher, run in a thread of its own so a slow
watcher (it syncs a filesystem) never delays another container's news. If the helper dies,
every watcher is told `HELPER_GONE`: the container then watches its own pidfd, and its exit
status can no longer be known.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
SOCKET_NAME = "helper.sock"
HELPER_GONE = None  # what an exit handler receives when nobody can tell the status any more
ExitHandler = Callable[[int | None], None]  # receives the waitpid status, or HELPER_GONE


class StartFailed(Exception):
    """The helper could not start the container; the message says which step failed."""


class HelperUnavailable(OSError):
    """No helper could be reached or started."""


@dataclass
class Greeting:
    """What the helper said when we connected."""

    pid: int
    running: dict[int, int] = field(default_factory=dict)  # container id -> init's host pid
    start_times: dict[int, int | None] = field(default_factory=dict)  # container id -> ticks
    starting: list[int] = field(default_factory=list)
    ended: dict[int, dict[str, int]] = field(default_factory=dict)  # id -> {"pid", "status"}
    new: bool = True  # started by us now, not found running


class Helper:
    def __init__(self, run_dir: Path, hello_timeout: float = 10.0,
                 on_gone: Callable[[], None] | None = None) -> None:
        self.path = run_dir / SOCKET_NAME
        self._on_gone = on_gone  # told (in a thread of its own) when the helper dies
        self._proc: subprocess.Popen[bytes] | None = None
        sock = self._connect_existing()
        if sock is not None:
            self._sock = sock
            try:
                self.greeting = self._hello(hello_timeout)
            except OSError as exc:  # HelperUnavailable, or a broken pipe
                if "another imageapi daemon" in str(exc):
                    raise
                self._sock.close()
                # It was on its way out (nothing left to run or tell) as we connected.
                log.info("the container helper found did not greet us (%s); starting one", exc)
                sock = None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        if sock is None:
            self._sock = self._start_new()
            self.greeting = self._hello(hello_timeout)
        self.greeting.new = self._proc is not None
        self._lock = threading.Lock()
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._on_exit: dict[int, ExitHandler] = {}
        # Exits reported before anyone watched them: id -> (status, pid).
        self._early: dict[int, tuple[int, int]] = {}
        self._unwanted: set[int] = set()  # killed for recovery: their ends need no watcher
        self._gone = False
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="helper-reader", daemon=True)
        self._reader.start()

    # -- finding or starting the helper -------------------------------------------------------

    def _connect_existing(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a stale socket of a helper that is gone
            return None
        except OSError:
            sock.close()
            raise
        return sock

    def _start_new(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old_umask = os.umask(0o177)  # 0600 from its creation on
            try:
                listener.bind(os.fspath(self.path))
            finally:
                os.umask(old_umask)
            listener.listen(8)
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "imageapi.runtime.zygote", str(listener.fileno())],
                pass_fds=[listener.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C meant for the daemon must not reach it
            )
        finally:
            listener.close()  # the helper has its own copy
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.connect(os.fspath(self.path))
        return sock

    def _hello(self, timeout: float) -> Greeting:
        self._sock.send(json.dumps({"op": "hello", "version": PROTOCOL_VERSION}).encode())
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        data = self._sock.recv(1 << 20) if poller.poll(int(timeout * 1000)) else b""
        reply = json.loads(data) if data else {}
        if reply.get("op") == "busy":
            self._sock.close()
            raise HelperUnavailable(0, "another imageapi daemon is connected to the helper "
                                    "of this run directory", str(self.path))
        if reply.get("op") != "hello" or "error" in reply:
            self._sock.close()
            why = reply.get("error") or "no answer"
            raise HelperUnavailable(0, f"the container helper did not greet us: {why}",
                                    str(self.path))
        return Greeting(
            pid=int(reply["pid"]),
            running={int(r["id"]): int(r["pid"]) for r in reply.get("running", [])},
            start_times={int(r["id"]): r.get("start_time") for r in reply.get("running", [])},
            starting=[int(c) for c in reply.get("starting", [])],
            ended={int(e["id"]): {"pid": int(e["pid"]), "status": int(e["status"])}
                   for e in reply.get("ended", [])},
        )

    @property
    def pid(self) -> int:
        return self.greeting.pid

    def alive(self) -> bool:
        return not self._gone and self._reader.is_alive()

    # -- requests -----------------------------------------------------------------------------

    def start(self, request: dict[str, Any], on_exit: ExitHandler,
              timeout: float = 90) -> tuple[int, int | None]:
        """Start a container; returns its init's host pid and that pid's start time (read by
        the helper while the init was its child). `on_exit(status)` comes later."""
        cid = int(request["id"])
        answer: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._gone:
                raise StartFailed("the container helper exited")
            self._pending[cid] = answer
            self._on_exit[cid] = on_exit
            self._send({"op": "start", **request})
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
        return int(reply["pid"]), reply.get("start_time")

    def watch(self, cid: int, on_exit: ExitHandler) -> None:
        """Hear of the end of a container this helper already runs (one adopted at recovery)."""
        with self._lock:
            early = self._early.pop(cid, None)
            if early is None and not self._gone:
                self._on_exit[cid] = on_exit
                return
        if early is None:
            self._dispatch(cid, on_exit, HELPER_GONE)
        else:
            self._dispatch(cid, on_exit, early[0], early[1])

    def ack(self, cid: int, pid: int | None = None) -> None:
        """The end of container `cid` (its init `pid`) is recorded: the helper may forget it."""
        with self._lock:
            self._send({"op": "ack", "id": cid, "pid": pid})

    def kill(self, cid: int) -> None:
        """SIGKILL a container the helper runs that no record knows (recovery's roll back);
        its end, which nobody records, is acknowledged as soon as it is reported."""
        with self._lock:
            self._unwanted.add(cid)
            self._early.pop(cid, None)
            self._send({"op": "kill", "id": cid})
            if cid in self.greeting.ended:
                self._send({"op": "ack", "id": cid})

    def _send(self, message: dict[str, Any]) -> None:
        """Lock held."""
        try:
            self._sock.send(json.dumps(message).encode())
        except OSError as exc:
            if message["op"] == "start":
                raise StartFailed(f"the container helper cannot be reached: {exc}") from exc
            log.warning("container helper: %s not sent: %s", message["op"], exc)

    # -- answers ------------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                if not self._closing:
                    self._fail_all("the container helper exited")
                    if self._proc is not None:  # ours: reap it, or it stays a zombie
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self._proc.wait(5)
                    if self._on_gone is not None:
                        threading.Thread(target=self._on_gone, name="helper-restart",
                                         daemon=True).start()
                return
            message = json.loads(data)
            cid = int(message.get("id", 0))
            with self._lock:
                if message["op"] == "exited":
                    handler = self._on_exit.pop(cid, None)
                    if handler is None and cid in self._unwanted:
                        self._unwanted.discard(cid)
                        self._send({"op": "ack", "id": cid})
                    elif handler is None:
                        self._early[cid] = (int(message["status"]), int(message["pid"]))
                    waiter = None
                else:
                    handler = None
                    waiter = self._pending.pop(cid, None)
            if waiter is not None:
                waiter.set_result(message)
            elif message["op"] == "started" and cid not in self._unwanted:
                log.warning("container helper started container %d for nobody: killing it", cid)
                self.kill(cid)
            if handler is not None:
                self._dispatch(cid, handler, int(message["status"]), int(message["pid"]))

    def _dispatch(self, cid: int, handler: ExitHandler, status: int | None,
                  pid: int | None = None) -> None:
        def run() -> None:
            handler(status)
            if status is not None:
                self.ack(cid, pid)  # recorded by the handler: the helper may forget it

        threading.Thread(target=run, name=f"watch-{cid}", daemon=True).start()

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._gone = True
            waiters = list(self._pending.values())
            self._pending.clear()
            handlers = dict(self._on_exit)
            self._on_exit.clear()
        for waiter in waiters:
            waiter.set_result({"op": "failed", "error": why})
        if handlers:
            log.error("%s; %d container(s) are watched through their pidfd from now on, and "
                      "their exit status cannot be known", why, len(handlers))
        for cid, handler in handlers.items():
            self._dispatch(cid, handler, HELPER_GONE)

    def close(self) -> None:
        """Let the helper go. With no container running it exits at once; otherwise it stays,
        reaping them, relaying their consoles and keeping their exit reports for the next
        daemon — never killed, or the containers of a node whose agent restarts would lose
        their consoles."""
        with self._lock:
            self._gone = self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._proc is None:
            return
        try:
            self._proc.wait(1)
        except subprocess.TimeoutExpired:
            log.info("the container helper (pid %d) stays for the containers still running",
                     self._proc.pid)
            self._proc.returncode = 0  # not ours to reap any more; keeps Popen from warning
