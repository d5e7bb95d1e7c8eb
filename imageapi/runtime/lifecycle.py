"""One container's life: start, stop (with a timeout), notice its end, remove it.

States and the only transitions between them (`TRANSITIONS`):

    created ──start──> running ──stop──> stopping ──end──> exited | dead
                          └────────────end────────────────> exited | dead
    exited | dead ──start──> running

The end of the init process decides: status 0, or any end after a stop request, is
`exited`; another status or an unexpected signal is `dead` — except that a systemd halting
ends its pid namespace by SIGINT, which is a clean stop too. An end whose status nobody can
know (the helper that started it died) is `exited` after a stop request, else `dead`.

What the durable record keeps of a container is `record()`: its state, the init's pid and
that pid's start time (`/proc/PID/stat`, so a recycled pid is never taken for it), its
cgroup and log; `adopt` rebuilds a container from it after a daemon restart.

Each container has its own lock, taken for every state change and never while waiting for
the process; the object graph's lock is never held while any of this runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageapi.errors import BadRequest, NotFound, SystemFault
from imageapi.kernel import mount as kmount
from imageapi.kernel.ns import NAMESPACE_FLAGS, syncfs
from imageapi.runtime import rootfs
from imageapi.runtime.cgroups import CgroupTree
from imageapi.runtime.client import HELPER_GONE, Helper, StartFailed
from imageapi.runtime.logfile import ContainerLog
from imageapi.runtime.paths import CLEAN_PATH, check_mountpoints, find_entrypoint

log = logging.getLogger(__name__)

ALWAYS = ("mnt", "pid", "uts", "ipc", "cgroup")
TRANSITIONS = {
    ("created", "start"): "running",
    ("exited", "start"): "running",
    ("dead", "start"): "running",
    ("running", "stop"): "stopping",
    ("running", "end"): "exited|dead",
    ("stopping", "end"): "exited|dead",
}
StepFactory = Callable[..., AbstractContextManager[Any]]
SIGRTMIN_3 = signal.SIGRTMIN + 3  # systemd's "halt"
KILL_GRACE = 10.0  # after SIGKILL, how long a delete waits for the end to be reported


@dataclass
class Plan:
    """What a container runs: fixed at creation."""

    cid: int
    root: str
    argv: list[str]
    exe: str
    hostname: str
    systemd: bool
    namespaces: list[str]
    env: dict[str, str] = field(default_factory=dict)
    profile: str = "node"  # "confined": fewer capabilities and a seccomp filter (init.py)


class Container:
    def __init__(
        self,
        plan: Plan,
        *,
        helper: Callable[[], Helper],
        cgroups: CgroupTree | None,
        log_file: ContainerLog,
        stop_timeout: float,
        on_change: Callable[[str], None],
        step: StepFactory | None = None,
    ) -> None:
        self.plan = plan
        self.log = log_file
        self._helper = helper
        self._cgroups = cgroups
        self._stop_timeout = stop_timeout
        self._on_change = on_change
        self._step: StepFactory = step or _no_step
        self._lock = threading.Lock()
        self.state = "created"
        self.pid: int | None = None
        self._start_time: int | None = None
        self._pidfd: int | None = None
        self._cgroup: Path | None = None
        self._stop_requested = False
        self._ended = threading.Event()
        self._removed = False

    def _move(self, event: str, to: str | None = None) -> None:
        """Lock held: the one place the state changes, along `TRANSITIONS` only."""
        allowed = TRANSITIONS.get((self.state, event))
        target = to or allowed
        if allowed is None or target is None or target not in allowed.split("|"):
            raise SystemFault(f"container {self.plan.cid}: cannot {event} when {self.state}")
        self.state = target

    # -- the record ---------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        return {
            "state": self.state, "pid": self.pid, "start_time": self._start_time,
            "cgroup": str(self._cgroup) if self._cgroup else None,
            "stop_requested": self._stop_requested, "log": str(self.log.path),
        }

    def adopt(self, record: dict[str, Any], helper: Helper,
              acknowledge: Callable[[Callable[[], None]], None]) -> None:
        """After a daemon restart: take the container back as the record left it. A running
        one whose process lives (same pid, same start time) is watched again — by the helper
        that runs it, or, if that helper is gone, through its pidfd; one that ended while no
        daemon listened gets its real exit status from the helper, if it could keep it.
        `acknowledge(ack)` defers telling the helper until the end is on record."""
        cid = self.plan.cid
        greeting = helper.greeting
        with self._lock:
            self.state = record["state"]
            self._stop_requested = bool(record["stop_requested"])
            self._cgroup = Path(record["cgroup"]) if record["cgroup"] else None
            pid, start_time = record["pid"], record["start_time"]
            if cid in greeting.running and (self.state not in ("running", "stopping")
                                            or greeting.running[cid] != pid):
                # The helper runs it and the record does not say so: a start the daemon died
                # before committing. The helper knows: it runs, as that init.
                self.state = "running"
                pid, start_time = greeting.running[cid], greeting.start_times.get(cid)
                self.log.event("its start had not been recorded before the daemon stopped")
            if self.state not in ("running", "stopping"):
                return
            alive = start_time is not None and process_start_time(pid) == start_time
            self.pid, self._start_time = pid, start_time
            self._pidfd = _pidfd(pid) if alive else None
            if self._pidfd is not None and process_start_time(pid) != start_time:
                os.close(self._pidfd)  # recycled between the check and the open
                self._pidfd = None
        ended = greeting.ended.get(cid)
        if self._pidfd is None:
            status = ended["status"] if ended and ended["pid"] == pid else None
            self.log.event("the daemon restarted; the container had ended meanwhile")
            self._ended_with(status)
            if ended:
                acknowledge(lambda: helper.ack(cid, ended["pid"]))
            return
        self.log.event(f"the daemon restarted; container re-adopted (pid {pid})")
        if greeting.running.get(cid) == pid:
            helper.watch(cid, self._exited)
        else:
            threading.Thread(target=self._watch_pidfd, name=f"pidfd-{cid}", daemon=True).start()
        if self.state == "stopping":
            self._arm_kill_timer()

    # -- starting -----------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._removed:
                raise NotFound(f"container {self.plan.cid} was deleted")
            if self.state in ("running", "stopping"):
                return
            self.log.event("starting container")
            exe = self.check()
            cgroup = self._new_cgroup()
            try:
                with self._step("spawn", cid=self.plan.cid) as step:
                    pid, self._start_time = self._helper().start(self._request(cgroup, exe),
                                                                 self._exited)
                    step.done(pid=pid, start_time=self._start_time)
                self._pidfd = _pidfd(pid)
            except StartFailed as exc:
                self._drop_cgroup(cgroup)
                self.log.event(f"start failed: {exc}")
                raise SystemFault(f"container {self.plan.cid} did not start: {exc}") from exc
            except BaseException:
                self._drop_cgroup(cgroup)
                raise
            self._cgroup = cgroup
            self.pid = pid
            self._move("start")
            self._stop_requested = False
            self._ended = threading.Event()
            self.log.event(f"container running as pid {pid}")
        self._on_change("start")

    def _new_cgroup(self) -> Any:
        """A cgroup of its own, for systemd to manage. Only systemd containers get one: moving a
        process into a cgroup costs ~15 ms (the kernel waits for an RCU grace period), which
        would triple the start time of a plain container."""
        if not self.plan.systemd:
            return None
        if self._cgroups is None:
            raise SystemFault("a systemd container needs a cgroup2 hierarchy; none is mounted")
        with self._step("cgroup", cid=self.plan.cid, root=str(self._cgroups.root)) as step:
            path = self._cgroups.create(self.plan.cid)
            step.done(path=str(path))
        return path

    def check(self, quiet: bool = False) -> str:
        """What must hold before forking: a mounted root and an executable entrypoint in it.
        Returns the entrypoint's path inside the image."""
        say = (lambda _msg: None) if quiet else self.log.event
        say("validating image")
        root = self.plan.root
        if not os.path.isdir(root) or not kmount.is_mountpoint(root):
            raise BadRequest(f"the container's root {root} is not a mounted directory")
        check_mountpoints(root, rootfs.MOUNTPOINTS + (rootfs.SYSTEMD_MOUNTPOINTS
                                                      if self.plan.systemd else ()))
        say("validating init")
        return find_entrypoint(root, self.plan.exe)

    def _request(self, cgroup: Any, exe: str) -> dict[str, Any]:
        flags = 0
        for name in {*ALWAYS, *self.plan.namespaces}:
            flags |= NAMESPACE_FLAGS[name]
        return {
            "id": self.plan.cid,
            "root": self.plan.root,
            "argv": self.plan.argv,
            "exe": exe,
            "env": {"container": "imageapi", "PATH": CLEAN_PATH, "HOME": "/root",
                    **self.plan.env},
            "hostname": self.plan.hostname,
            "systemd": self.plan.systemd,
            "profile": self.plan.profile,
            "flags": flags,
            "cgroup": str(cgroup) if cgroup else None,
            "log": str(self.log.path),
        }

    # -- stopping -----------------------------------------------------------------------------

    def stop(self, wait: bool, kill: bool = False) -> None:
        """Ask the init to end (SIGRTMIN+3 for systemd, else SIGTERM); SIGKILL after the
        stop timeout. With `wait`, return only once it has ended; with `kill`, SIGKILL now
        (a forced delete: no grace)."""
        with self._lock:
            if self.state == "running":
                self._move("stop")
                self._stop_requested = True
                sig = signal.SIGKILL if kill else (
                    SIGRTMIN_3 if self.plan.systemd else signal.SIGTERM)
                self.log.event(f"stopping container ({_signame(sig)})")
                with self._step("stop", cid=self.plan.cid, signal=_signame(sig)):
                    self._signal(sig)
                if not kill:
                    self._arm_kill_timer()
            elif self.state != "stopping":
                return
            elif kill:
                self.log.event("stopping container (SIGKILL: a forced delete)")
                self._signal(signal.SIGKILL)
            ended = self._ended
        self._on_change("stopping")
        if wait and not ended.wait(self._stop_timeout + KILL_GRACE):
            raise SystemFault(f"container {self.plan.cid} did not end after SIGKILL")
        if wait:
            self._on_change("stop")

    def _arm_kill_timer(self) -> None:
        timer = threading.Timer(self._stop_timeout, self._kill_after_timeout,
                                args=(self._ended,))
        timer.daemon = True
        timer.start()

    def _kill_after_timeout(self, run: threading.Event) -> None:
        with self._lock:
            if run is not self._ended or run.is_set():
                return  # that run already ended
            self.log.event(f"stop timeout ({self._stop_timeout:g} s) passed: sending SIGKILL")
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self._pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass  # already gone; its end is on the way

    # -- the end of the process (the watcher) ------------------------------------------------

    def _exited(self, status: int | None) -> None:
        """The helper's report of the end (a waitpid status), or HELPER_GONE: the helper died
        and nobody can tell the status any more, so the end is watched on the pidfd."""
        if status is HELPER_GONE:
            self._watch_pidfd()
            return
        self._ended_with(status)

    def _watch_pidfd(self) -> None:
        with self._lock:
            pidfd = self._pidfd
        if pidfd is not None:
            # A pidfd reads as ready once the process has ended, whoever its parent is. (poll,
            # not select: the daemon's descriptors may be numbered past 1024.)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll()
        self._ended_with(None)

    def _ended_with(self, status: int | None) -> None:
        try:
            syncfs(self.plan.root)  # what it wrote is on disk before anyone hears it ended
        except OSError as exc:
            log.warning("container %d: syncfs(%s): %s", self.plan.cid, self.plan.root, exc)
        with self._lock:
            if self.state not in ("running", "stopping"):
                return  # told twice (the helper's report and the pidfd): the first one counts
            verdict, how = _verdict(status, self._stop_requested, self.plan.systemd)
            self._move("end", verdict)
            self.log.event(f"container {how}; state {self.state}")
            if self._pidfd is not None:
                os.close(self._pidfd)
            self._pidfd = None
            self.pid = None
            self._drop_cgroup(self._cgroup)
            self._cgroup = None
            self._ended.set()
        self._on_change("exit")

    def _drop_cgroup(self, cgroup: Any) -> None:
        if cgroup is not None and self._cgroups is not None:
            try:
                self._cgroups.remove(cgroup)
            except OSError as exc:
                self.log.event(f"cannot remove cgroup {cgroup}: {exc}")

    # -- removal ------------------------------------------------------------------------------

    def remove(self, kill: bool = False) -> None:
        """Stop it if it runs (`kill`: by SIGKILL at once), then forget it (the log file
        stays, for the record)."""
        with self._lock:
            self._removed = True  # first: a start racing with this delete must not win
        try:
            self.stop(wait=True, kill=kill)
        except BaseException:
            with self._lock:
                self._removed = False  # it stays (the graph keeps the object): usable again
            raise
        self.log.event("container deleted")


@contextlib.contextmanager
def _no_step(effect: str, **detail: Any) -> Iterator[Any]:
    class Step:
        def done(self, **result: Any) -> None:
            pass

    yield Step()


def process_start_time(pid: int | None) -> int | None:
    """When the process started (clock ticks after boot, `/proc/PID/stat` field 22), or None
    if there is no such process: with the pid, it names one process for good."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[19])


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None  # it ended already; the helper's report of it is on the way


def _verdict(status: int | None, stop_requested: bool, systemd: bool) -> tuple[str, str]:
    if status is None:
        how = "ended; its exit status could not be known (the helper that started it is gone)"
        return ("exited" if stop_requested else "dead"), how
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        how = f"exited with status {code}"
        clean = code == 0
    else:
        sig = os.WTERMSIG(status)
        how = f"killed by {_signame(sig)}"
        clean = systemd and sig == signal.SIGINT
    if stop_requested:
        return "exited", how + " after a stop request"
    return ("exited" if clean else "dead"), how


def _signame(sig: int) -> str:
    if sig == SIGRTMIN_3:
        return "SIGRTMIN+3"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
