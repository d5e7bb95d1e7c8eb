"""swagger.yaml against the contract of ../shared/api-v1-facts.md."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate

from imageapi.app import load_spec

REPO = Path(__file__).resolve().parent.parent
SPEC_FILE = REPO / "swagger.yaml"

# (method, path, operationId), in the facts sheet's order.
OPERATIONS = [
    ("get", "/attach/rbd", "list_rbds"),
    ("post", "/attach/rbd", "map_rbd"),
    ("get", "/attach/rbd/{id}", "get_rbd"),
    ("delete", "/attach/rbd/{id}", "unmap_rbd"),
    ("get", "/mount", "list_mounts"),
    ("post", "/mount", "mount"),
    ("delete", "/mount", "unmount"),
    ("get", "/mount/rbd", "list_mounts_rbd"),
    ("post", "/mount/rbd", "mount_rbd"),
    ("get", "/mount/rbd/{id}", "get_mount_rbd"),
    ("delete", "/mount/rbd/{id}", "unmount_rbd"),
    ("get", "/mount/overlay", "list_mounts_overlay"),
    ("post", "/mount/overlay", "mount_overlay"),
    ("get", "/mount/overlay/{id}", "get_mount_overlay"),
    ("delete", "/mount/overlay/{id}", "unmount_overlay"),
    ("get", "/container", "list_containers"),
    ("post", "/container", "create_container"),
    ("get", "/container/{id}", "get_container"),
    ("delete", "/container/{id}", "delete_container"),
    ("get", "/container/{id}/{state}", "set_container_state"),
    ("get", "/container/byname/{name}", "get_container_byname"),
    ("delete", "/container/byname/{name}", "delete_container_byname"),
    ("get", "/container/byname/{name}/{state}", "set_container_state_byname"),
]
DEFINITIONS = {
    "id", "name", "rbd_options", "rbd", "mount_rbd", "mount_overlay", "mount",
    "container_namespace", "container_state", "container", "error",
}  # fmt: skip

# Additions beyond v1 (local images), in the spec's order; the v1 names above stay as they are.
ADDED_OPERATIONS = [
    ("get", "/attach/loopback", "list_loopbacks"),
    ("post", "/attach/loopback", "attach_loopback"),
    ("get", "/attach/loopback/{id}", "get_loopback"),
    ("delete", "/attach/loopback/{id}", "detach_loopback"),
    ("get", "/mount/loopback", "list_mounts_loopback"),
    ("post", "/mount/loopback", "mount_loopback"),
    ("get", "/mount/loopback/{id}", "get_mount_loopback"),
    ("delete", "/mount/loopback/{id}", "unmount_loopback"),
    ("get", "/mount/bind", "list_mounts_bind"),
    ("post", "/mount/bind", "mount_bind"),
    ("get", "/mount/bind/{id}", "get_mount_bind"),
    ("delete", "/mount/bind/{id}", "unmount_bind"),
]
# The 0.2 dialect (../shared/api-0.2-facts.md): the operations that are new beside v1 (GET,
# POST and DELETE /mount and GET, POST /container are v1's, which take 0.2's shapes too).
OPERATIONS_02 = [
    ("get", "/attach", "list_attachments"),
    ("post", "/attach", "attach"),
    ("delete", "/attach", "delete_attach"),
    ("delete", "/container", "delete_container_by_query"),
    ("patch", "/container", "set_container_state_by_query"),
]
# 0.2 query parameters of operations shared with v1.
QUERIES_02 = {
    ("get", "/mount"): ["id", "kind"],
    ("delete", "/mount"): ["id", "force"],
    ("get", "/container"): ["id", "name", "state"],
    ("get", "/attach"): ["id", "kind"],
    ("delete", "/attach"): ["id", "force"],
    ("delete", "/container"): ["id", "name", "force"],
    ("patch", "/container"): ["state", "id", "name"],
}
ADDED_DEFINITIONS = {
    "loopback", "mount_loopback", "mount_bind",
    "attach", "attach_rbd", "attach_loopback", "attach_local", "attach_iscsi", "mount_attach",
    "mount_nfs",
}  # fmt: skip
MOUNT_KINDS = ["rbd", "overlay", "loopback", "bind", "attach", "nfs", "uri"]  # v1's two first
SERVER_SET = {
    "id", "device_id", "device_file", "refs", "mountpoint", "upperdir", "workdir", "logfile",
    "pid",
}  # fmt: skip
TAGS = {"/attach": "attach", "/mount": "mounts", "/container": "containers"}
TAGS_02 = {"/attach": "attachments", "/mount": "mounts", "/container": "containers"}
NAMESPACES = ["cgroup", "ipc", "net", "mnt", "pid", "time", "user", "uts"]
CONTAINER_STATES = ["created", "running", "stopping", "exited", "dead"]

RBD_OPTIONS = {
    **dict.fromkeys(["fsid", "ip", "name", "secret", "namespace"], ("string", None)),
    **dict.fromkeys(
        [
            "share", "noshare", "crc", "nocrc", "ceph_requires_signatures",
            "noceph_requires_signatures", "tcp_nodelay", "notcp_nodelay", "cephx_sign_messages",
            "nocephx_sign_messages", "force", "rw", "ro", "lock_on_read", "exclusive", "notrim",
            "abort_on_full",
        ],
        ("boolean", None),
    ),
    **dict.fromkeys(
        ["mount_timeout", "osdkeepalive", "osd_idle_ttl", "queue_depth", "alloc_size"],
        ("integer", "int32"),
    ),
    "lock_timeout": ("integer", "int64"),
}  # fmt: skip


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_FILE.read_text())


def methods(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                yield method, path, op


def schemas(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object below `node` (definitions, properties, items), with its location."""
    if isinstance(node, dict):
        if "type" in node or "properties" in node:
            yield where, node
        for key, value in node.items():
            yield from schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from schemas(value, f"{where}/{i}")


