"""The one small interface every kind of object implements.

A driver knows how to check a spec, which other objects it stands on, how to build itself
in the kernel and how to tear itself down. The object graph (`imageapi.graph`) does the rest:
ids, references, ownership, locking, rollback. A new kind of attachment or mount is one new
module with one `Driver` subclass, listed in `imageapi.service`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from imageapi.errors import BadRequest

Spec = dict[str, Any]
State = dict[str, Any]


@dataclass(frozen=True)
class Need:
    """One object a spec stands on: a reference by id, or a definition to build and own.

    `slot` names where it came from (e.g. `rbd`, `lower[1]`) for error messages and for
    rendering; `kind` is the driver kind wanted, or None when the spec leaves the kind to
    whatever the referenced id is (never the case in v1, where references carry a kind).
    """

    slot: str
    collection: str
    kind: str
    ref: int | None = None
    spec: Spec | None = None


@dataclass
class Node:
    """One object of the graph. Fields other than `state`/`refs`/`status` never change."""

    id: int
    collection: str
    kind: str
    spec: Spec
    needs: list[tuple[Need, Node]]
    state: State
    refs: int = 1
    api_held: bool = True
    owner: int | None = None
    status: str = "ready"  # ready | destroying
    claim: Hashable | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def owns(self, child: Node) -> bool:
        return child.owner == self.id


class Driver:
    collection: ClassVar[str]  # "attach" or "mount"
    kind: ClassVar[str]  # "rbd", "overlay", ...
    noun: ClassVar[str]  # for messages: "rbd", "rbd mount", "overlay mount"
    claimed_as: ClassVar[str] = "in use"  # "<claim> is already <claimed_as> by rbd 3"
    shows_refs: ClassVar[bool] = True  # nothing stands on a container: it has no `refs`

    # Set by the registry: report a change the object made on its own (durable state hooks here).
    on_change: Callable[[Node, str], None] = staticmethod(lambda node, event: None)

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

    def destroy(self, node: Node) -> None:
        """Undo `build`; the graph lock is NOT held. Raises if the kernel refuses (e.g. busy)."""
        raise NotImplementedError

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        """The object as the API shows it. `embed(child)` renders a child for nesting."""
        raise NotImplementedError
