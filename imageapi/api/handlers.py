"""One method per operationId of swagger.yaml: translate the request, call the graph.

Handlers stay thin: the spec has already validated shapes, `imageapi.api.dialect` turns both
dialects' bodies into the registry's specs and renders its answers, the drivers check values,
and `ApiError`s raised below become `{"code", "message"}` responses in `imageapi.app`.

Reads are coroutines: they take the registry's lock for a few dictionary operations and never
wait for the kernel, so they run on the event loop, not in the thread pool that slow writes
fill. Writes run in the pool (connexion's default for plain functions). A container's delete
waits for its process to end on the event loop too, so a burst of deletes each waiting out a
stop timeout holds no thread while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from imageapi.api.dialect import (
    MOUNT_FILTER_02,
    V02,
    V1,
    NotImplementedHere,
    Parser,
    Views,
    mount_kinds_02,
)
from imageapi.drivers.base import Node
from imageapi.errors import BadRequest
from imageapi.runtime.lifecycle import KILL_GRACE
from imageapi.service import Service

log = logging.getLogger(__name__)

Body = dict[str, Any]
Reply = tuple[Any, int]

CONTAINER = ("container", "container")  # collection and kind of containers in the registry
CREATE_STATES = ("created", "running")  # what POST /container may ask for
TARGET_STATES = ("running", "exited")  # what GET /container/{id}/{state} may ask for
VIEWS = {V1: Views(V1), V02: Views(V02)}
SHOW_V1, SHOW_02 = VIEWS[V1], VIEWS[V02]


class Handlers:
    def __init__(self, service: Service) -> None:
        self.graph = service.registry
        self.stop_wait = service.settings.stop_timeout + KILL_GRACE

    def _parser(self) -> Parser:
        return Parser(self.graph.kind_of)

    # -- /attach/rbd ----------------------------------------------------------------------

    async def list_rbds(self) -> Reply:
        return self.graph.list("attach", "rbd"), 200

    def map_rbd(self, body: Body) -> Reply:
        return self.graph.create("attach", "rbd", body), 201

    async def get_rbd(self, id: int) -> Reply:
        return self.graph.get("attach", "rbd", id), 200

    def unmap_rbd(self, id: int) -> Reply:
        return self.graph.delete("attach", "rbd", id), 200

    # -- /attach/loopback -----------------------------------------------------------------

    async def list_loopbacks(self) -> Reply:
        return self.graph.list("attach", "loopback"), 200

    def attach_loopback(self, body: Body) -> Reply:
        return self.graph.create("attach", "loopback", body), 201

    async def get_loopback(self, id: int) -> Reply:
        return self.graph.get("attach", "loopback", id), 200

    def detach_loopback(self, id: int) -> Reply:
        return self.graph.delete("attach", "loopback", id), 200

    # -- /attach (0.2) --------------------------------------------------------------------

    async def list_attachments(self, id: int | None = None, kind: str | None = None) -> Reply:
        if id:
            found = self.graph.get("attach", None, id, SHOW_02.attach)
            return ([found] if kind in (None, found["kind"]) else []), 200
        return self.graph.list("attach", kind, SHOW_02.attach), 200

    def attach(self, body: Body) -> Reply:
        if body.get("id"):
            raise BadRequest("id refers to an existing attachment; POST /attach defines a new one")
        kind, spec = self._parser().attach(body, "body")
        return self.graph.create("attach", kind, spec, SHOW_02.attach), 201

    def delete_attach(self, id: int, force: bool = False) -> Reply:
        return self.graph.delete("attach", None, id, SHOW_02.attach, force=force), 200

    # -- /mount (generic, both dialects) --------------------------------------------------

    async def list_mounts(self, id: int | None = None, kind: str | None = None) -> Reply:
        if id:
            found = self.graph.get("mount", None, id, SHOW_02.mount)
            return ([found] if kind in (None, found["kind"]) else []), 200
        if kind is not None:
            return self.graph.list("mount", mount_kinds_02(kind), SHOW_02.mount), 200
        return self.graph.list("mount", None, SHOW_V1.mount), 200

    def mount(self, body: Body) -> Reply:
        for key in ("mount_id", "id"):
            if body.get(key):
                raise BadRequest(f"{key} refers to an existing mount; POST /mount defines a new "
                                 "one")
        kind = body["kind"]
        if kind not in ("nfs", "uri") and not isinstance(body.get(kind), dict):
            raise BadRequest(f"{kind}: the {kind} mount to create is required")
        parser = self._parser()
        kind, spec = parser.mount_definition(body, "body")
        return self.graph.create("mount", kind, spec, VIEWS[parser.dialect].mount), 201

    def unmount(self, body: Body | None = None, id: int | None = None,
                force: bool = False) -> Reply:
        if id:  # 0.2: DELETE /mount?id=N
            return self.graph.delete("mount", None, id, SHOW_02.mount, force=force), 200
        if not isinstance(body, dict):
            raise BadRequest("give the mount to unmount: ?id=N, or a mount object in the body")
        ref = body.get("mount_id") or body.get("id")
        if not ref:
            raise BadRequest("mount_id: required to name the mount to unmount")
        kind = body["kind"]
        named_02 = kind in ("attach", "nfs", "uri")  # `attach`: a mount of any attachment
        kinds = MOUNT_FILTER_02[kind] if named_02 else (kind,)
        views = SHOW_02 if named_02 or "id" in body else SHOW_V1
        return self.graph.delete("mount", kinds, ref, views.mount, force=force), 200

    # -- /mount/<kind> (v1) ---------------------------------------------------------------

    async def list_mounts_rbd(self) -> Reply:
        return self.graph.list("mount", "rbd", SHOW_V1.specific), 200

    def mount_rbd(self, body: Body) -> Reply:
        return self._mount_device("rbd", body), 201

    async def get_mount_rbd(self, id: int) -> Reply:
        return self.graph.get("mount", "rbd", id, SHOW_V1.specific), 200

    def unmount_rbd(self, id: int) -> Reply:
        return self.graph.delete("mount", "rbd", id, SHOW_V1.specific), 200

    async def list_mounts_loopback(self) -> Reply:
        return self.graph.list("mount", "loopback", SHOW_V1.specific), 200

    def mount_loopback(self, body: Body) -> Reply:
        return self._mount_device("loopback", body), 201

    async def get_mount_loopback(self, id: int) -> Reply:
        return self.graph.get("mount", "loopback", id, SHOW_V1.specific), 200

    def unmount_loopback(self, id: int) -> Reply:
        return self.graph.delete("mount", "loopback", id, SHOW_V1.specific), 200

    def _mount_device(self, kind: str, body: Body) -> Any:
        spec = self._parser().device_mount(kind, body, "body")
        return self.graph.create("mount", kind, spec, SHOW_V1.specific)

    async def list_mounts_bind(self) -> Reply:
        return self.graph.list("mount", "bind", SHOW_V1.specific), 200

    def mount_bind(self, body: Body) -> Reply:
        spec = self._parser().bind(body, "body")
        return self.graph.create("mount", "bind", spec, SHOW_V1.specific), 201

    async def get_mount_bind(self, id: int) -> Reply:
        return self.graph.get("mount", "bind", id, SHOW_V1.specific), 200

    def unmount_bind(self, id: int) -> Reply:
        return self.graph.delete("mount", "bind", id, SHOW_V1.specific), 200

    async def list_mounts_overlay(self) -> Reply:
        return self.graph.list("mount", "overlay", SHOW_V1.specific), 200

    def mount_overlay(self, body: Body) -> Reply:
        spec = self._parser().overlay(body, "body")
        return self.graph.create("mount", "overlay", spec, SHOW_V1.specific), 201

    async def get_mount_overlay(self, id: int) -> Reply:
        return self.graph.get("mount", "overlay", id, SHOW_V1.specific), 200

    def unmount_overlay(self, id: int) -> Reply:
        return self.graph.delete("mount", "overlay", id, SHOW_V1.specific), 200

    # -- /container -----------------------------------------------------------------------

    async def list_containers(self, id: int | None = None, name: str | None = None,
                              state: str | None = None) -> Reply:
        if not (id or name or state):
            return self.graph.list(*CONTAINER, render=SHOW_V1.container), 200
        if id or name:
            found = self.graph.get(*CONTAINER, self._pick(id, name), SHOW_02.container)
            return ([found] if state in (None, found["state"]) else []), 200
        return self.graph.list(*CONTAINER, render=SHOW_02.container,
                               where=lambda n: _state(n) == state), 200

    def create_container(self, body: Body) -> Reply:
        state = body.get("state", "created")
        if state not in CREATE_STATES:
            raise BadRequest(
                f"state: a new container can only be 'created' or 'running', not {state!r}"
            )
        parser = self._parser()
        spec = parser.container(body)
        # With "state": "running" the graph builds and starts it as one operation: a start
        # that fails leaves nothing behind, inline mounts included.
        return self.graph.create(*CONTAINER, spec, VIEWS[parser.dialect].container), 201

    async def get_container(self, id: int) -> Reply:
        return self.graph.get(*CONTAINER, id, SHOW_V1.container), 200

    async def delete_container(self, id: int) -> Reply:
        return await self._delete_container(id, False, SHOW_V1), 200

    def set_container_state(self, id: int, state: str) -> Reply:
        _check_target(state)
        return self.graph.change(*CONTAINER, id, state, SHOW_V1.container), 200

    # -- /container/byname ----------------------------------------------------------------

    async def get_container_byname(self, name: str) -> Reply:
        return await self.get_container(self._container_id(name))

    async def delete_container_byname(self, name: str) -> Reply:
        return await self.delete_container(self._container_id(name))

    def set_container_state_byname(self, name: str, state: str) -> Reply:
        _check_target(state)  # before the lookup: a bad request is a 400, not a 404
        return self.set_container_state(self._container_id(name), state)

    def _container_id(self, name: str) -> int:
        return self.graph.find_name(*CONTAINER, name)

    # -- /container?id=|name= (0.2) -------------------------------------------------------

    async def delete_container_by_query(self, id: int | None = None, name: str | None = None,
                                        force: bool = False) -> Reply:
        return await self._delete_container(self._pick(id, name), force, SHOW_02), 200

    def set_container_state_by_query(self, state: str, id: int | None = None,
                                     name: str | None = None) -> Reply:
        if state == "paused":
            raise NotImplementedHere("pausing a container is not implemented (0.2 named the "
                                     "state, and no server implemented it)")
        _check_target(state)
        return self.graph.change(*CONTAINER, self._pick(id, name), state,
                                 SHOW_02.container), 200

    def _pick(self, id: int | None, name: str | None) -> int:
        """The container a 0.2 query names, by `id` or `name` (both: they must agree)."""
        if not id and not name:
            raise BadRequest("give id or name (query parameters) to name the container")
        if not name:
            assert id is not None
            return id
        found = self._container_id(name)
        if id and id != found:
            raise BadRequest(f"id {id} and name {name!r} name different containers")
        return found

    async def _delete_container(self, cid: int, force: bool, views: Views) -> Any:
        """Stop it first if it runs (force: SIGKILL instead of the stop signal), waiting for
        its end here, on the event loop; the teardown itself runs in the pool."""
        node = self.graph.node(*CONTAINER, cid)
        if not force and _state(node) in ("running", "stopping"):
            await run_in_threadpool(self.graph.change, *CONTAINER, cid, "exited")
            await _ended(node, time.monotonic() + self.stop_wait)
        return await run_in_threadpool(self.graph.delete, *CONTAINER, cid, views.container,
                                       force)


def _state(node: Node) -> str | None:
    container = node.live.get("container")
    return container.state if container is not None else None


async def _ended(node: Node, deadline: float) -> None:
    """Until the container's process has ended (or the deadline: the delete then waits on its
    own, and says so if it never ends)."""
    delay = 0.005
    while _state(node) in ("running", "stopping") and time.monotonic() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _check_target(state: str) -> None:
    # The spec's enum already refuses other values; this holds for any caller.
    if state not in TARGET_STATES:
        raise BadRequest(f"state: can be set to 'running' or 'exited', not {state!r}")