def test_spec_is_valid_swagger_2(spec: dict[str, Any]) -> None:
    validate(spec)
    assert spec["swagger"] == "2.0"
    assert spec["info"]["title"] == "Image API"
    assert spec["basePath"] == "/imageapi/v1"
    assert spec["consumes"] == ["application/json"]
    assert spec["produces"] == ["application/json"]
    assert [t["name"] for t in spec["tags"]] == ["attach", "attachments", "mounts", "containers"]
    assert all(t.get("description") for t in spec["tags"])


def test_package_ships_the_same_spec(spec: dict[str, Any]) -> None:
    link = REPO / "imageapi" / "swagger.yaml"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert load_spec() == spec


def test_every_operation_of_the_contract(spec: dict[str, Any]) -> None:
    found = [(m, p, op["operationId"]) for m, p, op in methods(spec)]
    assert sorted(found) == sorted(OPERATIONS + ADDED_OPERATIONS + OPERATIONS_02)
    # Generated clients name their methods after these, in the facts sheet's order.
    v1 = {op for _, _, op in OPERATIONS}
    v02 = {op for _, _, op in OPERATIONS_02}
    assert [op for _, _, op in found if op in v1] == [op for _, _, op in OPERATIONS]
    assert [op for _, _, op in found if op not in v1 | v02] == [
        op for _, _, op in ADDED_OPERATIONS]
    for method, path, op in methods(spec):
        tags = TAGS_02 if op["operationId"] in v02 else TAGS
        assert op["tags"] == [tags["/" + path.split("/")[1]]]
        assert op.get("summary") or op.get("description"), f"{method} {path}: undocumented"
        # SwaggerUI says which dialect an operation belongs to.
        dialect = "[0.2]" if op["operationId"] in v02 else (
            "[v1, 0.2]" if (method, path) in QUERIES_02 or (method, path) in (
                ("post", "/mount"), ("post", "/container")) else None)
        if dialect:
            assert op["summary"].startswith(dialect), f"{method} {path}: {op['summary']}"


