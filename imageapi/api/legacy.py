"""Accept the request shapes of the original walkthrough (pre-0.1.x) as aliases.

The seed README's example interaction posts `{"id": N, "fs_type": ...}` to `/mount/rbd` and
`{"lower": [N]}` to `/mount/overlay`. The 0.1.x schema calls these `rbd_id` and generic
`mount` objects, and our schema is strict, so this middleware rewrites the old shapes into the
new ones before connexion validates the body:

- `POST /mount/rbd` with `id` but neither `rbd_id` nor `rbd`: `id` becomes `rbd_id`;
- `POST /mount/overlay` and `POST /mount`: every overlay `lower` item that is a bare integer
  N, at any depth, becomes `{"kind": kind_of(N), "mount_id": N}` (ids are global, so the kind
  is known; an unknown N becomes an overlay reference and the handler answers 404);
- `POST /container`: a `mount` of the form `{"id": N, "kind": K}` (no `mount_id`) becomes
  `{"kind": K, "mount_id": N}`, and bare-integer lowers of an inline `mount.overlay` are
  rewritten as above.

Any other body, and any body that is not JSON, is passed on byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from imageapi.api.middleware import MAX_BODY, operation_id, read_body, replay, with_body_headers

KindOf = Callable[[int], str | None]

# A bare lower id the registry does not know is sent on as an overlay reference: the
# handler then answers 404 for it, as for any unknown mount_id.
UNKNOWN_KIND = "overlay"


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LegacyShim:
    def __init__(self, app: ASGIApp, *, kind_of: KindOf) -> None:
        self.app = app
        self.kind_of = kind_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        op = operation_id(scope) if scope["type"] == "http" else None
        rewrite = self._rewriters().get(op or "") if scope.get("method") == "POST" else None
        if rewrite is None:
            await self.app(scope, receive, send)
            return
        raw, disconnected = await read_body(receive, MAX_BODY)
        new = self._rewrite(raw, rewrite)
        if new is None:
            await self.app(scope, replay(raw, receive, disconnected), send)
        else:
            scope = with_body_headers(scope, len(new))
            await self.app(scope, replay(new, receive, disconnected), send)

    def _rewriters(self) -> dict[str, Callable[[Any], bool]]:
        return {
            "mount_rbd": self.fix_mount_rbd,
            "mount_overlay": self.fix_mount_overlay,
            "mount": self.fix_mount,
            "create_container": self.fix_container,
        }

    @staticmethod
    def _rewrite(raw: bytes, rewrite: Callable[[Any], bool]) -> bytes | None:
        """The rewritten body, or None to pass the original bytes on untouched."""
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            return None  # not UTF-8 JSON: let the validator report it
        try:
            if not rewrite(body):
                return None
        except RecursionError:
            return None
        return json.dumps(body).encode()

    # Each fixer edits the parsed body in place and says whether it changed anything.

    def fix_mount_rbd(self, body: Any) -> bool:
        if isinstance(body, dict) and "id" in body and "rbd_id" not in body and "rbd" not in body:
            body["rbd_id"] = body.pop("id")
            return True
        return False

    def fix_mount_overlay(self, body: Any) -> bool:
        if not isinstance(body, dict) or not isinstance(body.get("lower"), list):
            return False
        changed = False
        lower: list[Any] = body["lower"]
        for i, item in enumerate(lower):
            if _is_id(item):
                lower[i] = {"kind": self._kind(item), "mount_id": item}
                changed = True
            else:
                changed = self.fix_mount(item) or changed
        return changed

    def fix_mount(self, body: Any) -> bool:
        if isinstance(body, dict) and isinstance(body.get("overlay"), dict):
            return self.fix_mount_overlay(body["overlay"])
        return False

    def fix_container(self, body: Any) -> bool:
        if not isinstance(body, dict) or not isinstance(body.get("mount"), dict):
            return False
        mount: dict[str, Any] = body["mount"]
        changed = False
        if _is_id(mount.get("id")) and "mount_id" not in mount:
            mount["mount_id"] = mount.pop("id")
            changed = True
        return self.fix_mount(mount) or changed

    def _kind(self, mount_id: int) -> str:
        # kind_of takes the registry's lock, which is never held across kernel calls, so
        # calling it from the event loop does not stall other requests.
        return self.kind_of(mount_id) or UNKNOWN_KIND
