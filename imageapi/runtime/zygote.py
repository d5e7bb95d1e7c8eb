"""The pre-started helper that forks every container.

Started once by the daemon (`python -I -m imageapi.runtime.zygote FD`), it imports what a
container's setup needs up front and then only forks, so starting a container costs a fork
instead of a fresh interpreter. It is single-threaded on purpose: fork is only safe without
other threads.

It is a child subreaper, so each container's PID 1 becomes its child once the setup process
exits; it reaps them and reports their exit status. It also relays each container's
/dev/console (a pty) into the container's log file.

Protocol on the inherited SOCK_SEQPACKET socket, one JSON object per message:
  daemon -> helper  {"op": "start", "id": N, ...request}   (see imageapi.runtime.client)
  helper -> daemon  {"op": "started", "id": N, "pid": P} | {"op": "failed", "id": N, "error": T}
                    {"op": "exited", "id": N, "pid": P, "status": S}   (a waitpid status)
End of file on the socket (the daemon went away) stops the requests; the helper stays, reaping
and relaying consoles, until the last container it started has ended.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import sys
from dataclasses import dataclass

import prctl

from imageapi.kernel.ns import CLONE_NEWTIME
from imageapi.runtime import init

START_TIMEOUT = 60.0


@dataclass
class Console:
    """A pty: the container's /dev/console is the slave (`path`); we read the master."""

    master: int
    slave: int
    path: str

    @classmethod
    def open(cls) -> Console:
        master, slave = os.openpty()
        for fd in (master, slave):
            os.set_inheritable(fd, False)
        os.set_blocking(master, False)
        return cls(master, slave, os.ttyname(slave))

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@dataclass
class Spare:
    """A container init forked ahead of time, waiting for its request (see runtime.init),
    with its console made ahead of time too: a start only writes the request."""

    pid: int
    request_w: int
    report_r: int
    console: Console

    def discard(self) -> None:
        os.close(self.request_w)  # end of file: a waiting spare exits
        os.close(self.report_r)
        self.console.close()


@dataclass
class Running:
    cid: int
    log_fd: int
    master: int | None
    slave: int | None


class Helper:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.running: dict[int, Running] = {}  # host pid of a container's init -> its record
        self.consoles: dict[int, Running] = {}  # pty master fd -> record
        self.spare: Spare | None = None
        self.spares_work = True  # cleared when making one fails: the general path remains
        self.daemon_here = True

    def send(self, message: dict[str, object]) -> None:
        if self.daemon_here:
            try:
                self.sock.send(json.dumps(message).encode())
            except OSError:
                self.daemon_gone()

    def daemon_gone(self) -> None:
        """The daemon went away (stopped or restarting): serve no more requests, but keep
        reaping and relaying consoles for the containers still running, which must not notice
        their agent restarting; exit once the last one has ended."""
        self.daemon_here = False
        self.sock.close()
        if self.spare is not None:
            self.spare.discard()
            self.spare = None

    def start(self, request: dict[str, object]) -> None:
        cid = int(request["id"])  # type: ignore[call-overload]
        spare = self.spare
        if spare is not None and not int(request["flags"]) & CLONE_NEWTIME:  # type: ignore[call-overload]
            # A time namespace only applies to children: the spare, already PID 1, can't.
            self.spare = None
            console = spare.console
            request["console"] = console.path
            os.write(spare.request_w, json.dumps(request).encode())
            os.close(spare.request_w)
            # The spare is on its way; what is only ours to hold comes after.
            log_fd = os.open(str(request["log"]), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            _, error = self._read_report(spare.report_r)
            init_pid: int | None = spare.pid
        else:
            log_fd = os.open(str(request["log"]), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            console = Console.open()
            request["console"] = console.path
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:
                os.close(report_r)
                self.sock.close()
                init.setup_process(request, report_w, log_fd)
            os.close(report_w)
            init_pid, error = self._read_report(report_r)
        if init_pid is None or error is not None:
            os.close(log_fd)
            console.close()
            self.send({"op": "failed", "id": cid, "error": error or "the container did not start"})
            return
        # The slave stays open here: a pty whose slave side is closed reads as hung up.
        record = Running(cid, log_fd, console.master, console.slave)
        self.running[init_pid] = record
        self.consoles[console.master] = record
        self.send({"op": "started", "id": cid, "pid": init_pid})

    def make_spare(self) -> None:
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            # It may wait a long time: it must hold nothing of ours (above all not the daemon's
            # socket, or the daemon would never see us go).
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            low, high = sorted((request_r, report_w))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, init.max_fd())
            init.spare_setup_process(request_r, report_w)
        os.close(request_r)
        os.close(report_w)
        ready, _, _ = select.select([report_r], [], [], START_TIMEOUT)
        line = os.read(report_r, 4096).decode(errors="replace") if ready else ""
        if line.startswith("P"):
            self.spare = Spare(int(line[1:].split()[0]), request_w, report_r, Console.open())
            return
        print(f"imageapi-helper: no spare init: {line[1:].strip() or 'timed out'}",
              file=sys.stderr, flush=True)
        self.spares_work = False
        os.close(request_w)
        os.close(report_r)

    @staticmethod
    def _read_report(fd: int) -> tuple[int | None, str | None]:
        data = b""
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], START_TIMEOUT)
                if not ready:
                    return None, "the container's setup did not finish in time"
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        pid: int | None = None
        error: str | None = None
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("P"):
                pid = int(line[1:])
            elif line.startswith("E") and error is None:
                error = line[1:]
        return pid, error

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spare is not None and pid == self.spare.pid:
                self.spare.discard()
                self.spare = None  # it died waiting; another is made after the next start
            record = self.running.pop(pid, None)
            if record is None:
                continue  # a setup process, or an init whose start already failed
            self.close(record)
            self.send({"op": "exited", "id": record.cid, "pid": pid, "status": status})

    def relay(self, record: Running) -> None:
        """Copy what the container wrote to /dev/console into its log."""
        while record.master is not None:
            try:
                data = os.read(record.master, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: the terminal hung up
                data = b""
            if not data:
                self.consoles.pop(record.master, None)
                os.close(record.master)
                record.master = None
                return
            os.write(record.log_fd, data)

    def close(self, record: Running) -> None:
        self.relay(record)
        if record.master is not None:
            self.consoles.pop(record.master, None)
            os.close(record.master)
            record.master = None
        if record.slave is not None:
            os.close(record.slave)
            record.slave = None
        os.close(record.log_fd)

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.make_spare()
        while self.daemon_here or self.running:
            watched = [wake_r, *self.consoles, *([self.sock] if self.daemon_here else [])]
            ready, _, _ = select.select(watched, [], [])
            if wake_r in ready:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                self.reap()
            for fd in ready:
                record = self.consoles.get(fd) if isinstance(fd, int) else None
                if record is not None:
                    self.relay(record)
            if self.daemon_here and self.sock in ready:
                message = self.sock.recv(1 << 20)
                if not message:
                    self.daemon_gone()
                    continue
                request = json.loads(message)
                if request.get("op") == "start":
                    self.start(request)
            if self.daemon_here and self.spare is None and self.spares_work:
                self.make_spare()  # after answering: off the next start's critical path


def main(argv: list[str]) -> int:
    prctl.set_name("imageapi-helper")
    prctl.set_child_subreaper(True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we end
    fd = int(argv[1])
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    sock = socket.socket(fileno=fd)
    Helper(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
