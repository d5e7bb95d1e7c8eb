"""The ASGI application: swagger.yaml routed onto a `Handlers` object by connexion 3.

`create_app` holds no module-level state: every app gets its own service, handlers, resolver
and error handlers, so one process (or one test) can hold several.

Request path through the middleware stack (outermost first), one explicit list:

    ServerErrorMiddleware   last resort: anything escaping below is a generic JSON 500
    ExceptionMiddleware     ApiError, connexion problems, starlette 404/405, bugs -> JSON errors
    StaticDocument          /imageapi/v1/swagger.json (the spec as written)
    IdGuard                 all-digit path segments too long to be an id: 400 before routing
    LeanSwaggerUI           /imageapi/v1/ui/ (other paths pass straight on)
    IndexedRouting          path + method -> operationId (paths without parameters by a dict)
    BodyGuard               chunked bodies, missing Content-Type, size limit
    LegacyShim              old request shapes of the seed walkthrough -> 0.1.x shapes
    RequestValidation       parameters and JSON body against the spec (our validators)
    ResponseValidation      only if asked for (tests); never in production
    Context                 connexion's per-request context (its decorators read it)
    IndexedASGIApp          calls the handler: coroutines (reads) on the event loop, plain
                            functions (writes) in the threadpool

Left out of connexion's default stack, because this API does not use them: its
SecurityMiddleware (the spec has no security schemes: access control is the listener's, see
README "Security") and its LifespanMiddleware (no startup or shutdown hooks: the innermost
router answers uvicorn's lifespan messages itself). Each layer costs every request.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from collections.abc import Callable
from importlib import resources
from typing import Any

import yaml
from connexion import AsyncApp
from connexion.exceptions import ProblemException
from connexion.middleware.context import ContextMiddleware
from connexion.middleware.exceptions import ExceptionMiddleware
from connexion.middleware.request_validation import RequestValidationMiddleware
from connexion.middleware.response_validation import ResponseValidationMiddleware
from connexion.middleware.server_error import ServerErrorMiddleware
from connexion.options import SwaggerUIOptions
from connexion.resolver import Resolver
from starlette.exceptions import HTTPException

from imageapi.api.dialect import v1_kind
from imageapi.api.error_handlers import ErrorHandlers, RouteTable, shorten_access_log
from imageapi.api.legacy import LegacyShim
from imageapi.api.middleware import (
    BodyGuard,
    IdGuard,
    IndexedASGIApp,
    IndexedRouting,
    LeanSwaggerUI,
    StaticDocument,
)
from imageapi.api.validation import validator_map
from imageapi.config import Settings
from imageapi.errors import ApiError

SPEC_RESOURCE = "swagger.yaml"
SPEC_PATH = "/swagger.json"  # under the base path


def load_spec() -> dict[str, Any]:
    """The API document shipped inside the package (a symlink to the repository's copy)."""
    text = resources.files("imageapi").joinpath(SPEC_RESOURCE).read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    assert isinstance(spec, dict)
    return spec


def create_app(
    settings: Settings,
    service: Any = None,
    handlers: Any = None,
    *,
    kind_of: Callable[[int], str | None] | None = None,
    validate_responses: bool = False,
) -> AsyncApp:
    """Build the app for one service.

    `service` defaults to `imageapi.service.Service(settings)`, `handlers` to
    `imageapi.api.handlers.Handlers(service)`; tests pass stand-ins. `kind_of` (the kind of a
    mount id, for the legacy shim) defaults to `service.registry.kind_of`.
    """
    if service is None and handlers is None:
        from imageapi.service import Service  # imported late: it pulls in drivers and kernel

        service = Service(settings)
    if handlers is None:
        from imageapi.api.handlers import Handlers

        handlers = Handlers(service)
    if kind_of is None:
        registry = getattr(service, "registry", None)
        registry_kind_of = getattr(registry, "kind_of", None)
        if registry_kind_of is None:
            kind_of = _no_kinds
        else:
            # v1's wire name of the kind (a mount of a local device is `attach` there).
            def kind_of(mount_id: int) -> str | None:
                return v1_kind(registry_kind_of(mount_id))

    spec = load_spec()
    errors = ErrorHandlers(RouteTable.from_spec(spec))
    shorten_access_log()

    assert not spec.get("securityDefinitions"), "SecurityMiddleware is left out of the stack"
    middlewares: list[Any] = [
        # Our JSON body instead of the outermost middleware's plain-text/problem 500.
        functools.partial(ServerErrorMiddleware, handler=errors.last_resort),
        ExceptionMiddleware,
        functools.partial(
            StaticDocument,
            path=str(spec["basePath"]).rstrip("/") + SPEC_PATH,
            body=json.dumps(spec, indent=2).encode(),
            media_type="application/json",
        ),
        IdGuard,
        LeanSwaggerUI,
        IndexedRouting,
        # BodyGuard wraps LegacyShim: the shim sees complete, typed bodies.
        BodyGuard,
        functools.partial(LegacyShim, kind_of=kind_of),
        RequestValidationMiddleware,
        *([ResponseValidationMiddleware] if validate_responses else []),
        ContextMiddleware,
    ]
    app = AsyncApp(__name__, middlewares=middlewares)
    # The innermost app routes again to call the operation: indexed like the routing above.
    # Swapped in before anything is built (connexion builds the stack on the first request).
    inner = IndexedASGIApp()
    app.middleware.app = app._middleware_app = inner
    app.add_api(
        copy.deepcopy(spec),  # connexion edits what it is given
        # The operationId is the method name; a missing method fails at startup, not per request.
        resolver=Resolver(function_resolver=lambda operation_id: with_signature(
            getattr(handlers, operation_id))),
        validator_map=validator_map(),
        validate_responses=validate_responses,
        # The UI comes from connexion; the spec it loads is served by StaticDocument below.
        swagger_ui_options=SwaggerUIOptions(
            serve_spec=False, spec_path=SPEC_PATH, swagger_ui=True, swagger_ui_path="/ui"
        ),
    )

    # starlette picks the handler along the exception's MRO. ProblemException must be named
    # although it is an HTTPException: connexion registers its own problem+json handler for it.
    app.add_error_handler(ApiError, errors.api_error)
    app.add_error_handler(ProblemException, errors.http_error)
    app.add_error_handler(HTTPException, errors.http_error)
    app.add_error_handler(Exception, errors.unexpected)
    return app


def with_signature(handler: Callable[..., Any]) -> Callable[..., Any]:
    """`handler` as a function that carries its signature.

    connexion asks `inspect.signature` for the handler's parameters on every request, and for a
    bound method that is built anew each time (a fifth of a small read's time). A function with
    `__signature__` set is answered at once. Coroutines stay coroutines: connexion calls those
    on the event loop and plain functions in its thread pool.
    """
    signature = inspect.signature(handler)
    if inspect.iscoroutinefunction(handler):

        async def call_async(*args: Any, **kwargs: Any) -> Any:
            return await handler(*args, **kwargs)

        call: Any = call_async
    else:

        def call_sync(*args: Any, **kwargs: Any) -> Any:
            return handler(*args, **kwargs)

        call = call_sync
    call.__name__ = call.__qualname__ = getattr(handler, "__name__", "handler")
    call.__signature__ = signature
    return call


def _no_kinds(_mount_id: int) -> str | None:
    return None
