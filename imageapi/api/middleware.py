"""ASGI helpers for middlewares that look at request bodies before connexion validates them,
and the parts of connexion's stack made lean (routing by index, the UI asked only for its own
paths)."""

from __future__ import annotations

from collections.abc import Mapping
from email.message import Message as MimeHeader
from typing import Any

from connexion.apps.asynchronous import AsyncASGIApp
from connexion.exceptions import UnsupportedMediaTypeProblem
from connexion.middleware.routing import RoutingMiddleware
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from starlette._utils import get_route_path
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Requests of this API are small JSON documents; a larger body is a mistake or an attack.
MAX_BODY = 1 << 20
# An all-digit path segment longer than this is neither an id (int64: 19 digits) nor a name
# (at most 64 characters).
MAX_DIGITS = 64


def operation_id(scope: Scope) -> str | None:
    """The operationId connexion's routing middleware attached to the scope, if any."""
    routing: Mapping[str, Any] = scope.get("extensions", {}).get("connexion_routing", {})
    return routing.get("operation_id")


async def read_body(receive: Receive, limit: int = MAX_BODY) -> tuple[bytes, bool]:
    """The whole request body, and whether the client disconnected while sending it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def replay(body: bytes, receive: Receive, disconnected: bool = False) -> Receive:
    """A receive channel that yields `body` once, then defers to the real channel."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()

    return receive_again


def with_body_headers(scope: Scope, length: int, content_type: str | None = None) -> Scope:
    """A copy of `scope` whose Content-Length (and optionally Content-Type) match a new body."""
    new_scope = dict(scope)
    new_scope["headers"] = list(scope["headers"])
    headers = MutableHeaders(scope=new_scope)
    headers["content-length"] = str(length)
    if "transfer-encoding" in headers:
        del headers["transfer-encoding"]
    if content_type is not None:
        headers["content-type"] = content_type
    return new_scope


class BodyGuard:
    """Make request bodies digestible for connexion's validator and the handlers.

    - A chunked body has no Content-Length, and connexion 3.3 then treats the request as
      having no body at all ("RequestBody is required"): buffer it and set the length.
    - Without a Content-Type, connexion validates the body as JSON but hands the handler raw
      bytes: default it to application/json, the only type this API consumes.
    - A charset other than UTF-8 is a 415: connexion ignores `; charset=...` (it only sees the
      parameter when no space precedes it) and the handlers parse bytes as UTF-8 JSON anyway.
    - Refuse bodies over `MAX_BODY` with a 413 instead of buffering them.
    """

    def __init__(self, app: ASGIApp, *, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or operation_id(scope) is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        content_type = None if "content-type" in headers else "application/json"
        charset = _charset(headers.get("content-type"))
        if charset not in (None, "utf-8", "utf8"):
            raise UnsupportedMediaTypeProblem(
                detail=f"unsupported charset {charset!r}: request bodies must be UTF-8 JSON"
            )
        length_header = headers.get("content-length")
        if length_header is not None:
            try:
                length = int(length_header)
            except ValueError:
                raise HTTPException(400, "invalid Content-Length") from None
            if length > self.limit:
                raise HTTPException(413, f"request body larger than {self.limit} bytes")
            if content_type is not None and length > 0:
                scope = with_body_headers(scope, length, content_type)
            await self.app(scope, receive, send)
            return
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)
            return
        body, disconnected = await read_body(receive, self.limit)
        scope = with_body_headers(scope, len(body), content_type if body else None)
        await self.app(scope, replay(body, receive, disconnected), send)


def _charset(content_type: str | None) -> str | None:
    if not content_type:
        return None
    header = MimeHeader()
    header["content-type"] = content_type
    return header.get_content_charset()


class IdGuard:
    """Refuse an all-digit path segment too long to be an id or a name, before routing: the
    router converts `{id}` with int(), which raises (a 500) past 4,300 digits, and costs time
    quadratic in the length below that."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for segment in scope["path"].split("/"):
                if len(segment) > MAX_DIGITS and segment.isdigit():
                    raise HTTPException(
                        400, f"id: a number of {len(segment)} digits is not an id "
                        "(ids are positive 64-bit integers)"
                    )
        await self.app(scope, receive, send)


class StaticDocument:
    """Serve one fixed document at one path (GET and HEAD), pass everything else on.

    Used for swagger.json: connexion 3.3 serves the spec with its `$ref`s resolved in place,
    and the recursive definitions of this API (a mount holds an overlay holds mounts) make that
    a cyclic structure it cannot serialise (a 500). The document served here is the spec as
    written.
    """

    def __init__(self, app: ASGIApp, *, path: str, body: bytes, media_type: str) -> None:
        self.app = app
        self.path = path
        self.body = body
        self.media_type = media_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(405, headers={"Allow": "GET, HEAD"})
        headers = [
            (b"content-type", self.media_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else self.body
        await send({"type": "http.response.body", "body": body})


def index_literal_routes(router: Router) -> None:
    """Route requests for paths without parameters by one dict lookup.

    starlette tries a router's routes in order, a regex match each; with every path of both
    dialects that is some 50 matches for `GET /container`, twice (connexion routes once to
    find the operation and once to call it). A path without parameters is now looked up
    directly; anything else (parameters, a wrong method's 405, redirects) takes the router's
    own way, unchanged. The spec's templates never overlap a literal path (tests/test_spec).
    """
    literal: dict[str, list[Route]] = {}
    for route in router.routes:
        if isinstance(route, Route) and not route.param_convertors:
            literal.setdefault(route.path, []).append(route)
    fallback = router.middleware_stack

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in literal.get(get_route_path(scope), ()):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", router)
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await fallback(scope, receive, send)

    router.middleware_stack = app


class IndexedRouting(RoutingMiddleware):
    """connexion's routing middleware, with each API's routes indexed (see above)."""

    def add_api(self, specification: Any, base_path: str | None = None,
                arguments: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().add_api(specification, base_path=base_path, arguments=arguments, **kwargs)
        mount = self.router.routes[-1]
        assert isinstance(mount, Mount) and isinstance(mount.app, Router)
        index_literal_routes(mount.app)


class IndexedASGIApp(AsyncASGIApp):
    """connexion's innermost app (it routes again, to call the operation), indexed too."""

    def add_api(self, *args: Any, **kwargs: Any) -> Any:
        api = super().add_api(*args, **kwargs)
        index_literal_routes(api.router)
        return api


class LeanSwaggerUI(SwaggerUIMiddleware):
    """SwaggerUI, asked only for its own paths: connexion's routes every request through the
    UI's router first, with a copy of the scope, to find that most are not for it."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.prefixes: tuple[str, ...] = ()

    def add_api(self, specification: Any, base_path: str | None = None,
                arguments: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().add_api(specification, base_path=base_path, arguments=arguments, **kwargs)
        mount = self.router.routes[-1]
        assert isinstance(mount, Mount)
        options = kwargs.get("swagger_ui_options")
        ui = getattr(options, "swagger_ui_path", "/ui") if options else "/ui"
        self.prefixes += (mount.path.rstrip("/") + ui,)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            await super().__call__(scope, receive, send)
        else:
            await self.app(scope, receive, send)