def test_0_2_query_parameters(spec: dict[str, Any]) -> None:
    shared = spec["parameters"]
    for (method, path), names in QUERIES_02.items():
        params = [shared[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
                  for p in spec["paths"][path][method].get("parameters", [])]
        assert [p["name"] for p in params if p["in"] == "query"] == names, (method, path)
        for p in params:
            if p["in"] == "query" and p["name"] == "force":
                assert (p["type"], p["default"], p["required"]) == ("boolean", False, False)
            if p["in"] == "query" and p["name"] == "id":
                assert (p["type"], p["format"]) == ("integer", "int64")
    assert shared["query_target_state"]["enum"] == ["running", "exited", "paused"]
    assert shared["query_attach_kind"]["enum"] == ["iscsi", "local", "loopback", "rbd"]
    assert shared["query_mount_kind"]["enum"] == ["attach", "bind", "nfs", "overlay", "uri"]


def test_0_2_definitions(spec: dict[str, Any]) -> None:
    d = spec["definitions"]
    attach = d["attach"]
    assert attach["properties"]["kind"]["enum"] == ["iscsi", "local", "loopback", "rbd"]
    for kind in ("rbd", "loopback", "local", "iscsi"):
        assert attach["properties"][kind] == {"$ref": f"#/definitions/attach_{kind}"}
    assert set(d["attach_loopback"]["required"]) == {"path", "base"}
    assert d["attach_loopback"]["properties"]["base"]["enum"] == ["root", "mount"]
    assert d["attach_loopback"]["properties"]["readPartitions"]["default"] is False
    assert set(d["attach_iscsi"]["required"]) == {"initiator", "target", "host"}
    assert {k: p.get("default") for k, p in d["attach_iscsi"]["properties"].items()
            if "default" in p} == {"lun": 0, "port": 3260, "max_comands": 128,
                                   "queue_depth": 16, "scheduler": "mq-deadline"}
    assert set(d["mount_attach"]["required"]) == {"attach", "fs_type"}
    assert d["mount_attach"]["properties"]["attach"] == {"$ref": "#/definitions/attach"}
    assert set(d["mount_nfs"]["required"]) == {"host", "path"}
    mount = d["mount"]["properties"]
    # A superset both dialects decode: both ids, and mountpoint and refs at the top.
    assert {"id", "mount_id", "mountpoint", "refs"} <= set(mount)
    assert mount["mountpoint"]["readOnly"] and mount["refs"]["readOnly"]
    assert d["container"]["properties"]["refs"]["readOnly"] is True


def test_definitions(spec: dict[str, Any]) -> None:
    assert set(spec["definitions"]) == DEFINITIONS | ADDED_DEFINITIONS
    ident = spec["definitions"]["id"]
    assert (ident["type"], ident["format"], ident["minimum"]) == ("integer", "int64", 0)
    error = spec["definitions"]["error"]
    assert set(error["required"]) == {"code", "message"}
    assert error["properties"]["code"]["format"] == "int32"


def test_every_object_is_strict_and_documented(spec: dict[str, Any]) -> None:
    for where, schema in schemas(spec["definitions"], "#/definitions"):
        if schema.get("type") == "object" or "properties" in schema:
            assert schema.get("additionalProperties") is False, f"{where} is not strict"
            for name, prop in schema["properties"].items():
                assert "$ref" in prop or prop.get("description"), f"{where}.{name}: no description"


def test_server_set_fields_are_read_only_and_never_required(spec: dict[str, Any]) -> None:
    for name, definition in spec["definitions"].items():
        props = definition.get("properties", {})
        for field in SERVER_SET & set(props):
            if name == "rbd_options":
                continue
            if field == "id" and name in ("mount", "attach"):
                continue  # 0.2 references: `{"id": N}` names an existing object
            assert props[field].get("readOnly") is True, f"{name}.{field} is not readOnly"
        required = set(definition.get("required", []))
        read_only = {f for f, p in props.items() if p.get("readOnly")}
        assert not required & read_only, f"{name}: required readOnly fields {required & read_only}"


def test_rbd_options_fields_and_types(spec: dict[str, Any]) -> None:
    props = spec["definitions"]["rbd_options"]["properties"]
    assert {k: (v["type"], v.get("format") if v["type"] == "integer" else None)
            for k, v in props.items()} == RBD_OPTIONS  # fmt: skip
    assert props["ip"]["format"] == "ipv4"
    assert "write-only" in props["secret"]["description"].lower()


def test_object_shapes(spec: dict[str, Any]) -> None:
    d = spec["definitions"]
    rbd = d["rbd"]
    assert set(rbd["required"]) == {"monitors", "pool", "image"}
    assert rbd["properties"]["monitors"]["minItems"] == 1
    assert rbd["properties"]["monitors"]["items"]["format"] == "ipv4"
    assert rbd["properties"]["options"] == {"$ref": "#/definitions/rbd_options"}
    mount_rbd = d["mount_rbd"]
    assert mount_rbd["required"] == ["fs_type"]
    assert mount_rbd["properties"]["rbd_id"] == {"$ref": "#/definitions/id"}
    assert mount_rbd["properties"]["rbd"] == {"$ref": "#/definitions/rbd"}
    overlay = d["mount_overlay"]
    assert overlay["required"] == ["lower"]
    assert overlay["properties"]["lower"]["minItems"] == 1
    assert overlay["properties"]["lower"]["items"] == {"$ref": "#/definitions/mount"}
    mount = d["mount"]
    assert mount["required"] == ["kind"]
    assert mount["properties"]["kind"]["enum"] == MOUNT_KINDS
    assert mount["properties"]["mount_id"] == {"$ref": "#/definitions/id"}
    for kind in MOUNT_KINDS:
        if kind != "uri":  # in 0.2's enum, never defined
            assert mount["properties"][kind] == {"$ref": f"#/definitions/mount_{kind}"}


def test_local_image_shapes(spec: dict[str, Any]) -> None:
    d = spec["definitions"]
    loopback = d["loopback"]
    assert loopback["required"] == ["path"]
    assert set(loopback["properties"]) == {"id", "path", "ro", "device_file", "refs"}
    assert (loopback["properties"]["ro"]["type"], loopback["properties"]["ro"]["default"]) == (
        "boolean", True)
    # mount_loopback is mount_rbd with the attachment named `loopback`.
    rbd_props = dict(d["mount_rbd"]["properties"])
    rbd_props["loopback_id"] = rbd_props.pop("rbd_id")
    rbd_props["loopback"] = {"$ref": "#/definitions/loopback"}
    del rbd_props["rbd"]
    assert d["mount_loopback"]["properties"] == rbd_props
    assert d["mount_loopback"]["required"] == ["fs_type"]
    bind = d["mount_bind"]
    assert bind["required"] == ["path"]
    # v1's {path, ro} and 0.2's {path, base, mount, recursive, ro}, told apart by `base`.
    assert set(bind["properties"]) == {"id", "path", "ro", "base", "mount", "recursive",
                                       "mountpoint", "refs"}
    assert "default" not in bind["properties"]["ro"]  # true in v1, false in 0.2
    assert loopback["properties"]["path"]["pattern"] == "^/"


@pytest.mark.parametrize("name", ["pool", "image", "snapshot"])
@pytest.mark.parametrize(
    ("value", "ok"),
    [("rbd", True), ("systemd.sqsh", True), ("a b", False), ("a,b", False), ("a=b", False),
     ("a/b", False), ("a@b", False), ("a\nb", False), ("", False)],
)  # fmt: skip
def test_rbd_names_cannot_inject_into_the_map_request(
    spec: dict[str, Any], name: str, value: str, ok: bool
) -> None:
    import jsonschema

    body = {"monitors": ["10.0.0.1"], "pool": "p", "image": "i", name: value}
    schema = {**spec["definitions"]["rbd"], "definitions": spec["definitions"]}
    errors = list(jsonschema.Draft4Validator(schema).iter_errors(body))
    assert (not errors) == ok, errors


def test_parameters_and_responses(spec: dict[str, Any]) -> None:
    shared = spec["parameters"]
    assert all(p["in"] == "path" and p["required"] for n, p in shared.items()
               if not n.startswith("query_"))
    for path, item in spec["paths"].items():
        # Path parameters are declared once, on the path, and in template order.
        names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
        assert item.get("parameters", []) == [{"$ref": f"#/parameters/{n}"} for n in names]
    for method, path, op in methods(spec):
        params = [p for p in op.get("parameters", []) if "$ref" not in p and p["in"] != "query"]
        for param in params:
            assert param["in"] == "body" and param["name"] == "body"
            assert param["required"] or (method, path) == ("delete", "/mount")  # or ?id=
        responses = op["responses"]
        assert "default" in responses
        success = {"get": "200", "delete": "200", "post": "201", "patch": "200"}[method]
        assert success in responses, f"{method} {path}"
        ok_schema = responses[success]["schema"]
        if method == "get" and "{" not in path:
            assert ok_schema["type"] == "array"
        else:
            assert "$ref" in ok_schema
        if "{" in path:
            assert "400" in responses and "404" in responses, f"{method} {path}"
        if method in ("post", "delete"):
            assert "400" in responses and "500" in responses
        if "{state}" in path:
            assert {"409", "500"} <= set(responses), f"{method} {path}"


def test_container_path_parameters(spec: dict[str, Any]) -> None:
    params = spec["parameters"]
    assert (params["id"]["type"], params["id"]["format"]) == ("integer", "int64")
    assert params["state"]["type"] == "string"
    assert params["state"]["enum"] == ["running", "exited"]
    name = params["name"]
    definition = spec["definitions"]["name"]
    assert name["type"] == "string"
    assert {k: name[k] for k in ("pattern", "minLength", "maxLength")} == {
        k: definition[k] for k in ("pattern", "minLength", "maxLength")
    }


def test_literal_segments_never_reach_a_string_parameter(spec: dict[str, Any]) -> None:
    """`/container/byname/x` must not be routable as `/container/{id}/{state}`.

    Where two templates of the same length differ by a literal segment against a parameter,
    the parameter must be an integer (connexion routes integers as digits only).
    """
    params = spec["parameters"]
    templates = [p.strip("/").split("/") for p in spec["paths"]]
    for a in templates:
        for b in templates:
            if a is b or len(a) != len(b):
                continue
            for x, y in zip(a, b, strict=True):
                if not x.startswith("{") and y.startswith("{"):
                    param = params[y[1:-1]]
                    assert param["type"] == "integer", f"/{'/'.join(a)} vs /{'/'.join(b)}"
                    assert not x.isdigit()


def test_container_definitions(spec: dict[str, Any]) -> None:
    d = spec["definitions"]
    assert d["container_namespace"]["type"] == "string"
    assert d["container_namespace"]["enum"] == NAMESPACES
    assert d["container_state"]["type"] == "string"
    assert d["container_state"]["enum"] == CONTAINER_STATES
    container = d["container"]
    assert set(container["required"]) == {"mount", "command"}
    props = container["properties"]
    assert set(props) == {
        "id", "name", "mount", "command", "systemd", "state", "namespaces", "profile", "logfile",
        "pid", "refs",
    }  # fmt: skip
    assert props["profile"]["enum"] == ["node", "confined"]
    assert props["profile"]["default"] == "node"
    assert props["mount"] == {"$ref": "#/definitions/mount"}
    assert props["name"] == {"$ref": "#/definitions/name"}
    assert props["state"] == {"$ref": "#/definitions/container_state"}
    assert (props["command"]["type"], props["command"]["minLength"]) == ("string", 1)
    assert (props["systemd"]["type"], props["systemd"]["default"]) == ("boolean", False)
    namespaces = props["namespaces"]
    assert namespaces["type"] == "array" and namespaces["x-nullable"] is True
    assert namespaces["items"] == {"$ref": "#/definitions/container_namespace"}
    assert (props["pid"]["type"], props["pid"]["format"]) == ("integer", "int64")
    assert props["logfile"]["type"] == "string"


@pytest.mark.parametrize(
    ("value", "ok"),
    [("test-container", True), ("web01", True), ("0", True), ("a.b_c-9", True), ("_x", True),
     ("x" * 64, True), ("", False), ("a b", False), ("a/b", False), ("é", False),
     ("x" * 65, False), (".", False), ("..", False), ("-x", False), (".x", False),
     ("a:b", False), ("a+b", False)],
)  # fmt: skip
def test_container_names(spec: dict[str, Any], value: str, ok: bool) -> None:
    import jsonschema

    schema = {**spec["definitions"]["container"], "definitions": spec["definitions"]}
    body = {"mount": {"kind": "overlay", "mount_id": 1}, "command": "/bin/sh", "name": value}
    errors = list(jsonschema.Draft4Validator(schema).iter_errors(body))
    assert (not errors) == ok, errors


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"mount": {"kind": "overlay", "mount_id": 1}, "command": "/usr/lib/systemd/systemd",
          "name": "test-container", "state": "created", "systemd": True}, True),
        ({"mount": {"kind": "rbd", "rbd": {"fs_type": "squashfs", "rbd_id": 1}},
          "command": "/bin/sh -c 'sleep 60'", "namespaces": ["net", "time"]}, True),
        ({"mount": {"kind": "overlay", "mount_id": 1}, "command": "/bin/sh", "id": 7,
          "logfile": "/x.log", "pid": 42}, True),  # read-only fields are accepted
        ({"mount": {"kind": "overlay", "mount_id": 1}}, False),
        ({"command": "/bin/sh"}, False),
        ({"mount": {"kind": "overlay", "mount_id": 1}, "command": ""}, False),
        ({"mount": {"kind": "overlay", "mount_id": 1}, "command": "/bin/sh",
          "namespaces": ["network"]}, False),
        ({"mount": {"kind": "overlay", "mount_id": 1}, "command": "/bin/sh",
          "state": "paused"}, False),
        ({"mount": {"id": 1, "kind": "overlay"}, "command": "/bin/sh"}, True),  # 0.2's reference
        ({"mount": {"kind": "overlay", "mount_id": 1}, "command": "/bin/sh", "tty": True}, False),
    ],
)  # fmt: skip
def test_container_bodies(spec: dict[str, Any], body: dict[str, Any], ok: bool) -> None:
    import jsonschema

    schema = {**spec["definitions"]["container"], "definitions": spec["definitions"]}
    errors = list(jsonschema.Draft4Validator(schema).iter_errors(body))
    assert (not errors) == ok, errors
