"""The HTTP layer in-process, with stand-in handlers: error mapping, validation, the legacy shim.

These run without privileges and without the real service; `test_http_layer.py` drives the
real server process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from connexion.middleware import MiddlewarePosition

from imageapi.api.legacy import LegacyShim
from imageapi.app import create_app
from imageapi.config import Settings
from imageapi.errors import BadRequest, Conflict, NotFound, SystemFault

BASE = "http://imageapi.test/imageapi/v1"
SECRET = "AQBaVtRgAAAAABAA7d2vKtXqRk+Cb9Vmq/lmqQ=="
RBD = {"monitors": ["10.0.0.1"], "pool": "rbd", "image": "img"}


class FakeHandlers:
    """Answers every operationId; `behaviour[op]` may replace the default echo."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.behaviour: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_"):
            raise AttributeError(op)

        def handler(**kwargs: Any) -> Any:
            self.calls.append((op, kwargs))
            if op in self.behaviour:
                return self.behaviour[op](**kwargs)
            status = 201 if op in ("map_rbd", "mount", "mount_rbd", "mount_overlay") else 200
            return {"op": op, **kwargs}, status

        return handler


def request(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def make(kinds: dict[int, str] | None = None, **kw: Any) -> tuple[Any, FakeHandlers]:
    fake = FakeHandlers()
    kinds = kinds or {}
    app = create_app(Settings(), handlers=fake, kind_of=kinds.get, **kw)
    return app, fake


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == status, body
    for fragment in fragments:
        assert fragment in body["message"], body
    return body["message"]


@pytest.mark.parametrize(
    ("exc", "status"),
    [(BadRequest("bad"), 400), (NotFound("gone"), 404), (Conflict("busy"), 409),
     (SystemFault("EIO: map: Input/output error"), 500)],
)  # fmt: skip
def test_api_errors_keep_their_status_and_message(exc: Exception, status: int) -> None:
    app, fake = make()

    def fail(**_: Any) -> Any:
        raise exc

    fake.behaviour["get_rbd"] = fail
    assert_error(request(app, "GET", "/attach/rbd/7"), status, str(exc))
    assert fake.calls == [("get_rbd", {"id": 7})]


def test_unexpected_exception_is_a_generic_logged_500(caplog: pytest.LogCaptureFixture) -> None:
    app, fake = make()

    def crash(**_: Any) -> Any:
        raise RuntimeError("internal detail /etc/shadow")

    fake.behaviour["list_rbds"] = crash
    with caplog.at_level(logging.ERROR):
        message = assert_error(request(app, "GET", "/attach/rbd"), 500)
    assert "shadow" not in message
    assert any(r.exc_info and "shadow" in str(r.exc_info[1]) for r in caplog.records)


def test_success_statuses_and_parameters() -> None:
    app, _ = make()
    r = request(app, "POST", "/attach/rbd", json=RBD)
    assert r.status_code == 201 and r.json() == {"op": "map_rbd", "body": RBD}
    r = request(app, "DELETE", "/mount/overlay/3")
    assert r.status_code == 200 and r.json() == {"op": "unmount_overlay", "id": 3}
    r = request(app, "DELETE", "/mount", json={"kind": "rbd", "mount_id": 4})
    assert r.json() == {"op": "unmount", "body": {"kind": "rbd", "mount_id": 4}}


@pytest.mark.parametrize(
    ("path", "allow"),
    [("/attach/rbd", "GET, HEAD, POST"), ("/attach/rbd/1", "DELETE, GET, HEAD"),
     ("/mount", "DELETE, GET, HEAD, POST"), ("/mount/rbd", "GET, HEAD, POST"),
     ("/mount/rbd/1", "DELETE, GET, HEAD"), ("/mount/overlay", "GET, HEAD, POST"),
     ("/mount/overlay/1", "DELETE, GET, HEAD"), ("/swagger.json", "GET, HEAD")],
)  # fmt: skip
def test_wrong_method_is_405_listing_every_method(path: str, allow: str) -> None:
    app, fake = make()
    r = request(app, "PUT", path, json={})
    assert_error(r, 405, "PUT")
    assert r.headers["allow"] == allow
    assert not fake.calls


@pytest.mark.parametrize(
    ("path", "body", "fragments"),
    [
        ("/attach/rbd", {"pool": "p", "image": "i"}, ["body", "'monitors' is a required"]),
        ("/attach/rbd", {**RBD, "monitors": ["1.2.3"]}, ["body.monitors[0]", "ipv4"]),
        ("/attach/rbd", {**RBD, "options": {"rro": True}}, ["body.options", "'rro'"]),
        ("/attach/rbd", {**RBD, "options": {"ro": "yes"}}, ["body.options.ro", "boolean"]),
        ("/attach/rbd", {**RBD, "pool": "a b"}, ["body.pool", "does not match"]),
        ("/mount/rbd", {"fs_type": "ext4", "mount_options": ["ro,rw"]}, ["mount_options[0]"]),
        ("/mount/rbd", {"fs_type": "ext4", "mount_options": ["ro", "a b"]}, ["mount_options[1]"]),
        ("/mount", {"kind": "disk"}, ["body.kind", "'disk' is not one of"]),
        ("/mount/overlay", {"lower": []}, ["body.lower", "non-empty"]),
        ("/mount/overlay", {"lower": [{"kind": "rbd", "mount_id": -1}]}, ["lower[0].mount_id"]),
        ("/mount/overlay", ["lower"], ["body", "not of type 'object'"]),
    ],
)
def test_schema_violations_name_the_field(path: str, body: Any, fragments: list[str]) -> None:
    app, fake = make()
    assert_error(request(app, "POST", path, json=body), 400, *fragments)
    assert not fake.calls


def test_a_secret_is_never_echoed(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = make()
    bad = SECRET + " x"
    with caplog.at_level(logging.DEBUG):
        message = assert_error(
            request(app, "POST", "/attach/rbd", json={**RBD, "options": {"secret": bad}}),
            400,
            "body.options.secret",
        )
    assert SECRET not in message
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("content", "headers", "status", "fragment"),
    [
        (b'{"pool": ', {"content-type": "application/json"}, 400, "not valid JSON"),
        (b'{"pool": "\xff"}', {"content-type": "application/json"}, 400, "not valid UTF-8"),
        (b'{"pool": NaN}', {"content-type": "application/json"}, 400, "NaN"),
        (b"[" * 50000, {"content-type": "application/json"}, 400, "body"),
        (b"", {"content-type": "application/json"}, 400, "body is required"),
        (b"pool=x", {"content-type": "application/x-www-form-urlencoded"}, 415, "Content-type"),
        (b"{}", {"content-type": "application/json; charset=latin-1"}, 415, "charset"),
        (b" " * (1 << 21), {"content-type": "application/json"}, 413, "larger"),
    ],
)
def test_malformed_bodies(
    content: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    app, fake = make()
    assert_error(
        request(app, "POST", "/attach/rbd", content=content, headers=headers), status, fragment
    )
    assert not fake.calls


def test_chunked_body_and_missing_content_type_reach_the_handler_as_json() -> None:
    app, fake = make()

    async def chunks() -> Any:
        for part in (b'{"monitors": ["10.0.0.1"], ', b'"pool": "rbd", "image": "img"}'):
            yield part

    r = request(
        app, "POST", "/attach/rbd", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 201, r.text
    r = request(app, "POST", "/attach/rbd", content=json.dumps(RBD).encode())
    assert r.status_code == 201, r.text
    assert [body for _, body in fake.calls] == [{"body": RBD}, {"body": RBD}]


def test_unknown_route_is_a_json_404() -> None:
    app, _ = make()
    assert_error(request(app, "GET", "/nothing/here"), 404, "/imageapi/v1/nothing/here")
    # The route exists and only its parameter is wrong: a 400 naming it, not a 404.
    assert_error(request(app, "GET", "/attach/rbd/abc"), 400, "parameter 'id'", "'abc'")
    assert_error(request(app, "DELETE", "/mount/overlay/1.5"), 400, "parameter 'id'")
    assert_error(request(app, "GET", "/attach/rbd/abc/def"), 404)
    assert_error(request(app, "GET", "/attach/rbd/-1"), 400, "parameter 'id'", "minimum")


def test_swagger_json_and_ui() -> None:
    app, _ = make()
    r = request(app, "GET", "/swagger.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    spec = r.json()
    assert spec["basePath"] == "/imageapi/v1" and "mount" in spec["definitions"]
    r = request(app, "GET", "/ui/")
    assert r.status_code == 200 and "swagger.json" in r.text


def test_sync_handlers_run_concurrently() -> None:
    app, fake = make()
    threads: set[int] = set()

    def slow(**_: Any) -> Any:
        threads.add(threading.get_ident())
        time.sleep(0.5)
        return [], 200

    fake.behaviour["list_rbds"] = slow

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            replies = await asyncio.gather(*(client.get("/attach/rbd") for _ in range(4)))
        return [r.status_code for r in replies]

    started = time.monotonic()
    assert asyncio.run(go()) == [200] * 4
    assert time.monotonic() - started < 1.5
    assert len(threads) == 4


def test_response_validation_catches_a_leaked_secret() -> None:
    app, fake = make(validate_responses=True)
    fake.behaviour["get_rbd"] = lambda **_: ({**RBD, "id": 1, "options": {"secret": SECRET}}, 200)
    message = assert_error(request(app, "GET", "/attach/rbd/1"), 500)
    assert SECRET not in message


def test_failures_outside_the_exception_middleware_are_json_too() -> None:
    app, _ = make()

    class Broken:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                raise RuntimeError("broken middleware")
            await self.app(scope, receive, send)

    app.add_middleware(Broken, position=MiddlewarePosition.BEFORE_EXCEPTION)

    async def go() -> httpx.Response:
        # starlette re-raises after answering (for the server to log it): don't re-raise here.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            return await client.get("/attach/rbd")

    assert_error(asyncio.run(go()), 500, "internal server error")


# -- the legacy shim ---------------------------------------------------------------------------


def test_legacy_mount_rbd_id() -> None:
    app, fake = make()
    r = request(
        app, "POST", "/mount/rbd", json={"id": 1, "fs_type": "squashfs", "mount_options": ["ro"]}
    )
    assert r.status_code == 201, r.text
    assert fake.calls[-1][1]["body"] == {
        "rbd_id": 1,
        "fs_type": "squashfs",
        "mount_options": ["ro"],
    }
    # With rbd_id present, `id` is the read-only field: left alone (and ignored downstream).
    request(app, "POST", "/mount/rbd", json={"id": 5, "rbd_id": 1, "fs_type": "squashfs"})
    assert fake.calls[-1][1]["body"] == {"id": 5, "rbd_id": 1, "fs_type": "squashfs"}


def test_legacy_bare_integer_lowers() -> None:
    app, fake = make(kinds={1: "rbd", 2: "overlay"})
    r = request(app, "POST", "/mount/overlay", json={"lower": [2, 1, 99]})
    assert r.status_code == 201, r.text
    assert fake.calls[-1][1]["body"] == {
        "lower": [
            {"kind": "overlay", "mount_id": 2},
            {"kind": "rbd", "mount_id": 1},
            {"kind": "overlay", "mount_id": 99},  # unknown: the handler answers 404
        ]
    }
    nested = {
        "kind": "overlay",
        "overlay": {"lower": [{"kind": "overlay", "overlay": {"lower": [1]}}]},
    }
    r = request(app, "POST", "/mount", json=nested)
    assert r.status_code == 201, r.text
    inner = fake.calls[-1][1]["body"]["overlay"]["lower"][0]["overlay"]["lower"]
    assert inner == [{"kind": "rbd", "mount_id": 1}]


def test_legacy_shim_leaves_other_bodies_byte_identical() -> None:
    seen: list[tuple[bytes, dict[bytes, bytes]]] = []

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append((body, dict(scope["headers"])))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    shim = LegacyShim(echo, kind_of=lambda n: "rbd")

    def post(op: str, raw: bytes) -> tuple[bytes, dict[bytes, bytes]]:
        scope = {
            "type": "http", "method": "POST", "path": "/x",
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(raw)).encode())],
            "extensions": {"connexion_routing": {"operation_id": op}},
        }  # fmt: skip
        messages = [{"type": "http.request", "body": raw[:3], "more_body": True},
                    {"type": "http.request", "body": raw[3:], "more_body": False}]  # fmt: skip

        async def receive() -> Any:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(_: Any) -> None:
            pass

        asyncio.run(shim(scope, receive, send))
        return seen.pop()

    for op, raw in [
        ("mount_overlay", b'{"lower" : [ {"kind":"rbd","mount_id":1} ] }'),
        ("mount_rbd", b'{ "rbd_id": 1, "fs_type": "squashfs" }'),
        ("mount", b'{"kind": "rbd", "rbd": {"id": 3, "fs_type": "x"}}'),
        ("mount_overlay", b'{"lower": [1'),  # not JSON: the validator will say so
        ("mount_overlay", b'{"lower": [1], "x": "\xff"}'),  # not UTF-8
        ("map_rbd", b'{"id": 1}'),  # another operation
    ]:
        assert post(op, raw)[0] == raw
    body, headers = post("mount_overlay", b'{"lower": [7]}')
    assert json.loads(body) == {"lower": [{"kind": "rbd", "mount_id": 7}]}
    assert headers[b"content-length"] == str(len(body)).encode()
