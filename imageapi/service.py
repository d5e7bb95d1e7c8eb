"""The daemon's state: settings, the drivers of every kind, and the object graph over them."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path

from imageapi.config import Settings
from imageapi.drivers.bind_mount import BindMount
from imageapi.drivers.container import ContainerDriver
from imageapi.drivers.local_attach import LocalAttach
from imageapi.drivers.loopback_attach import LoopbackAttach
from imageapi.drivers.overlay_mount import OverlayMount
from imageapi.drivers.rbd_attach import RbdAttach, choose
from imageapi.drivers.rbd_krbd import KrbdAttach
from imageapi.drivers.rbd_mount import LocalMount, LoopbackMount, RbdMount
from imageapi.drivers.rbd_user import UserRbdAttach
from imageapi.errors import ApiError
from imageapi.graph import Registry
from imageapi.journal import CrashPoints, Journal, NoJournal
from imageapi.recovery import Recovery
from imageapi.runtime import cgroups
from imageapi.runtime.client import Helper

log = logging.getLogger(__name__)


class Service:
    """Everything one daemon holds. Built before anything is served: it takes the run
    directory's lock (one daemon per run directory), finds or starts the container helper,
    opens the durable record and recovers the graph from it and the system."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        for path in (settings.run_dir, settings.mounts, settings.logs):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock_fd = _lock_run_dir(settings.run_dir)
        cgroup_root = settings.cgroup_root or cgroups.default_root()
        if cgroup_root is None:
            log.warning("no cgroup2 hierarchy: containers get no cgroup of their own")
        self.cgroups = cgroups.CgroupTree(cgroup_root) if cgroup_root else None
        self._helper: Helper | None = None
        self._helper_lock = threading.Lock()
        helper = self.helper()  # found again, or started now: the first container won't wait
        if helper.greeting.new:
            log.info("started the container helper (pid %d)", helper.pid)
        else:
            log.info("reconnected to the container helper (pid %d): %d container(s) running, "
                     "%d ended while no daemon listened", helper.pid,
                     len(helper.greeting.running), len(helper.greeting.ended))
        crash = CrashPoints.from_environ()
        journal = Journal(settings.state_db, crash) if settings.durable else NoJournal()
        journal.crash = crash
        self.containers = ContainerDriver(settings.logs, self.helper, self.cgroups,
                                          settings.stop_timeout)
        self.rbds = _rbd_driver(settings)
        self.loopbacks = LoopbackAttach(tag=_tag(settings.run_dir))
        self.registry = Registry(
            [
                self.rbds,
                self.loopbacks,
                LocalAttach(),
                RbdMount(settings.mounts),
                LoopbackMount(settings.mounts),
                LocalMount(settings.mounts),
                BindMount(settings.mounts),
                OverlayMount(settings.mounts),
                self.containers,
            ],
            journal,
        )
        loaded = journal.open()
        if loaded.problem:
            log.error("the durable record could not be used (%s): starting from what the "
                      "system shows, and cleaning what imageapi made", loaded.problem)
        recovery = Recovery(
            self.registry, settings.mounts, [self.containers.sweep_orphans],
            [self.rbds.sweep_orphans, self.loopbacks.sweep_orphans], settings.recovery_budget,
        )
        recovery.after.append(self._send_deferred_acks)
        report = recovery.run(loaded)
        if not loaded.fresh or report.swept or report.rolled_back:
            log.info("recovery: %s", report.summary())
        for what in report.unchecked:
            log.error("recovery: %s could not be checked within %g s; kept as recorded", what,
                      settings.recovery_budget)
        self.recovery = report
        crash.armed = True

    def helper(self) -> Helper:
        """The container helper process, (re)started when needed."""
        with self._helper_lock:
            if self._helper is None or not self._helper.alive():
                if self._helper is not None:
                    log.error("the container helper died; starting a new one")
                self._helper = Helper(self.settings.run_dir, on_gone=self._helper_gone)
            return self._helper

    def _send_deferred_acks(self) -> None:
        while self.containers.deferred:
            self.containers.deferred.pop(0)()

    def _helper_gone(self) -> None:
        """At once, not at the next start: the next start should not wait for a helper."""
        try:
            helper = self.helper()
            log.info("started a new container helper (pid %d)", helper.pid)
        except OSError as exc:
            log.error("cannot start a new container helper: %s", exc)

    def drain(self) -> list[str]:
        """Stop and tear down everything (a node being emptied): users before what they
        stand on. Returns what could not go, with why."""
        graph = self.registry
        failed: list[str] = []
        for _ in range(10):  # inline children go with their owners; look again
            batch = [("container", "container", c["id"])
                     for c in graph.list("container", "container")]
            mounts = sorted(graph.list("mount"), key=lambda m: -m["mount_id"])
            batch += [("mount", m["kind"], m["mount_id"]) for m in mounts]
            for kind in graph.kinds("attach"):
                batch += [("attach", kind, a["id"]) for a in graph.list("attach", kind)]
            if not batch:
                return []
            failed = []
            for collection, kind, node_id in batch:
                try:
                    graph.delete(collection, kind, node_id)
                    log.info("drain: removed %s %s %d", collection, kind, node_id)
                except ApiError as exc:
                    failed.append(f"{collection} {kind} {node_id}: {exc.message}")
        return failed

    def close(self) -> None:
        """On daemon exit: let the helper go; running containers and mounts are left alone
        (the next start re-adopts them)."""
        with self._helper_lock:
            if self._helper is not None:
                self._helper.close()
                self._helper = None
        if self.cgroups is not None:
            self.cgroups.close()
        self.registry.journal.close()
        os.close(self._lock_fd)


def _rbd_driver(settings: Settings) -> RbdAttach:
    krbd = KrbdAttach(settings.rbd_sysfs, settings.dev_dir, settings.device_timeout)
    user = UserRbdAttach(settings.run_dir)
    active, why = choose(settings.rbd_driver, settings.rbd_sysfs)
    if active == "krbd":
        log.info("rbd driver: krbd, the kernel's rbd module through %s (%s)",
                 settings.rbd_sysfs, why)
    else:
        problem = user.availability()
        if problem:
            log.error("rbd driver: user (%s), but rbd images cannot be attached: %s", why,
                      problem)
        else:
            log.info("rbd driver: user, librbd through FUSE and loop devices, one server "
                     "process per mapping (%s; Ceph bindings: %s)", why, user.bindings_from)
    return RbdAttach(krbd, user, active)


def _tag(run_dir: Path) -> str:
    """What marks the loop devices of the daemon of this run directory as its own."""
    digest = hashlib.sha256(os.fsencode(run_dir.resolve())).hexdigest()[:16]
    return f"imageapi {digest}"


def _lock_run_dir(run_dir: Path) -> int:
    """An exclusive lock on `<run_dir>/daemon.lock`, held for the daemon's life: two daemons
    on one run directory would each take the other's objects for leftovers."""
    fd = os.open(run_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EBUSY, "another imageapi daemon uses this run directory",
                      str(run_dir)) from None
    return fd
