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

from imageapi.api.handlers import Handlers
from imageapi.api.legacy import LegacyShim
from imageapi.app import create_app
from imageapi.config import Settings
from imageapi.drivers.base import Node
from imageapi.errors import BadRequest, Conflict, NotFound, SystemFault

BASE = "http://imageapi.test/imageapi/v1"
SECRET = "AQBaVtRgAAAAABAA7d2vKtXqRk+Cb9Vmq/lmqQ=="
RBD = {"monitors": ["10.0.0.1"], "pool": "rbd", "image": "img"}
CONTAINER = {"mount": {"kind": "overlay", "mount_id": 2}, "command": "/bin/sh -c 'sleep 9'"}


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
            creates = ("map_rbd", "mount", "mount_rbd", "mount_overlay", "create_container")
            status = 201 if op in creates else 200
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
    assert r.json() == {"op": "unmount", "body": {"kind": "rbd", "mount_id": 4}, "force": False}


@pytest.mark.parametrize(
    ("path", "allow"),
    [("/attach/rbd", "GET, HEAD, POST"), ("/attach/rbd/1", "DELETE, GET, HEAD"),
     ("/mount", "DELETE, GET, HEAD, POST"), ("/mount/rbd", "GET, HEAD, POST"),
     ("/mount/rbd/1", "DELETE, GET, HEAD"), ("/mount/overlay", "GET, HEAD, POST"),
     ("/mount/overlay/1", "DELETE, GET, HEAD"), ("/swagger.json", "GET, HEAD"),
     ("/container", "DELETE, GET, HEAD, PATCH, POST"), ("/container/1", "DELETE, GET, HEAD"),
     ("/attach", "DELETE, GET, HEAD, POST"),
     ("/container/1/running", "GET, HEAD"), ("/container/byname/x", "DELETE, GET, HEAD"),
     ("/container/byname/1", "DELETE, GET, HEAD"), ("/container/byname/x/exited", "GET, HEAD")],
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


# -- containers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "op", "args"),
    [
        ("GET", "/container", "list_containers", {}),
        ("GET", "/container/3", "get_container", {"id": 3}),
        ("DELETE", "/container/3", "delete_container", {"id": 3}),
        ("GET", "/container/3/running", "set_container_state", {"id": 3, "state": "running"}),
        ("GET", "/container/3/exited", "set_container_state", {"id": 3, "state": "exited"}),
        ("GET", "/container/byname/web", "get_container_byname", {"name": "web"}),
        ("DELETE", "/container/byname/web", "delete_container_byname", {"name": "web"}),
        # A name made of digits, or one that looks like a state, is still a name.
        ("GET", "/container/byname/3", "get_container_byname", {"name": "3"}),
        ("GET", "/container/byname/running", "get_container_byname", {"name": "running"}),
        ("DELETE", "/container/byname/7", "delete_container_byname", {"name": "7"}),
        ("GET", "/container/byname/web/running", "set_container_state_byname",
         {"name": "web", "state": "running"}),
        ("GET", "/container/byname/3/exited", "set_container_state_byname",
         {"name": "3", "state": "exited"}),
    ],
)  # fmt: skip
def test_container_routes(method: str, path: str, op: str, args: dict[str, Any]) -> None:
    app, fake = make()
    r = request(app, method, path)
    assert r.status_code == 200, r.text
    assert fake.calls == [(op, args)]


def test_create_container_route() -> None:
    app, fake = make()
    r = request(app, "POST", "/container", json=CONTAINER)
    assert r.status_code == 201, r.text
    assert fake.calls == [("create_container", {"body": CONTAINER})]


@pytest.mark.parametrize(
    ("method", "path", "status", "fragments"),
    [
        ("GET", "/container/3/stopping", 400, ["parameter 'state'", "'stopping'"]),
        ("GET", "/container/3/created", 400, ["parameter 'state'"]),
        ("GET", "/container/3/dead", 400, ["parameter 'state'"]),
        ("GET", "/container/byname/web/dead", 400, ["parameter 'state'", "'dead'"]),
        ("GET", "/container/byname/web/Running", 400, ["parameter 'state'"]),
        ("GET", "/container/abc", 400, ["parameter 'id'", "'abc'"]),
        ("GET", "/container/abc/running", 400, ["parameter 'id'"]),
        ("DELETE", "/container/-1", 400, ["parameter 'id'"]),
        ("GET", "/container/byname/a%20b", 400, ["parameter 'name'"]),
        ("GET", "/container/byname/web/running/now", 404, ["/container/byname/web/running/now"]),
        ("GET", "/container/3/running/now", 404, []),
        ("DELETE", "/container/3/exited", 405, ["DELETE"]),
        ("POST", "/container/byname/web", 405, ["POST"]),
    ],
)  # fmt: skip
def test_container_bad_paths(method: str, path: str, status: int, fragments: list[str]) -> None:
    app, fake = make()
    assert_error(request(app, method, path), status, *fragments)
    assert not fake.calls


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"command": "/bin/sh"}, ["body", "'mount' is a required"]),
        ({"mount": CONTAINER["mount"]}, ["body", "'command' is a required"]),
        ({**CONTAINER, "command": ""}, ["body.command"]),
        ({**CONTAINER, "state": "paused"}, ["body.state", "'paused' is not one of"]),
        ({**CONTAINER, "namespaces": ["network"]}, ["body.namespaces[0]", "'network'"]),
        ({**CONTAINER, "systemd": "yes"}, ["body.systemd", "boolean"]),
        ({**CONTAINER, "name": "a/b"}, ["body.name", "does not match"]),
        ({**CONTAINER, "mount": {"kind": "disk", "mount_id": 1}}, ["body.mount.kind"]),
        ({**CONTAINER, "tty": True}, ["body", "'tty'"]),
    ],
)
def test_container_schema_violations(body: dict[str, Any], fragments: list[str]) -> None:
    app, fake = make()
    assert_error(request(app, "POST", "/container", json=body), 400, *fragments)
    assert not fake.calls


