"""An HTTP client for tests that checks every response against swagger.yaml.

Each answer must be declared for its operation and status, its body must validate against
the declared schema, and every error must be `{"code": <status>, "message": <text>}`.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import yaml

SPEC_PATH = Path(__file__).resolve().parent.parent / "swagger.yaml"
BASE = "/imageapi/v1"


@cache
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def _nullable_type(validator: Any, types: Any, instance: Any, schema: dict[str, Any]) -> Any:
    # Swagger 2.0 has no null type; `x-nullable: true` (e.g. a container's `namespaces`)
    # allows null, as connexion's own response validation does.
    if instance is None and schema.get("x-nullable") is True:
        return
    yield from jsonschema.Draft4Validator.VALIDATORS["type"](validator, types, instance, schema)


SpecValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"type": _nullable_type}
)


@cache
def _routes() -> list[tuple[re.Pattern[str], str]]:
    routes = []
    for template in spec()["paths"]:
        pattern = re.sub(r"\{[^}]+\}", r"[^/]+", template)
        routes.append((re.compile(pattern + "$"), template))
    # Literal segments beat parameters (/container/byname/x before /container/{id}/{state}).
    routes.sort(key=lambda r: r[1].count("{"))
    return routes


def response_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The schema the spec declares for this answer; raises if the answer is undeclared."""
    for pattern, template in _routes():
        if pattern.match(path):
            op = spec()["paths"][template].get(method.lower())
            break
    else:
        return None  # unknown route: only the error shape is checked
    if op is None:
        return None
    responses = op["responses"]
    declared = responses.get(str(status)) or responses.get(status) or responses.get("default")
    assert declared is not None, f"{method} {path}: status {status} is not in the spec"
    if "$ref" in declared:  # a shared entry under the spec's top-level `responses`
        declared = spec()["responses"][declared["$ref"].rsplit("/", 1)[1]]
    return declared.get("schema")


def check_response(method: str, path: str, response: httpx.Response) -> None:
    status = response.status_code
    body = response.json() if response.content else None
    if status >= 400:
        assert isinstance(body, dict), f"error body is not an object: {response.text!r}"
        assert body.get("code") == status, f"error code {body.get('code')} != status {status}"
        assert isinstance(body.get("message"), str) and body["message"], body
    schema = response_schema(method, path, status)
    if schema is not None:
        full = dict(schema)
        full["definitions"] = spec()["definitions"]
        SpecValidator(full).validate(body)


class Api:
    def __init__(self, base_url: str, transport: httpx.BaseTransport | None = None,
                 **client_args: Any) -> None:
        self.http = httpx.Client(
            base_url=base_url + BASE, timeout=60, transport=transport, **client_args
        )

    def request(self, method: str, path: str, expect: int | None = None,
                **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        check_response(method, path, response)
        if expect is not None:
            assert response.status_code == expect, (
                f"{method} {path}: expected {expect}, got {response.status_code}: {response.text}"
            )
        return response

    def get(self, path: str, expect: int | None = 200, **kw: Any) -> Any:
        return self.request("GET", path, expect, **kw).json()

    def post(self, path: str, body: Any, expect: int | None = 201, **kw: Any) -> Any:
        return self.request("POST", path, expect, json=body, **kw).json()

    def delete(self, path: str, expect: int | None = 200, **kw: Any) -> Any:
        return self.request("DELETE", path, expect, **kw).json()

    def close(self) -> None:
        self.http.close()


def ref(mount: dict[str, Any]) -> dict[str, Any]:
    """A generic mount as v1's reference (`kind`, `mount_id`): what v1's tests compare. The
    superset's other identity fields must agree with it."""
    assert mount["id"] == mount["mount_id"] and "mountpoint" in mount and "refs" in mount
    return {"kind": mount["kind"], "mount_id": mount["mount_id"]}
