"""Turn every failure into the contract's error body: `{"code": <status>, "message": <text>}`.

connexion answers with RFC 7807 problem documents (`type`/`title`/`detail`/`status`) and
starlette with plain text; clients of this API dereference `message` blindly, so every exception
that reaches connexion's ExceptionMiddleware (or, failing that, its ServerErrorMiddleware) goes
through `ErrorHandlers` instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from imageapi.errors import ApiError

log = logging.getLogger(__name__)

GENERIC_500 = "internal server error (see the server log)"


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> ConnexionResponse:
    return ConnexionResponse(
        status_code=status,
        mimetype="application/json",
        content_type="application/json",
        body=json.dumps({"code": status, "message": message}),
        headers=dict(headers or {}),
    )


INTEGER = re.compile(r"[+-]?[0-9]+")
VERBS = ("get", "put", "post", "delete", "options", "head", "patch")


@dataclass(frozen=True)
class Route:
    pattern: re.Pattern[str]  # the full path, one named group per path parameter
    methods: list[str]
    integers: frozenset[str]  # names of the integer path parameters


class RouteTable:
    """The paths of the spec, for what starlette's routing cannot say by itself.

    - `Allow` of a 405: connexion registers one starlette route per (path, method), and
      starlette reports only the methods of the first route whose path matched.
    - A path parameter that is not an integer (`/attach/rbd/abc`): connexion's routes only
      match digits there, so starlette answers 404, although the route exists and only the
      parameter is wrong. `bad_parameter` names it, for a 400.
    """

    def __init__(self, base_path: str, routes: Mapping[str, tuple[list[str], set[str]]]) -> None:
        self._routes: list[Route] = []
        for template, (methods, integers) in routes.items():
            escaped = re.escape(base_path.rstrip("/") + template)
            pattern = re.sub(r"\\\{([A-Za-z_][A-Za-z0-9_]*)\\\}", r"(?P<\1>[^/]+)", escaped)
            allowed = {m.upper() for m in methods}
            if "GET" in allowed:
                allowed.add("HEAD")  # starlette answers HEAD wherever GET is routed
            route = Route(re.compile(pattern + "/?"), sorted(allowed), frozenset(integers))
            self._routes.append(route)
        # Literal segments first, as starlette would prefer them.
        self._routes.sort(key=lambda r: r.pattern.pattern.count("(?P<"))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> RouteTable:
        shared = spec.get("parameters") or {}

        def resolve(param: Mapping[str, Any]) -> Mapping[str, Any]:
            ref = param.get("$ref", "")
            return shared.get(ref.rsplit("/", 1)[-1], {}) if ref else param

        routes: dict[str, tuple[list[str], set[str]]] = {}
        for template, item in (spec.get("paths") or {}).items():
            methods = [m for m in item if m in VERBS]
            params = [resolve(p) for p in item.get("parameters", [])]
            for method in methods:
                params += [resolve(p) for p in item[method].get("parameters", [])]
            integers = {p["name"] for p in params if p.get("in") == "path"
                        and p.get("type") == "integer"}  # fmt: skip
            routes[template] = (methods, integers)
        return cls(str(spec.get("basePath", "")), routes)

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self._routes:
            found = route.pattern.fullmatch(path)
            if found:
                return route, found.groupdict()
        return None

    def allowed(self, path: str) -> list[str] | None:
        found = self.match(path)
        return found[0].methods if found else None

    def bad_parameter(self, method: str, path: str) -> str | None:
        """Why the path parameters of a routable request are invalid, if they are."""
        found = self.match(path)
        if found is None or method.upper() not in found[0].methods:
            return None
        route, values = found
        for name, value in values.items():
            if name in route.integers and not INTEGER.fullmatch(value):
                return f"path parameter '{name}': {value!r} is not of type 'integer'"
        return None


class ErrorHandlers:
    """The functions registered with `AsyncApp.add_error_handler` (and the last-resort one).

    They are coroutines on purpose: connexion runs sync error handlers in the threadpool, which
    blocking kernel calls may have filled, and an error answer should never wait for those.
    """

    def __init__(self, routes: RouteTable) -> None:
        self.routes = routes

    async def api_error(self, request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        assert isinstance(exc, ApiError)
        # 4xx are the client's business; 5xx are the kernel refusing, which an operator
        # wants to see. Neither needs a traceback: the message says what failed.
        level = logging.ERROR if exc.status >= 500 else logging.INFO
        log.log(level, "%s %s -> %d: %s", request.method, _short(request.url.path), exc.status,
                exc.message)
        return error_response(exc.status, exc.message)

    async def http_error(self, request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        headers = dict(exc.headers or {})
        if isinstance(exc, ProblemException):
            message = str(exc.detail or exc.title or "error")
        elif status == 404 and (why := self.routes.bad_parameter(request.method, request.url.path)):
            status, message = 400, why
        elif status == 404:
            message = f"no such resource: {request.method} {_short(request.url.path)}"
        elif status == 405:
            allowed = self.routes.allowed(request.url.path)
            if allowed is not None:
                headers["Allow"] = ", ".join(allowed)
            message = (
                f"method {request.method} not allowed on {_short(request.url.path)}"
                f" (allowed: {headers.get('Allow', 'none')})"
            )
        else:
            message = str(exc.detail)
        if status >= 500:
            log.error("%s %s -> %d: %s", request.method, _short(request.url.path), status, message)
        else:
            log.info("%s %s -> %d: %s", request.method, _short(request.url.path), status, message)
        return error_response(status, message, headers)

    async def unexpected(self, request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        # A bug, not a client or kernel error: keep the details in the log, not on the wire.
        log.error(
            "%s %s: unhandled %s",
            request.method,
            _short(request.url.path),
            type(exc).__name__,
            exc_info=exc,
        )
        return error_response(500, GENERIC_500)

    async def last_resort(self, request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        # Used by the ServerErrorMiddleware, outside everything else. uvicorn logs the
        # traceback itself, since starlette re-raises after sending this response.
        return error_response(500, GENERIC_500)


def _short(path: str, limit: int = 200) -> str:
    """A path fit for a log line or a message: a client's 5,000-character path is not."""
    return path if len(path) <= limit else f"{path[:limit]}... ({len(path)} characters)"


class ShortArgs(logging.Filter):
    """Shortens long string arguments of a record (uvicorn's access log writes the request
    line whole: a client's 5,000-digit path would become a 5,000-character line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_short(a) if isinstance(a, str) else a for a in record.args)
        return True


def shorten_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ShortArgs) for f in access.filters):
        access.addFilter(ShortArgs())
