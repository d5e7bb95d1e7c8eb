"""The one small interface every kind of object implements.

A driver knows how to check a spec, which other objects it stands on, how to build itself
in the kernel and how to tear itself down. The object graph (`imageapi.graph`) does the rest:
ids, references, ownership, locking, rollback. A new kind of attachment or mount is one new
module with one `Driver` subclass, listed in `imageapi.service`.

What a driver made is kept in two parts: `Node.record`, plain JSON-serialisable data (device
numbers, mountpoints, pids: what the durable record saves, and what the wire view is rendered
from), and `Node.live`, the handles of this process (an open loop device, a container's pidfd
and threads), which `adopt` rebuilds from the record after a restart. Each kernel side effect
is announced with `step` before it happens, so a crash between the effect and the next commit
is recognisable, and `undo` rolls such a step back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from imageapi.errors import BadRequest
from imageapi.journal import Intent, Journal, NoJournal

Spec = dict[str, Any]
Record = dict[str, Any]
State = Record  # what `build` returns: the record


class Step:
    """One announced kernel side effect; `done(result)` records what it made."""

    def __init__(self, journal: Journal, seq: int) -> None:
        self.journal = journal
        self.seq = seq
        self.result: dict[str, Any] = {}

    def done(self, **result: Any) -> None:
        self.result = result


@dataclass(frozen=True)
class Need:
    """One object a spec stands on: a reference by id, or a definition to build and own.

    `slot` names where it came from (e.g. `rbd`, `lower[1]`) for error messages and for
    rendering; `kind` is the driver kind wanted. A reference may instead accept any of the
    kinds in `accept` (a 0.2 `attach` mount: a mount of any attachment), or any kind at all
    when `kind` is None (a 0.2 `{"id": N}`); a definition always names its kind.
    """

    slot: str
    collection: str
    kind: str | None
    ref: int | None = None
    spec: Spec | None = None
    accept: tuple[str, ...] = ()

    def admits(self, kind: str) -> bool:
        if self.accept:
            return kind in self.accept
        return self.kind is None or kind == self.kind


@dataclass
class Node:
    """One object of the graph. Fields other than `record`/`live`/`refs`/`status` never
    change."""

    id: int
    collection: str
    kind: str
    spec: Spec
    needs: list[tuple[Need, Node]]
    record: Record
    refs: int = 1
    api_held: bool = True
    owner: int | None = None
    status: str = "ready"  # ready | destroying
    claim: Hashable | None = None
    live: dict[str, Any] = field(default_factory=dict)  # this process's handles: never saved

    def owns(self, child: Node) -> bool:
        return child.owner == self.id


class Driver:
    collection: ClassVar[str]  # "attach" or "mount"
    kind: ClassVar[str]  # "rbd", "overlay", ...
    noun: ClassVar[str]  # for messages: "rbd", "rbd mount", "overlay mount"
    claimed_as: ClassVar[str] = "in use"  # "<claim> is already <claimed_as> by rbd 3"
    shows_refs: ClassVar[bool] = True  # nothing stands on a container: it has no `refs`

    # Set by the registry: report a change the object made on its own (a container ended).
    on_change: Callable[[Node, str], None] = staticmethod(lambda node, event: None)
    # Set by the registry: where `step` announces kernel side effects.
    journal: Journal = NoJournal()

    @contextlib.contextmanager
    def step(self, node_id: int, effect: str, **detail: Any) -> Iterator[Step]:
        """Announce a kernel side effect of object `node_id` before making it; its outcome is
        written after (`step.done(...)` says what it made; a failure says it failed)."""
        seq = self.journal.intent(node_id, effect, {"driver": f"{self.collection}/{self.kind}",
                                                    **detail})
        step = Step(self.journal, seq)
        try:
            yield step
        except BaseException as exc:
            self.journal.outcome(seq, {"failed": str(exc) or type(exc).__name__}, effect)
            raise
        self.journal.outcome(seq, step.result or {"ok": True}, effect)

    def normalize(self, spec: Spec) -> Spec:
        """Check a request spec and return it cleaned (server-set fields dropped).

        Pure: raises `BadRequest`, touches nothing. Runs before anything is built.
        """
        raise NotImplementedError

    def needs(self, spec: Spec) -> list[Need]:
        return []

    def claim(self, spec: Spec) -> Hashable | None:
        """A key that at most one live object may hold (e.g. the image an rbd maps)."""
        return None

    def describe_claim(self, claim: Hashable) -> str:
        return str(claim)

    def name_claim(self, name: str) -> Hashable:
        """The claim a named object of this kind holds (see `claim`)."""
        raise NotImplementedError

    def change(self, node: Node, target: str) -> None:
        """Move a live object to another state; the graph lock is NOT held."""
        raise BadRequest(f"a {self.noun} has no states to change")

    def check_available(self, spec: Spec) -> None:
        """Last check before building, after the claim is held (e.g. mapped outside us)."""

    def build(self, node: Node) -> State:
        """Make the object real in the kernel; the graph lock is NOT held.

        `node.needs` holds the resolved objects it stands on (ready, referenced). On failure it
        must undo its own partial work before raising.
        """
        raise NotImplementedError

    def destroy(self, node: Node, force: bool = False) -> None:
        """Undo `build`; the graph lock is NOT held. Raises if the kernel refuses (e.g. busy).

        `force` (a 0.2 `DELETE ...&force=true`) overrides what the system holds outside the
        graph (a device still open, a mount still busy), never the graph's own holders.
        Idempotent: what is already gone (after a crash half-way through a destroy, or removed
        by hand) is skipped with a log line, not an error."""
        raise NotImplementedError

    def recordable_spec(self, spec: Spec) -> Spec:
        """The spec as the durable record keeps it: without secrets."""
        return spec

    def record_of(self, node: Node) -> Record:
        """The record to save now (a container's changes as it runs)."""
        return node.record

    # Adopted even past recovery's time budget: the object cannot be served without its
    # live handles and checking it cannot block (a container: a read of /proc, a pidfd).
    always_adopt: ClassVar[bool] = False

    def known(self, node: Node) -> None:
        """At recovery, before anything else: `node` is in the record (whatever its state)."""

    def adopt(self, node: Node) -> str | None:
        """After a restart: check the record against the system and rebuild `node.live`.
        Returns None if the object is there, else why it is gone (it is then dropped)."""
        return None

    def undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> str | None:
        """Roll back a step of an object that was never committed (the daemon died while
        building it). `held(what, value)` says whether a committed object records it (a device
        number, a path), which must then be left alone. Returns what was done, for the log."""
        return None

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        """The object as the API shows it. `embed(child)` renders a child for nesting."""
        raise NotImplementedError
