"""The pre-started helper that forks every container.

Started once by the daemon (`python -I -m imageapi.runtime.zygote FD`), it imports what a
container's setup needs up front and then only forks, so starting a container costs a fork
instead of a fresh interpreter. It is single-threaded on purpose: fork is only safe without
other threads.

It is a child subreaper, so each container's PID 1 becomes its child once the setup process
exits; it reaps them and reports their exit status. It also relays each container's
/dev/console (a pty) into the container's log file.

It never waits on one container: every start is a pipe in its one `select` loop with a
deadline, so a start that hangs (a stopped spare, a mount that blocks) delays no other. A spare
must acknowledge its request within `SPARE_ANSWER_TIMEOUT`; one that does not is killed and the
request goes the general way. A log that cannot be written (a full disk) loses output, counted
and reported once, but never stops the helper.

Protocol (version 2): the helper listens on a SOCK_SEQPACKET unix socket,
`<run_dir>/helper.sock` (0600), handed to it by the daemon that started it; one daemon at a
time is connected, and a daemon that restarts connects to the same helper again. One JSON
object per message:
  daemon -> helper  {"op": "hello", "version": 2}                     (first, always)
                    {"op": "start", "id": N, ...request}   (see imageapi.runtime.client)
                    {"op": "ack", "id": N, "pid": P}  (that exit report is recorded: forget it)
                    {"op": "kill", "id": N}     (SIGKILL a container nobody records)
  helper -> daemon  {"op": "hello", "version": 2, "pid": P,
                     "running": [{"id", "pid", "start_time"}],
                     "starting": [N, ...], "ended": [{"id", "pid", "status"}]}
                    {"op": "busy"}              (another daemon is connected)
                    {"op": "started", "id": N, "pid": P, "start_time": T}
                    | {"op": "failed", "id": N, "error": T}
                    {"op": "exited", "id": N, "pid": P, "status": S}   (a waitpid status)
Every exit report is kept until the daemon acknowledges it, so a container that ends while
no daemon is connected (stopped, restarting, crashed) has its real status told to the next.
When the daemon goes away the helper serves no requests but stays, reaping and relaying
consoles, until nothing runs and nothing is left to tell; then it exits.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import prctl

from imageapi.kernel.ns import CLONE_NEWTIME
from imageapi.runtime import init
from imageapi.runtime.logfile import stamp

START_TIMEOUT = 60.0
# A waiting spare reads its request at once; one that has not answered by then is stuck
# (stopped, or starved) and is replaced, the request going the general way.
SPARE_ANSWER_TIMEOUT = 2.0
# A request larger than this is not given to a spare: the pipe to it may hold only one page
# (pipe-user-pages-soft), and a write must never block the loop.
SPARE_REQUEST_MAX = 4096
# Spares killed and not yet reaped: waited for before the helper exits, so that none is left
# a zombie under an init that may not reap (a container's, a minimal VM's).
DISCARDED: set[int] = set()


def say(text: str) -> None:
    """A line for the daemon's log (our stderr is its); a full disk must not kill us."""
    try:
        print(f"imageapi-helper: {text}", file=sys.stderr, flush=True)
    except OSError:
        pass


def open_log(path: str) -> int:
    """The container's log, opened for appending; /dev/null when it cannot be (a full disk may
    refuse even to create it): the container runs anyway."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        say(f"cannot open {path} ({exc.strerror}): the console output is dropped")
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


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

    def discard(self, kill: bool = True) -> None:
        """Let it go: end of file makes a waiting spare exit, and SIGKILL one that cannot read
        (stopped); `kill=False` once it has been reaped, when its pid may be another's."""
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
                DISCARDED.add(self.pid)
            except ProcessLookupError:
                pass
        if self.request_w >= 0:
            os.close(self.request_w)
        os.close(self.report_r)
        self.console.close()


@dataclass
class Making:
    """A spare being made: its setup process reports the spare's pid on `report_r`."""

    setup_pid: int
    request_w: int
    report_r: int
    deadline: float
    data: bytes = b""


@dataclass
class Starting:
    """A start in progress, waiting on the report pipe of its spare or setup process."""

    cid: int
    request: dict[str, object]
    report_r: int
    console: Console
    log_fd: int
    deadline: float
    kill_pid: int  # what to kill if it never finishes: the spare, or the setup process
    spare: bool  # given to a spare that has not acknowledged it yet
    init_pid: int | None = None
    data: bytes = b""
    began: float = field(default_factory=time.monotonic)


@dataclass
class Running:
    cid: int
    log_fd: int
    master: int | None
    slave: int | None
    lost: int = 0  # bytes of console output the log could not take (a full disk)
    lost_why: str = ""
    start_time: int | None = None  # of the init (/proc/PID/stat): with the pid, names it


