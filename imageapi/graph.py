"""The object graph: every attachment and mount, their ids, references and lifetimes.

Rules (from the Image API v1 contract):
- ids come from one counter for all kinds, start at 1 and are never reused;
- `refs` counts holders: the API holds what it created directly, every object that stands on
  another holds one more; an object defined inline is held only by the object that defined it
  (its owner);
- whatever loses its last holder is torn down at once, bottom-up;
- DELETE of an object that something else holds is a 409 and changes nothing;
- a nested request that fails part-way releases exactly what it built, in reverse order.

Locking discipline — one lock, `Registry._lock`, and three rules:
1. Every read or write of the node table, of a node's `refs`/`status`/`owner`/`api_held`,
   of the claim table and of the id counter happens with the lock held, in one critical
   section per decision (check and act together: no check-then-act across a release).
2. The lock is never held across a driver's `build`/`destroy` (kernel calls that may block
   for seconds) nor across anything else that can block; other requests only ever wait
   for a few dictionary operations.
3. A node being built is invisible (not in the table) until committed; a node being torn down
   has `status == "destroying"` and cannot be referenced, read or deleted. So a kernel call
   always runs on an object that no other request can reach in a conflicting way, and the
   uniqueness claims (e.g. "this image is mapped") are taken under the lock before building.

Every committed change goes through `_commit`, which queues the changed node's row (under the
lock: a few dictionary operations). The rows reach the durable record (`imageapi.journal`) in
`_flush`, called by every operation after it has released the lock and before it answers:
one transaction per batch, in commit order (`_flush_lock` orders the writers), so a read never
waits behind a disk write. Ids are reserved in the record in blocks before they are handed
out, so none is ever reused, even after a crash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from imageapi.drivers.base import Driver, Need, Node, Spec
from imageapi.errors import ApiError, BadRequest, Conflict, NotFound, SystemFault
from imageapi.journal import Journal, NoJournal

log = logging.getLogger(__name__)

Listener = Callable[[str, Node], None]
Row = dict[str, Any]
# How a caller wants an object shown: (node, the driver's own view of a node) -> JSON. Called
# with the lock held, so it sees one consistent graph; it must only read.
Render = Callable[[Node, Callable[[Node], dict[str, Any]]], Any]
Kinds = str | tuple[str, ...] | None  # one kind, any of several, or any kind of the collection
# Ids reserved in the record at a time: one write per block, not per object.
ID_BLOCK = 64


class Registry:
    def __init__(self, drivers: Iterable[Driver], journal: Journal | None = None) -> None:
        self._drivers = {(d.collection, d.kind): d for d in drivers}
        self._journal = journal or NoJournal()
        for driver in self._drivers.values():
            driver.on_change = self._changed
            driver.journal = self._journal
        self._lock = threading.Lock()
        self._nodes: dict[int, Node] = {}
        self._claims: dict[Hashable, int] = {}  # claim -> holder id (0 while building)
        self._next_id = 1
        self._id_mark = 1  # ids below this are reserved in the record
        self._listeners: list[Listener] = []
        self._pending: list[tuple[int, Row | None]] = []  # committed, not yet written
        self._flush_lock = threading.Lock()

    @property
    def journal(self) -> Journal:
        return self._journal

    def drivers(self) -> list[Driver]:
        return list(self._drivers.values())

    # -- public API: what the handlers call ------------------------------------------------

    def kinds(self, collection: str) -> list[str]:
        return sorted(k for c, k in self._drivers if c == collection)

    def create(self, collection: str, kind: str, spec: Spec, render: Render | None = None
               ) -> Any:
        self._check(collection, kind, spec)
        try:
            node = self._create(collection, kind, spec, owned=False)
        finally:
            self._flush()
        with self._lock:
            return self._show(node, render)

    def get(self, collection: str, kind: Kinds, node_id: int, render: Render | None = None
            ) -> Any:
        with self._lock:
            node = self._lookup(collection, kind, node_id)
            if render is None:
                return self._render_as(node, generic=kind is None)
            return render(node, self._render)

    def list(self, collection: str, kind: Kinds = None, render: Render | None = None,
             where: Callable[[Node], bool] | None = None) -> list[Any]:
        with self._lock:
            nodes = [
                n for n in sorted(self._nodes.values(), key=lambda n: n.id)
                if n.collection == collection and _admits(kind, n.kind)
                and n.status == "ready" and (where is None or where(n))
            ]
            if render is None:
                return [self._render_as(n, generic=kind is None) for n in nodes]
            return [render(n, self._render) for n in nodes]

    def delete(self, collection: str, kind: Kinds, node_id: int, render: Render | None = None,
               force: bool = False) -> Any:
        """Tear the object down. `force` is handed to the drivers (what the system still holds
        outside the graph); what the graph holds is a 409 either way, and changes nothing."""
        with self._lock:
            node = self._lookup(collection, kind, node_id)
            what = self._noun(node)
            if not node.api_held:
                owner = self._nodes.get(node.owner or 0)
                by = f"{self._noun(owner)} {owner.id}" if owner else "another object"
                raise Conflict(f"{what} {node.id} was defined inside {by}; it goes when that goes")
            users = self._users(node)
            if users:
                names = ", ".join(f"{self._noun(u)} {u.id}" for u in users)
                raise Conflict(f"{what} {node.id} is in use by {names}")
            node.refs, node.api_held, node.status = 0, False, "destroying"
            self._commit("release", node)
        try:
            self._flush()  # "being destroyed" is on record before the first kernel call
            self._teardown(node, restore=True, force=force)
        finally:
            self._flush()
        with self._lock:
            return self._show(node, render)  # as it ended: refs 0, a container's final state

    def find_name(self, collection: str, kind: str, name: str) -> int:
        """The id of the object of that kind holding `name` (containers have names)."""
        driver = self._driver(collection, kind)
        with self._lock:
            holder = self._claims.get(driver.name_claim(name))
            node = self._nodes.get(holder or 0)
            if node is None or node.status != "ready":
                raise NotFound(f"no {driver.noun} named {name!r}")
            return node.id

    def change(self, collection: str, kind: str, node_id: int, target: str,
               render: Render | None = None) -> Any:
        """Ask an object to move to another state (start or stop a container)."""
        with self._lock:
            node = self._lookup(collection, kind, node_id)
        driver = self._drivers[(collection, kind)]
        try:
            driver.change(node, target)  # kernel and process work: outside the lock
        finally:
            self._flush()
        with self._lock:
            return self._show(node, render)

    def kind_of(self, node_id: int, collection: str = "mount") -> str | None:
        with self._lock:
            node = self._nodes.get(node_id)
            return node.kind if node and node.collection == collection else None

    def node(self, collection: str, kind: Kinds, node_id: int) -> Node:
        """The ready object (404 otherwise), for a caller that then waits on it outside the
        lock (a delete waiting for a container's end)."""
        with self._lock:
            return self._lookup(collection, kind, node_id)

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(event, node)` on every committed change, with the lock held."""
        self._listeners.append(listener)

    # -- building ----------------------------------------------------------------------------

    def _driver(self, collection: str, kind: str) -> Driver:
        try:
            return self._drivers[(collection, kind)]
        except KeyError:
            kinds = ", ".join(self.kinds(collection))
            raise BadRequest(f"unknown {collection} kind {kind!r} (known: {kinds})") from None

    def _check(self, collection: str, kind: str, spec: Spec) -> None:
        """Check a whole nested request before building any of it (drivers' checks are pure)."""
        driver = self._driver(collection, kind)
        for need in driver.needs(driver.normalize(spec)):
            if need.ref is None and need.spec is not None:
                self._check(need.collection, need.kind, need.spec)

    def _create(self, collection: str, kind: str, spec: Spec, owned: bool) -> Node:
        driver = self._driver(collection, kind)
        spec = driver.normalize(spec)
        resolved: list[tuple[Need, Node]] = []
        building: int | None = None
        # Claimed first: a taken name or image refuses the request before anything is built.
        claim = driver.claim(spec)
        if claim is not None:
            self._take_claim(claim, driver)
        try:
            driver.check_available(spec)
            for need in driver.needs(spec):
                if need.ref is not None:
                    resolved.append((need, self._acquire(need)))
                else:
                    assert need.spec is not None
                    child = self._create(need.collection, need.kind, need.spec, owned=True)
                    resolved.append((need, child))
            node_id = self._new_id()
            building = node_id
            node = Node(
                id=node_id, collection=collection, kind=kind, spec=spec, needs=resolved,
                record={}, api_held=not owned, claim=claim,
            )
            node.record = driver.build(node)
        except BaseException:
            if building is not None:
                # The driver undid its own work: its steps describe nothing any more (and a
                # later recovery must not "roll back" what someone else made meanwhile).
                try:
                    self._journal.forget_node(building)
                except Exception as exc:
                    log.error("cannot forget the steps of %s %s %d: %s", collection, kind,
                              building, exc)
            if claim is not None:
                with self._lock:
                    self._claims.pop(claim, None)
            # The build's error is the one the client needs; these go to the log.
            for failure in self._release_all(resolved):
                log.error("%s %s: undoing a failed create: %s", collection, kind,
                          failure.message)
            raise
        with self._lock:
            if claim is not None:
                self._claims[claim] = node.id
            for need, child in resolved:
                if need.ref is None:
                    child.owner = node.id
                    self._commit("own", child)
            self._nodes[node.id] = node
            self._commit("create", node)
        log.info("created %s %d", driver.noun, node.id)
        return node

    def _new_id(self) -> int:
        """Reserved before building, so the driver can name things after it (log files) and
        announce its kernel steps; a failed build burns its id, which is fine: ids are never
        reused anyway."""
        with self._lock:
            node_id = self._next_id
            self._next_id += 1
            if self._next_id <= self._id_mark:
                return node_id
        # Past the reserved block: no id of the next block is used before it is on record.
        with self._flush_lock:
            with self._lock:
                mark = self._next_id + ID_BLOCK if self._next_id > self._id_mark else None
            if mark is not None:
                self._journal.reserve(mark)
                with self._lock:
                    self._id_mark = max(self._id_mark, mark)
        return node_id

    def _take_claim(self, claim: Hashable, driver: Driver) -> None:
        with self._lock:
            holder = self._claims.get(claim)
            if holder is None:
                self._claims[claim] = 0
                return
        by = f"by {driver.noun} {holder}" if holder else "by a request in progress"
        raise Conflict(f"{driver.describe_claim(claim)} is already {driver.claimed_as} {by}")

    def _acquire(self, need: Need) -> Node:
        """Take a reference on an existing object for a new user."""
        driver = self._drivers.get((need.collection, need.kind or ""))
        # A kind no driver serves (0.2's nfs) is still a kind the id may fail to be.
        want = driver.noun if driver and not need.accept else \
            f"{need.kind} {need.collection}" if need.kind else f"{need.collection} object"
        with self._lock:
            node = self._nodes.get(need.ref or 0)
            if node is None or node.collection != need.collection:
                raise NotFound(f"{need.slot}: no {need.collection} object with id {need.ref}")
            if not need.admits(node.kind):
                raise BadRequest(
                    f"{need.slot}: {need.collection} {node.id} is {_a(self._noun(node))}, "
                    f"not {_a(want)}"
                )
            if node.status != "ready":
                raise Conflict(f"{need.slot}: {want} {node.id} is being torn down")
            node.refs += 1
            self._commit("hold", node)
            return node

    # -- tearing down ------------------------------------------------------------------------

    def _release_all(self, resolved: list[tuple[Need, Node]], force: bool = False
                     ) -> list[ApiError]:
        """Release the objects a node stood on, last first; return what could not go."""
        failures: list[ApiError] = []
        for _need, child in reversed(resolved):
            try:
                self._release(child, force)
            except ApiError as exc:
                failures.append(exc)
        return failures

    def _release(self, node: Node, force: bool = False) -> None:
        with self._lock:
            node.refs -= 1
            dead = node.refs == 0
            if dead:
                node.status = "destroying"
            self._commit("release", node)
        if dead:
            self._flush()  # "being destroyed" is on record before the first kernel call
            self._teardown(node, restore=False, force=force)

    def _teardown(self, node: Node, restore: bool, force: bool = False) -> None:
        """Destroy a node nobody holds, then release what it stood on.

        If the kernel refuses, the node stays, held by the API again (so it can be deleted by
        id later); `restore` says the caller asked for this very node, otherwise it was
        collected as a dependency and its failure is reported as such.
        """
        driver = self._drivers[(node.collection, node.kind)]
        try:
            driver.destroy(node, force=force)
        except Exception as exc:
            with self._lock:
                node.refs, node.api_held, node.owner, node.status = 1, True, None, "ready"
                self._commit("restore", node)
            err = exc if isinstance(exc, ApiError) else SystemFault(f"{exc}")
            if restore:
                raise err from exc
            raise type(err)(
                f"{driver.noun} {node.id} could not be torn down ({err.message}); it is kept, "
                f"held by the API: delete it by id once it is free"
            ) from exc
        with self._lock:
            self._nodes.pop(node.id, None)
            if node.claim is not None and self._claims.get(node.claim) == node.id:
                del self._claims[node.claim]
            self._commit("destroy", node)
        log.info("destroyed %s %d", driver.noun, node.id)
        failures = self._release_all(node.needs, force)
        if failures:
            noun = driver.noun
            detail = "; ".join(f.message for f in failures)
            raise SystemFault(f"{noun} {node.id} was removed, but not all it stood on: {detail}")

    # -- helpers (lock held) -------------------------------------------------------------

    def _lookup(self, collection: str, kind: Kinds, node_id: int) -> Node:
        node = self._nodes.get(node_id)
        if (
            node is None
            or node.collection != collection
            or not _admits(kind, node.kind)
            or node.status != "ready"
        ):
            noun = self._driver(collection, kind).noun if isinstance(kind, str) else collection
            raise NotFound(f"no {noun} with id {node_id}")
        return node

    def _show(self, node: Node, render: Render | None) -> Any:
        return self._render(node) if render is None else render(node, self._render)

    def _users(self, node: Node) -> list[Node]:
        return [
            n for n in sorted(self._nodes.values(), key=lambda n: n.id)
            if any(dep is node for _need, dep in n.needs)
        ]

    def _noun(self, node: Node) -> str:
        return self._drivers[(node.collection, node.kind)].noun

    def _render(self, node: Node) -> dict[str, Any]:
        driver = self._drivers[(node.collection, node.kind)]
        view = driver.render(node, self._render)
        if driver.shows_refs:
            view["refs"] = node.refs
        return view

    def _changed(self, node: Node, event: str) -> None:
        """A driver's report that a live object changed on its own (a container exited)."""
        with self._lock:
            if self._nodes.get(node.id) is node:
                self._commit(event, node)
        self._flush()

    def _render_as(self, node: Node, generic: bool) -> dict[str, Any]:
        view = self._render(node)
        return {"kind": node.kind, "mount_id": node.id, node.kind: view} if generic else view

    def _commit(self, event: str, node: Node) -> None:
        """Lock held: queue the node's row (None: it is gone) for the next `_flush`."""
        self._pending.append((node.id, None if event == "destroy" else self._row(node)))
        for listener in self._listeners:
            listener(event, node)

    def _row(self, node: Node) -> Row:
        driver = self._drivers[(node.collection, node.kind)]
        return {
            "id": node.id, "collection": node.collection, "kind": node.kind,
            "spec": driver.recordable_spec(node.spec), "record": driver.record_of(node),
            "refs": node.refs, "api_held": node.api_held, "owner": node.owner,
            "status": node.status,
            "claim": list(node.claim) if isinstance(node.claim, tuple) else node.claim,
            # The kind found, not asked: a 0.2 reference may accept several.
            "needs": [{"slot": need.slot, "collection": need.collection, "kind": dep.kind,
                       "id": dep.id, "ref": need.ref is not None} for need, dep in node.needs],
        }  # fmt: skip

    def _flush(self) -> None:
        """Write what was committed, in order, outside the registry lock. A write that fails
        (a full disk) keeps its batch queued for the next flush, and the request that flushed
        is told (a 500): what it changed is live, but not yet on record."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                mark = self._id_mark
            if not batch:
                return
            try:
                self._journal.write(batch, mark)
            except Exception as exc:
                with self._lock:
                    self._pending[:0] = batch
                log.error("the durable record cannot be written: %s", exc)
                raise SystemFault(f"the durable record cannot be written: {exc}") from exc


def _admits(kinds: Kinds, kind: str) -> bool:
    if kinds is None:
        return True
    return kind == kinds if isinstance(kinds, str) else kind in kinds


def _a(noun: str) -> str:
    # "rbd" is read "ar-bee-dee", so it takes "an" too.
    return f"an {noun}" if noun.startswith(("a", "e", "i", "o", "u", "rbd")) else f"a {noun}"
