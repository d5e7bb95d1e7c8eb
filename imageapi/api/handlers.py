"""One method per operationId of swagger.yaml: translate the request, call the graph.

Handlers stay thin: the spec has already validated shapes, the drivers check values, and
`ApiError`s raised below become `{"code", "message"}` responses in `imageapi.app`.
"""

from __future__ import annotations

from typing import Any

from imageapi.errors import BadRequest
from imageapi.service import Service

Body = dict[str, Any]
Reply = tuple[Any, int]


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

    # -- /mount/overlay -------------------------------------------------------------------

    def list_mounts_overlay(self) -> Reply:
        return self.graph.list("mount", "overlay"), 200

    def mount_overlay(self, body: Body) -> Reply:
        return self.graph.create("mount", "overlay", body), 201

    def get_mount_overlay(self, id: int) -> Reply:
        return self.graph.get("mount", "overlay", id), 200

    def unmount_overlay(self, id: int) -> Reply:
        return self.graph.delete("mount", "overlay", id), 200