def test_container_response_may_show_null_namespaces() -> None:
    app, fake = make(validate_responses=True)
    view = {
        **CONTAINER, "id": 3, "name": "web", "systemd": False, "state": "running",
        "namespaces": None, "logfile": "/var/run/imageapi/logs/3-1613002114.log", "pid": 1534,
    }  # fmt: skip
    fake.behaviour["get_container"] = lambda **_: (view, 200)
    r = request(app, "GET", "/container/3")
    assert r.status_code == 200, r.text
    assert r.json() == view


# The real Handlers on a stand-in registry: what the container handlers ask the graph for.


class FakeRegistry:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, Exception] = {}
        self.next_id = 5

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        if method in self.fail:
            raise self.fail[method]

    # `render` (how the handler wants the answer shown) and `force` are the handlers'
    # business; the stand-in answers plain views.
    def create(self, collection: str, kind: str, spec: dict[str, Any], render: Any = None
               ) -> dict[str, Any]:
        self._call("create", collection, kind, spec)
        return {**spec, "id": self.next_id, "state": spec.get("state", "created")}

    def change(self, collection: str, kind: str, node_id: int, state: str, render: Any = None
               ) -> dict[str, Any]:
        self._call("change", collection, kind, node_id, state)
        return {**CONTAINER, "id": node_id, "state": state}

    def node(self, collection: str, kind: str, node_id: int) -> Any:
        return Node(id=node_id, collection=collection, kind=kind, spec={}, needs=[], record={})

    def delete(self, collection: str, kind: str, node_id: int, render: Any = None,
               force: bool = False) -> dict[str, Any]:
        self._call("delete", collection, kind, node_id)
        return {**CONTAINER, "id": node_id, "state": "exited"}

    def get(self, collection: str, kind: str, node_id: int, render: Any = None
            ) -> dict[str, Any]:
        self._call("get", collection, kind, node_id)
        return {**CONTAINER, "id": node_id, "state": "created"}

    def list(self, collection: str, kind: str | None = None, render: Any = None,
             where: Any = None) -> list[dict[str, Any]]:
        self._call("list", collection, kind)
        return []

    def kind_of(self, node_id: int, collection: str = "mount") -> str | None:
        return None

    def find_name(self, collection: str, kind: str, name: str) -> int:
        self._call("find_name", collection, kind, name)
        return 9


class FakeService:
    def __init__(self) -> None:
        self.registry = FakeRegistry()
        self.settings = Settings()


def with_registry() -> tuple[Any, FakeRegistry]:
    service = FakeService()
    app = create_app(Settings(), handlers=Handlers(service), kind_of=lambda n: None)
    return app, service.registry


C = ("container", "container")


def test_create_container_defaults_to_created() -> None:
    app, graph = with_registry()
    r = request(app, "POST", "/container", json=CONTAINER)
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "created"
    assert graph.calls == [("create", *C, CONTAINER)]


def test_create_container_running_is_one_graph_operation() -> None:
    app, graph = with_registry()
    body = {**CONTAINER, "state": "running"}
    r = request(app, "POST", "/container", json=body)
    assert r.status_code == 201, r.text
    assert r.json() == {**CONTAINER, "id": 5, "state": "running"}
    assert graph.calls == [("create", *C, body)]  # the graph builds and starts it at once


@pytest.mark.parametrize("state", ["exited", "stopping", "dead"])
def test_create_container_in_another_state_is_refused(state: str) -> None:
    app, graph = with_registry()
    r = request(app, "POST", "/container", json={**CONTAINER, "state": state})
    assert_error(r, 400, "state", "'created'", "'running'", repr(state))
    assert not graph.calls  # nothing was created


