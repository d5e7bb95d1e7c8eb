"""One method per operationId of swagger.yaml: translate the request, call the graph.

Handlers stay thin: the spec has already validated shapes, the drivers check values, and
`ApiError`s raised below become `{"code", "message"}` responses in `imageapi.app`.
"""

from __future__ import annotations

import logging
from typing import Any

from imageapi.errors import BadRequest
from imageapi.service import Service

log = logging.getLogger(__name__)

Body = dict[str, Any]
Reply = tuple[Any, int]

CONTAINER = ("container", "container")  # collection and kind of containers in the registry
CREATE_STATES = ("created", "running")  # what POST /container may ask for
TARGET_STATES = ("running", "exited")  # what GET /container/{id}/{state} may ask for


class Handlers:
    def __init__(self, service: Service) -> None:
        self.graph = service.registry

    # -- /attach/rbd ----------------------------------------------------------------------

    def list_rbds(self) -> Reply:
        return self.graph.list("attach", "rbd"), 200

    def map_rbd(self, body: Body) -> Reply:
        return self.graph.create("attach", "rbd", body), 201

    def get_rbd(self, id: int) -> Reply:
        return self.graph.get("attach", "rbd", id), 200

    def unmap_rbd(self, id: int) -> Reply:
        return self.graph.delete("attach", "rbd", id), 200

    # -- /attach/loopback -----------------------------------------------------------------

    def list_loopbacks(self) -> Reply:
        return self.graph.list("attach", "loopback"), 200

    def attach_loopback(self, body: Body) -> Reply:
        return self.graph.create("attach", "loopback", body), 201

    def get_loopback(self, id: int) -> Reply:
        return self.graph.get("attach", "loopback", id), 200

    def detach_loopback(self, id: int) -> Reply:
        return self.graph.delete("attach", "loopback", id), 200

    # -- /mount (generic) -----------------------------------------------------------------

    def list_mounts(self) -> Reply:
        return self.graph.list("mount"), 200

    def mount(self, body: Body) -> Reply:
        kind = body["kind"]
        if body.get("mount_id"):
            raise BadRequest("mount_id refers to an existing mount; POST /mount defines a new one")
        definition = body.get(kind)
        if not isinstance(definition, dict):
            raise BadRequest(f"{kind}: the {kind} mount to create is required")
        view = self.graph.create("mount", kind, definition)
        return {"kind": kind, "mount_id": view["id"], kind: view}, 201

    def unmount(self, body: Body) -> Reply:
        if not body.get("mount_id"):
            raise BadRequest("mount_id: required to name the mount to unmount")
        kind = body["kind"]
        view = self.graph.delete("mount", kind, body["mount_id"])
        return {"kind": kind, "mount_id": view["id"], kind: view}, 200

    # -- /mount/rbd -----------------------------------------------------------------------

    def list_mounts_rbd(self) -> Reply:
        return self.graph.list("mount", "rbd"), 200

    def mount_rbd(self, body: Body) -> Reply:
        return self.graph.create("mount", "rbd", body), 201

    def get_mount_rbd(self, id: int) -> Reply:
        return self.graph.get("mount", "rbd", id), 200

    def unmount_rbd(self, id: int) -> Reply:
        return self.graph.delete("mount", "rbd", id), 200

    # -- /mount/loopback ------------------------------------------------------------------

    def list_mounts_loopback(self) -> Reply:
        return self.graph.list("mount", "loopback"), 200

    def mount_loopback(self, body: Body) -> Reply:
        return self.graph.create("mount", "loopback", body), 201

    def get_mount_loopback(self, id: int) -> Reply:
        return self.graph.get("mount", "loopback", id), 200

    def unmount_loopback(self, id: int) -> Reply:
        return self.graph.delete("mount", "loopback", id), 200

    # -- /mount/bind ----------------------------------------------------------------------

    def list_mounts_bind(self) -> Reply:
        return self.graph.list("mount", "bind"), 200

    def mount_bind(self, body: Body) -> Reply:
        return self.graph.create("mount", "bind", body), 201

    def get_mount_bind(self, id: int) -> Reply:
        return self.graph.get("mount", "bind", id), 200

    def unmount_bind(self, id: int) -> Reply:
        return self.graph.delete("mount", "bind", id), 200

    # -- /mount/overlay -------------------------------------------------------------------

    def list_mounts_overlay(self) -> Reply:
        return self.graph.list("mount", "overlay"), 200

    def mount_overlay(self, body: Body) -> Reply:
        return self.graph.create("mount", "overlay", body), 201

    def get_mount_overlay(self, id: int) -> Reply:
        return self.graph.get("mount", "overlay", id), 200

    def unmount_overlay(self, id: int) -> Reply:
        return self.graph.delete("mount", "overlay", id), 200

    # -- /container -----------------------------------------------------------------------

    def list_containers(self) -> Reply:
        return self.graph.list(*CONTAINER), 200

    def create_container(self, body: Body) -> Reply:
        state = body.get("state", "created")
        if state not in CREATE_STATES:
            raise BadRequest(
                f"state: a new container can only be 'created' or 'running', not {state!r}"
            )
        # With "state": "running" the graph builds and starts it as one operation: a start
        # that fails leaves nothing behind, inline mounts included.
        return self.graph.create(*CONTAINER, body), 201

    def get_container(self, id: int) -> Reply:
        return self.graph.get(*CONTAINER, id), 200

    def delete_container(self, id: int) -> Reply:
        return self.graph.delete(*CONTAINER, id), 200

    def set_container_state(self, id: int, state: str) -> Reply:
        _check_target(state)
        return self.graph.change(*CONTAINER, id, state), 200

    # -- /container/byname ----------------------------------------------------------------

    def get_container_byname(self, name: str) -> Reply:
        return self.get_container(self._container_id(name))

    def delete_container_byname(self, name: str) -> Reply:
        return self.delete_container(self._container_id(name))

    def set_container_state_byname(self, name: str, state: str) -> Reply:
        _check_target(state)  # before the lookup: a bad request is a 400, not a 404
        return self.set_container_state(self._container_id(name), state)

    def _container_id(self, name: str) -> int:
        return self.graph.find_name(*CONTAINER, name)


def _check_target(state: str) -> None:
    # The spec's enum already refuses other values; this holds for any caller.
    if state not in TARGET_STATES:
        raise BadRequest(f"state: can be set to 'running' or 'exited', not {state!r}")
