"""Recovery: before the daemon serves, make the graph what the record and the system say.

The record (`imageapi.journal`) says what a previous run committed and which kernel steps it
had begun; the system says what exists. A crash can leave, for every object:

1. committed and ready, and still there: re-adopted (its driver rebuilds its live handles;
   a running container is watched again, its console still relayed by the helper);
2. committed and ready, but gone from the system (unmounted or unmapped by hand): dropped
   with a log line if nothing stands on it, else kept (and logged) until what stands on it
   goes — the usual rules;
3. committed and being destroyed: the destroy is finished (every driver's destroy skips what
   is already gone), as the client asked;
4. never committed (the daemon died while building it): every step it had announced is
   rolled back by what the system shows — the client never got its 201;
5. held by nobody any more (an inline part of a request that never completed, whose owner
   was never committed): torn down.

What imageapi made and nothing records — a mount under its mount directory, a `mount_`,
`upper_` or `work_` directory, a cgroup under its root, a container the helper runs for an
unknown id — is removed and logged. The whole run has one time budget: an object that cannot
be checked in time is reported and kept as recorded, not waited on forever. Recovery is
idempotent: run again on what it leaves, it changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageapi.drivers.base import Driver, Need, Node
from imageapi.graph import Registry
from imageapi.journal import Intent, Loaded
from imageapi.kernel import mount as kmount

log = logging.getLogger(__name__)

DIR_PREFIXES = ("mount_", "upper_", "work_")


@dataclass
class Report:
    adopted: int = 0
    dropped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.adopted} object(s) re-adopted, {len(self.dropped)} dropped, "
                f"{len(self.finished)} destroy(s) finished, {len(self.rolled_back)} step(s) "
                f"rolled back, {len(self.swept)} leftover(s) removed, "
                f"{len(self.unchecked)} not checked in time, in {self.seconds:.2f} s")


class Recovery:
    def __init__(
        self,
        registry: Registry,
        mount_dir: Path,
        sweepers: list[Callable[[set[str]], list[str]]] | None = None,
        late_sweepers: list[Callable[[set[str], list[str]], list[str]]] | None = None,
        budget: float = 30.0,
    ) -> None:
        self.registry = registry
        self.mount_dir = mount_dir
        self.sweepers = sweepers or []  # before the graph is settled (running processes)
        self.late_sweepers = late_sweepers or []  # after the mount dir is (devices)
        self.budget = budget
        self.report = Report()
        self._deadline = 0.0
        self._unresolved: set[int] = set()  # intents whose roll back failed or was not tried
        self.after: list[Callable[[], None]] = []  # once everything is on record (acks)

    def run(self, loaded: Loaded) -> Report:
        began = time.monotonic()
        self._deadline = began + self.budget
        reg = self.registry
        nodes = self._rebuild(loaded.nodes)
        committed = {n.id for n in nodes}
        # Before anything is flushed: no id of the record or of its intents is handed out again.
        top = max([*committed, *(i.node_id for i in loaded.intents)], default=0)
        reg._next_id = reg._id_mark = max(loaded.next_id, top + 1)
        reg.journal.reserve(reg._id_mark)
        values = _recorded_values(nodes)
        any_values = {v for _k, v in values}

        def held(what: str, value: Any) -> bool:
            """Whether a committed record holds `value` under key `what` ("*": any key)."""
            if what == "*":
                return _key(value) in any_values
            return (what, _key(value)) in values

        for node in nodes:
            reg._driver(node.collection, node.kind).known(node)
        # 4: steps of objects never committed, newest first.
        for intent in sorted(loaded.intents, key=lambda i: -i.seq):
            if intent.node_id in committed:
                continue
            self._undo(intent, held)
        # 1-3: every committed object against the system, bottom-up (ids ascend up the graph).
        gone: list[Node] = []
        destroying: list[Node] = []
        for node in nodes:
            if node.status == "destroying":
                destroying.append(node)
                continue
            driver = reg._driver(node.collection, node.kind)
            if time.monotonic() > self._deadline and not driver.always_adopt:
                self.report.unchecked.append(_name(reg, node))
                continue
            try:
                why = driver.adopt(node)
            except Exception:  # a driver bug must not stop the daemon from starting
                log.exception("recovery: %s could not be checked; kept as recorded",
                              _name(reg, node))
                self.report.unchecked.append(_name(reg, node))
                continue
            if why is None:
                self.report.adopted += 1
            else:
                gone.append(node)
                log.warning("recovery: %s is gone from the system: %s", _name(reg, node), why)
        # What runs and nothing records goes first: it may hold what is torn down next.
        recorded = _recorded_paths(nodes)
        for sweeper in self.sweepers:
            for what in sweeper(recorded):
                log.warning("recovery: removed %s, which imageapi made and nothing records", what)
                self.report.swept.append(what)
        self._install(nodes)
        self._drop_gone(gone)
        self._finish(destroying)
        self._collect_unheld()
        with reg._lock:
            recorded = _recorded_paths(list(reg._nodes.values()))
        unmounted = self._sweep_mount_dir(recorded)
        for late in self.late_sweepers:
            for what in late(recorded, unmounted):
                log.warning("recovery: removed %s, which imageapi made and nothing records", what)
                self.report.swept.append(what)
        with reg._lock:
            for node in reg._nodes.values():
                reg._commit("recover", node)
        reg._flush()
        # What could not be rolled back is kept for the next start.
        reg.journal.forget([i.seq for i in loaded.intents if i.seq not in self._unresolved])
        for ack in self.after:
            ack()
        self.report.seconds = time.monotonic() - began
        return self.report

    # -- rebuilding the graph -------------------------------------------------------------------

    def _rebuild(self, rows: list[dict[str, Any]]) -> list[Node]:
        by_id: dict[int, Node] = {}
        for row in sorted(rows, key=lambda r: r["id"]):
            needs: list[tuple[Need, Node]] = []
            broken = False
            for n in row["needs"]:
                dep = by_id.get(n["id"])
                if dep is None:
                    broken = True
                    break
                needs.append((Need(slot=n["slot"], collection=n["collection"], kind=n["kind"],
                                   ref=n["id"] if n["ref"] else None), dep))
            if broken or (row["collection"], row["kind"]) not in self.registry._drivers:
                log.error("recovery: the record of %s %d is inconsistent; it is dropped",
                          row["kind"], row["id"])
                self.report.dropped.append(f"{row['kind']} {row['id']} (inconsistent record)")
                continue
            claim = row.get("claim")
            by_id[row["id"]] = Node(
                id=row["id"], collection=row["collection"], kind=row["kind"], spec=row["spec"],
                needs=needs, record=row["record"], refs=row["refs"], api_held=row["api_held"],
                owner=row["owner"], status=row["status"],
                claim=_tuple(claim) if claim is not None else None,
            )
        return list(by_id.values())

    def _install(self, nodes: list[Node]) -> None:
        reg = self.registry
        with reg._lock:
            for node in nodes:
                reg._nodes[node.id] = node
                if node.claim is not None:
                    reg._claims[node.claim] = node.id
            # Holders counted again from the graph itself: the record of an owner that was
            # never committed must not keep its inline children alive.
            for node in nodes:
                users = sum(1 for n in nodes for _need, dep in n.needs if dep is node)
                node.refs = (1 if node.api_held else 0) + users
                if node.owner is not None and node.owner not in reg._nodes:
                    node.owner = None

    def _drop_gone(self, gone: list[Node]) -> None:
        reg = self.registry
        for node in sorted(gone, key=lambda n: -n.id):
            with reg._lock:
                if reg._nodes.get(node.id) is not node or node.status != "ready":
                    continue  # torn down already, as what a dropped node stood on
                users = reg._users(node)
            if users:
                names = ", ".join(_name(reg, u) for u in users)
                log.warning("recovery: %s is kept while %s stands on it", _name(reg, node), names)
                continue
            with reg._lock:
                reg._nodes.pop(node.id, None)
                if node.claim is not None and reg._claims.get(node.claim) == node.id:
                    del reg._claims[node.claim]
                reg._commit("destroy", node)
            self.report.dropped.append(_name(reg, node))
            self._release_deps(node)

    def _release_deps(self, node: Node) -> None:
        for _need, dep in reversed(node.needs):
            try:
                self.registry._release(dep)
            except Exception as exc:
                log.error("recovery: releasing %s: %s", _name(self.registry, dep), exc)

    def _finish(self, destroying: list[Node]) -> None:
        reg = self.registry
        for node in sorted(destroying, key=lambda n: -n.id):
            if time.monotonic() > self._deadline:
                self.report.unchecked.append(f"{_name(reg, node)} (its destroy)")
                continue  # still recorded as being destroyed: the next start finishes it
            driver = reg._driver(node.collection, node.kind)
            try:
                driver.adopt(node)  # live handles, where there is still something to destroy
                reg._teardown(node, restore=False)
                self.report.finished.append(_name(reg, node))
                log.info("recovery: finished destroying %s", _name(reg, node))
            except Exception as exc:
                log.error("recovery: cannot finish destroying %s: %s", _name(reg, node), exc)

    def _collect_unheld(self) -> None:
        reg = self.registry
        while True:
            with reg._lock:
                unheld = [n for n in reg._nodes.values() if n.refs <= 0 and n.status == "ready"]
                for node in unheld:
                    node.status = "destroying"
            if not unheld:
                return
            for node in sorted(unheld, key=lambda n: -n.id):
                if time.monotonic() > self._deadline:
                    self.report.unchecked.append(f"{_name(reg, node)} (held by nothing)")
                    continue
                log.warning("recovery: %s is held by nothing (part of a request that never "
                            "completed): tearing it down", _name(reg, node))
                try:
                    reg._teardown(node, restore=False)
                    self.report.finished.append(_name(reg, node))
                except Exception as exc:
                    log.error("recovery: cannot tear down %s: %s", _name(reg, node), exc)

    # -- rolling back and sweeping --------------------------------------------------------------

    def _undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> None:
        key = str(intent.detail.get("driver", ""))
        collection, _, kind = key.partition("/")
        driver: Driver | None = self.registry._drivers.get((collection, kind))
        if driver is None:
            return
        if intent.outcome and "failed" in intent.outcome:
            return  # it did not happen (and what the failed build made, it undid itself)
        if time.monotonic() > self._deadline:
            self._unresolved.add(intent.seq)
            self.report.unchecked.append(f"{intent.effect} of {kind} {intent.node_id}")
            return
        try:
            done = driver.undo(intent, held)
        except Exception as exc:
            log.error("recovery: cannot roll back %s of %s %d (kept for the next start): %s",
                      intent.effect, kind, intent.node_id, exc)
            self._unresolved.add(intent.seq)
            return
        if done:
            log.warning("recovery: %s %d was never committed: %s", kind, intent.node_id, done)
            self.report.rolled_back.append(done)

    def _sweep_mount_dir(self, recorded: set[str]) -> list[str]:
        """Unmount and remove what is under the mount dir and no record holds; returns the
        sources of what was unmounted (devices that may be ours too)."""
        base = str(self.mount_dir).rstrip("/") + "/"
        stray = sorted(((e.mountpoint, e.source) for e in kmount.mountinfo()
                        if e.mountpoint.startswith(base) and e.mountpoint not in recorded),
                       key=lambda m: -m[0].count("/"))
        unmounted = []
        for target, source in stray:
            if force_unmount(target):
                log.warning("recovery: unmounted %s, which nothing records", target)
                self.report.swept.append(f"mount {target}")
                unmounted.append(source)
        try:
            entries = list(os.scandir(self.mount_dir))
        except FileNotFoundError:
            return unmounted
        for entry in entries:
            if entry.path in recorded or not entry.name.startswith(DIR_PREFIXES):
                continue
            if kmount.is_mountpoint(entry.path):
                continue  # could not be unmounted: said above
            shutil.rmtree(entry.path, ignore_errors=True)
            log.warning("recovery: removed %s, which nothing records", entry.path)
            self.report.swept.append(f"directory {entry.path}")
        return unmounted


def force_unmount(target: str, patience: float = 2.0) -> bool:
    """Unmount something nothing records; a starting container's transient hold is waited
    out, a lasting one is detached lazily (nothing of ours uses it any more)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            kmount.umount(target, kmount.UMOUNT_NOFOLLOW)
            return True
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False  # not a mountpoint (any more)
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                break
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        kmount.umount(target, kmount.UMOUNT_NOFOLLOW | kmount.MNT_DETACH)
        log.warning("recovery: %s was busy: detached lazily", target)
        return True
    return False


def _recorded_values(nodes: list[Node]) -> set[tuple[str, Any]]:
    found: set[tuple[str, Any]] = set()
    for node in nodes:
        for key, value in node.record.items():
            found.add((key, _key(value)))
    return found


def _recorded_paths(nodes: list[Node]) -> set[str]:
    paths: set[str] = set()
    for node in nodes:
        for value in node.record.values():
            if isinstance(value, str) and value.startswith("/"):
                paths.add(value)
    return paths


def _key(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return value  # type: ignore[no-any-return]


def _tuple(value: Any) -> Hashable:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value  # type: ignore[no-any-return]


def _name(reg: Registry, node: Node) -> str:
    return f"{reg._noun(node)} {node.id}"