@pytest.mark.parametrize(
    ("exc", "status"), [(SystemFault("ENOEXEC: start: Exec format error"), 500),
                        (Conflict("busy"), 409), (RuntimeError("bug"), 500)]
)  # fmt: skip
def test_a_failed_start_on_create_is_the_answer(exc: Exception, status: int) -> None:
    # The graph undoes what it built (tests on a real server check the system); the handler
    # only passes the error on.
    app, graph = with_registry()
    graph.fail["create"] = exc
    r = request(app, "POST", "/container", json={**CONTAINER, "state": "running"})
    message = assert_error(r, status)
    if status != 500 or isinstance(exc, SystemFault):
        assert str(exc) in message
    assert [c[0] for c in graph.calls] == ["create"]


def test_container_state_and_name_handlers() -> None:
    app, graph = with_registry()
    r = request(app, "GET", "/container/byname/web/exited")
    assert r.status_code == 200 and r.json()["state"] == "exited"
    assert graph.calls == [("find_name", *C, "web"), ("change", *C, 9, "exited")]
    graph.calls.clear()
    assert request(app, "DELETE", "/container/byname/web").json()["id"] == 9
    assert graph.calls == [("find_name", *C, "web"), ("delete", *C, 9)]
    graph.calls.clear()
    assert request(app, "GET", "/container/4/running").json()["state"] == "running"
    assert request(app, "GET", "/container/byname/web").json()["id"] == 9
    assert request(app, "GET", "/container").json() == []
    assert graph.calls == [
        ("change", *C, 4, "running"),
        ("find_name", *C, "web"),
        ("get", *C, 9),
        ("list", *C),
    ]
    graph.fail["find_name"] = NotFound("no container named 'nope'")
    assert_error(request(app, "GET", "/container/byname/nope/running"), 404, "'nope'")


@pytest.mark.parametrize("state", ["created", "stopping", "dead", ""])
def test_state_handlers_refuse_other_states_without_the_spec(state: str) -> None:
    handlers = Handlers(FakeService())
    with pytest.raises(BadRequest, match="'running' or 'exited'"):
        handlers.set_container_state(1, state)
    with pytest.raises(BadRequest, match="'running' or 'exited'"):
        handlers.set_container_state_byname("web", state)
    assert not handlers.graph.calls


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


def test_legacy_container_mount_id() -> None:
    app, fake = make(kinds={1: "overlay", 4: "rbd"})
    seed = {"name": "test-container", "mount": {"id": 1, "kind": "overlay"},
            "command": "/usr/lib/systemd/systemd", "state": "created", "systemd": True}  # fmt: skip
    r = request(app, "POST", "/container", json=seed)
    assert r.status_code == 201, r.text
    assert fake.calls[-1] == (
        "create_container",
        {"body": {**seed, "mount": {"kind": "overlay", "mount_id": 1}}},
    )
    # An inline overlay's bare-integer lowers, with or without the legacy `id`.
    inline = {"command": "/bin/sh", "mount": {"kind": "overlay", "overlay": {"lower": [4, 1]}}}
    r = request(app, "POST", "/container", json=inline)
    assert r.status_code == 201, r.text
    assert fake.calls[-1][1]["body"]["mount"]["overlay"]["lower"] == [
        {"kind": "rbd", "mount_id": 4},
        {"kind": "overlay", "mount_id": 1},
    ]
    # With mount_id present, `id` is left alone (0.2's name of the reference: mount_id wins).
    body = {"command": "/bin/sh", "mount": {"id": 1, "mount_id": 2, "kind": "overlay"}}
    r = request(app, "POST", "/container", json=body)
    assert r.status_code == 201, r.text
    assert fake.calls[-1][1]["body"] == body


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
        ("create_container", b'{"command": "/bin/sh", "mount": {"kind":"rbd","mount_id":1}}'),
        ("create_container", b'{"mount": {"id": 1, "mount_id": 2, "kind": "rbd"}}'),
        ("create_container", b'{"mount": {"id": "1", "kind": "rbd"}}'),  # not an id
        ("create_container", b'{"mount": [{"id": 1}], "id": 3}'),
        ("create_container", b'{"mount": {"kind": "overlay", "overlay": {"lower": [{}]}}}'),
        ("create_container", b'{"mount": {"id": 1'),
        ("get_container", b'{"mount": {"id": 1, "kind": "rbd"}}'),
    ]:
        assert post(op, raw)[0] == raw
    body, headers = post("mount_overlay", b'{"lower": [7]}')
    assert json.loads(body) == {"lower": [{"kind": "rbd", "mount_id": 7}]}
    assert headers[b"content-length"] == str(len(body)).encode()
    body, headers = post("create_container", b'{"command": "x", "mount": {"id": 7, "kind": "rbd"}}')
    assert json.loads(body) == {"command": "x", "mount": {"kind": "rbd", "mount_id": 7}}
    assert headers[b"content-length"] == str(len(body)).encode()
    raw = b'{"command": "x", "mount": {"kind": "overlay", "overlay": {"lower": [7]}}}'
    body, _ = post("create_container", raw)
    assert json.loads(body)["mount"]["overlay"]["lower"] == [{"kind": "rbd", "mount_id": 7}]