PROTOCOL_VERSION = 2
FIRST_CONNECT_TIMEOUT = 30.0


class Helper:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sock: socket.socket | None = None  # the daemon's connection, once it said hello
        self.ended: dict[int, dict[str, int]] = {}  # exit reports not yet acknowledged
        self.doomed: set[int] = set()  # starts to kill on arrival (nobody records them)
        self.unclaimed: dict[int, tuple[int, float]] = {}  # reaped pid -> (status, when)
        self.running: dict[int, Running] = {}  # host pid of a container's init -> its record
        self.consoles: dict[int, Running] = {}  # pty master fd -> record
        self.starting: dict[int, Starting] = {}  # report pipe fd -> start in progress
        self.spare: Spare | None = None
        self.making: Making | None = None
        self.spares_work = True  # cleared when making one fails: the general path remains

    @property
    def daemon_here(self) -> bool:
        return self.sock is not None

    def send(self, message: dict[str, object]) -> None:
        if self.sock is not None:
            try:
                self.sock.send(json.dumps(message).encode())
            except OSError:
                self.daemon_gone()

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.set_inheritable(False)
        if self.sock is not None:
            # One daemon at a time: a second one on the same run directory is refused.
            try:
                conn.send(json.dumps({"op": "busy"}).encode())
            except OSError:
                pass
            conn.close()
            return
        self.sock = conn
        if self.spares_work and self.spare is None and self.making is None:
            self.make_spare()

    def hello(self, message: dict[str, object]) -> None:
        if message.get("version") != PROTOCOL_VERSION:
            self.send({"op": "hello", "version": PROTOCOL_VERSION,
                       "error": f"protocol {message.get('version')!r} is not spoken here"})
            self.daemon_gone()
            return
        self.send({
            "op": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid(),
            "running": [{"id": r.cid, "pid": pid, "start_time": r.start_time}
                        for pid, r in sorted(self.running.items())],
            "starting": sorted(s.cid for s in self.starting.values()),
            "ended": sorted(self.ended.values(), key=lambda e: e["id"]),
        })

    def kill(self, cid: int) -> None:
        for pid, record in self.running.items():
            if record.cid == cid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
        if any(s.cid == cid for s in self.starting.values()):
            self.doomed.add(cid)

    def daemon_gone(self) -> None:
        """The daemon went away (stopped or restarting): serve no more requests, but keep
        reaping and relaying consoles for the containers still running, which must not notice
        their agent restarting, and keep their exit reports for the next daemon; exit once
        nothing runs and nothing is left to tell."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.spare is not None:
            self.spare.discard()
            self.spare = None
        if self.making is not None:
            os.close(self.making.request_w)  # the spare, once made, sees end of file and exits
            os.close(self.making.report_r)
            self.making = None

    # -- starting -----------------------------------------------------------------------------

    def start(self, request: dict[str, object]) -> None:
        cid = int(request["id"])  # type: ignore[call-overload]
        spare = self.spare
        time_ns = int(request["flags"]) & CLONE_NEWTIME  # type: ignore[call-overload]
        # A time namespace only applies to children: the spare, already PID 1, can't.
        payload = b""
        if spare is not None and not time_ns:
            payload = json.dumps({**request, "console": spare.console.path}).encode()
        if spare is not None and payload and len(payload) <= SPARE_REQUEST_MAX:
            self.spare = None
            if self._give(spare, payload):
                # The spare is on its way; what is only ours to hold comes after.
                log_fd = open_log(str(request["log"]))
                self._track(Starting(cid, request, spare.report_r, spare.console, log_fd,
                                     time.monotonic() + SPARE_ANSWER_TIMEOUT, spare.pid,
                                     spare=True, init_pid=spare.pid))
                return
            self._kill_spare(spare, "could not take the request")
        self._fork(cid, request)

    @staticmethod
    def _give(spare: Spare, payload: bytes) -> bool:
        try:
            os.set_blocking(spare.request_w, False)
            written = os.write(spare.request_w, payload)
        except OSError:
            return False
        os.close(spare.request_w)
        spare.request_w = -1
        return written == len(payload)

    def _fork(self, cid: int, request: dict[str, object]) -> None:
        """The general way: a setup process that unshares and forks the init."""
        log_fd = open_log(str(request["log"]))
        console = Console.open()
        request["console"] = console.path
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            self.listener.close()
            if self.sock is not None:
                self.sock.close()
            init.setup_process(request, report_w, log_fd)
        os.close(report_w)
        self._track(Starting(cid, request, report_r, console, log_fd,
                             time.monotonic() + START_TIMEOUT, pid, spare=False))

    def _track(self, starting: Starting) -> None:
        os.set_blocking(starting.report_r, False)
        self.starting[starting.report_r] = starting

    @staticmethod
    def _kill_spare(spare: Spare, why: str) -> None:
        say(f"spare init {spare.pid} {why}: discarded")
        spare.discard()  # reaped later like any child; it was nobody's container yet

    def read_report(self, starting: Starting) -> None:
        """Take what the spare or setup process reported; finish the start at end of file."""
        while True:
            try:
                chunk = os.read(starting.report_r, 4096)
            except BlockingIOError:
                break
            starting.data += chunk
            if not chunk:
                self._finish(starting)
                return
        if starting.spare and b"R" in _lines(starting.data):
            starting.spare = False  # acknowledged: now it gets the setup's full time
            starting.deadline = time.monotonic() + START_TIMEOUT

    def expire(self, starting: Starting) -> None:
        self.starting.pop(starting.report_r)
        if starting.spare:
            spare = Spare(starting.kill_pid, -1, starting.report_r, starting.console)
            self._kill_spare(spare, f"did not answer within {SPARE_ANSWER_TIMEOUT:g} s")
            os.close(starting.log_fd)
            self._fork(starting.cid, starting.request)
            return
        for pid in {starting.kill_pid, starting.init_pid or starting.kill_pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._fail(starting, "the container's setup did not finish in time")

    def _finish(self, starting: Starting) -> None:
        self.starting.pop(starting.report_r)
        error: str | None = None
        for line in starting.data.decode(errors="replace").splitlines():
            if line.startswith("P") and starting.init_pid is None:
                starting.init_pid = int(line[1:])
            elif line.startswith("E") and error is None:
                error = line[1:]
        if starting.spare and error is None and b"R" not in _lines(starting.data):
            # End of file before any answer: the spare died waiting (killed, out of memory).
            say(f"spare init {starting.kill_pid} ended before it answered: discarded")
            # Dead already (end of file), perhaps reaped: its pid may be another's now.
            Spare(starting.kill_pid, -1, starting.report_r, starting.console).discard(kill=False)
            os.close(starting.log_fd)
            self._fork(starting.cid, starting.request)
            return
        if starting.init_pid is None or error is not None:
            self._fail(starting, error or "the container did not start")
            return
        os.close(starting.report_r)
        console = starting.console
        # The slave stays open here: a pty whose slave side is closed reads as hung up.
        record = Running(starting.cid, starting.log_fd, console.master, console.slave,
                         start_time=_start_time(starting.init_pid))
        self.running[starting.init_pid] = record
        self.consoles[console.master] = record
        # Read while it is still our unreaped child: the pid cannot have been recycled yet.
        self.send({"op": "started", "id": starting.cid, "pid": starting.init_pid,
                   "start_time": record.start_time})
        early = self.unclaimed.pop(starting.init_pid, None)
        # It ended already and was reaped before its start was read. (An entry from before
        # this start began is an earlier process that had the same pid.)
        if early is not None and early[1] >= starting.began:
            del self.running[starting.init_pid]
            self.ended_as(record, starting.init_pid, early[0])
            return
        if starting.cid in self.doomed:
            self.doomed.discard(starting.cid)
            self.kill(starting.cid)

    def _fail(self, starting: Starting, error: str) -> None:
        os.close(starting.report_r)
        os.close(starting.log_fd)
        starting.console.close()
        self.doomed.discard(starting.cid)
        self.send({"op": "failed", "id": starting.cid, "error": error})

    # -- spares -------------------------------------------------------------------------------

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
        os.set_blocking(report_r, False)
        self.making = Making(pid, request_w, report_r, time.monotonic() + START_TIMEOUT)

    def read_making(self, making: Making) -> None:
        try:
            chunk = os.read(making.report_r, 4096)
        except BlockingIOError:
            return
        making.data += chunk
        line = making.data.decode(errors="replace")
        if line.startswith("P") and line.endswith("\n"):
            self.making = None
            self.spare = Spare(int(line[1:].split()[0]), making.request_w, making.report_r,
                               Console.open())
        elif not chunk or "\n" in line:
            self._no_spares(making, line[1:].strip() or "its setup ended")

    def _no_spares(self, making: Making, why: str) -> None:
        say(f"no spare init: {why}")
        self.making = None
        self.spares_work = False
        try:
            os.kill(making.setup_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(making.request_w)
        os.close(making.report_r)

    # -- ends ---------------------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            DISCARDED.discard(pid)
            if self.spare is not None and pid == self.spare.pid:
                self.spare.discard(kill=False)
                self.spare = None  # it died waiting; another is made after the next start
            record = self.running.pop(pid, None)
            if record is None:
                # A setup process, a discarded spare, an init whose start failed — or an init
                # that exec'd and ended between our select and this wait, before its start was
                # read: kept a while, so that its end is not lost (see _finish).
                now = time.monotonic()
                self.unclaimed[pid] = (status, now)
                for old in [p for p, (_s, t) in self.unclaimed.items() if now - t > 120]:
                    del self.unclaimed[old]
                continue
            self.ended_as(record, pid, status)

    def ended_as(self, record: Running, pid: int, status: int) -> None:
        self.close(record)
        self.ended[record.cid] = {"id": record.cid, "pid": pid, "status": status}
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
            self.write_log(record, data)

    @staticmethod
    def write_log(record: Running, data: bytes) -> None:
        """Append to the log; what does not fit is dropped and counted, never fatal. Once the
        log takes writes again, a line says how much was lost."""
        if record.lost:
            note = (f"\n{stamp()} container({record.cid}): {record.lost} bytes of console "
                    f"output were lost: {record.lost_why}\n").encode()
            try:
                os.write(record.log_fd, note)
            except OSError:
                record.lost += len(data)
                return
            record.lost = 0
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(record.log_fd, view):]
            except OSError as exc:
                if not record.lost:
                    record.lost_why = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    say(f"container {record.cid}: cannot write its log ({exc.strerror}): "
                        "console output is dropped until it can")
                record.lost += len(view)
                return

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

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while self.daemon_here or self.running or self.starting or self.ended:
            watched = [wake_r, self.listener.fileno(), *self.consoles, *self.starting]
            if self.making is not None:
                watched.append(self.making.report_r)
            if self.sock is not None:
                watched.append(self.sock.fileno())
            deadlines = [s.deadline for s in self.starting.values()]
            if self.making is not None:
                deadlines.append(self.making.deadline)
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            # poll, not select: with many containers our descriptors pass 1024.
            poller = select.poll()
            for fd in watched:
                poller.register(fd, select.POLLIN)
            events = poller.poll(None if timeout is None else int(timeout * 1000) + 1)
            self.step([fd for fd, _mask in events], wake_r)
        deadline = time.monotonic() + 2
        while DISCARDED and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)

    def step(self, ready: list[int], wake_r: int) -> None:
        # Reports first: an init that exec'd and ended at once is registered before it is
        # reaped, so its end is never taken for a stranger's.
        for fd in ready:
            if fd in self.starting:
                self.read_report(self.starting[fd])
            elif self.making is not None and fd == self.making.report_r:
                self.read_making(self.making)
        now = time.monotonic()
        for starting in [s for s in self.starting.values() if s.deadline <= now]:
            self.expire(starting)
        if self.making is not None and self.making.deadline <= now:
            self._no_spares(self.making, "its setup did not finish in time")
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            self.reap()
        for fd in ready:
            record = self.consoles.get(fd)
            if record is not None:
                self.relay(record)
        if self.sock is not None and self.sock.fileno() in ready:
            self.serve_request()
        if self.listener.fileno() in ready:
            self.accept()
        if self.daemon_here and self.spares_work and self.spare is None and self.making is None:
            self.make_spare()  # after answering: off the next start's critical path

    def serve_request(self) -> None:
        assert self.sock is not None
        try:
            message = self.sock.recv(1 << 20)
        except OSError:
            message = b""
        if not message:
            self.daemon_gone()
            return
        try:
            request = json.loads(message)
            op = request["op"]
            cid = int(request.get("id", 0))
        except (ValueError, KeyError, TypeError):
            say("ignored a malformed request")
            return
        if op == "hello":
            self.hello(request)
        elif op == "ack":
            ended = self.ended.get(cid)
            if ended is not None and request.get("pid") in (None, ended["pid"]):
                del self.ended[cid]  # not a later run's report: that one has another pid
        elif op == "kill":
            self.kill(cid)
        elif op == "start":
            try:
                self.start(request)
            except Exception as exc:  # one bad start must not end the helper and every console
                say(f"container {cid}: start failed: {exc!r}")
                self.send({"op": "failed", "id": cid,
                           "error": f"the helper could not start it: {exc}"})


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _lines(data: bytes) -> list[bytes]:
    return [line[:1] for line in data.split(b"\n")]


def main(argv: list[str]) -> int:
    prctl.set_name("imageapi-helper")
    prctl.set_child_subreaper(True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we end
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    fd = int(argv[1])
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    listener = socket.socket(fileno=fd)
    path = listener.getsockname()
    ino = os.stat(path).st_ino if isinstance(path, str) and path else None
    helper = Helper(listener)
    # The daemon that started us connects at once; without it there is nothing to do.
    ready, _, _ = select.select([listener], [], [], FIRST_CONNECT_TIMEOUT)
    listener.setblocking(False)
    if ready:
        helper.accept()
        helper.serve()
    # The socket file goes with us, unless another helper has taken its name since.
    try:
        if ino is not None and os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
