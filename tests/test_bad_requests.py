"""Bad requests: each gets the right status and a clear message, and changes nothing.

Every case runs against a live stack holding an rbd, an rbd mount on it and an overlay on
that (so "in use", "duplicate" and "wrong kind" have something to hit). The `stack` fixture
compares the registry, the mount table, loop devices, the simulator's devices and the run
directory before and after each case.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import Stack
from tests.krbdsim.harness import make_secret

MISSING = 999_999


@dataclass(frozen=True)
class Base:
    rbd: int
    mnt: int
    ovl: int


@pytest.fixture(scope="module")
def base(api: Any, cluster: Any) -> Iterator[Base]:
    spec = {
        "monitors": list(cluster.monitors), "pool": "rbd", "image": "systemd.sqsh",
        "options": {"ro": True, "name": cluster.key_name, "secret": cluster.secret},
    }
    rbd = api.post("/attach/rbd", spec)
    mnt = api.post("/mount/rbd", {"rbd_id": rbd["id"], "fs_type": "squashfs",
                                  "mount_options": ["ro"]})
    ovl = api.post("/mount/overlay", {"lower": [{"kind": "rbd", "mount_id": mnt["id"]}]})
    yield Base(rbd["id"], mnt["id"], ovl["id"])
    api.delete(f"/mount/overlay/{ovl['id']}")
    api.delete(f"/mount/rbd/{mnt['id']}")
    api.delete(f"/attach/rbd/{rbd['id']}")


def rbd(stack: Stack, image: str = "base", pool: str = "images", **changes: Any) -> dict:
    spec = stack.rbd_spec(image=image, pool=pool)
    options = changes.pop("options", None)
    if options is not None:
        spec["options"] = {**spec["options"], **options}
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def inline_mount(spec: dict, fs_type: str = "squashfs", options: Any = ("ro",)) -> dict:
    return {"fs_type": fs_type, "mount_options": list(options), "rbd": spec}


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    body: Any  # a callable (stack, base) -> JSON body, raw bytes, or None
    status: int
    says: str = ""  # a piece the message must contain (case-insensitive)


def opt(**options: Any) -> Any:
    return lambda s, b: rbd(s, options=options)


def without_option(name: str) -> Any:
    def body(s: Stack, b: Base) -> dict:
        spec = rbd(s)
        del spec["options"][name]
        return spec
    return body


CASES: dict[str, Case] = {
    # -- schema violations on /attach/rbd ------------------------------------------------
    "empty-object": Case("POST", "/attach/rbd", lambda s, b: {}, 400, "monitors"),
    "no-monitors": Case("POST", "/attach/rbd", lambda s, b: rbd(s, monitors=[]), 400, "monitors"),
    "monitor-not-ip": Case("POST", "/attach/rbd", lambda s, b: rbd(s, monitors=["mon.example"]),
                           400, "monitors"),
    "monitor-comma-injection": Case(
        "POST", "/attach/rbd", lambda s, b: rbd(s, monitors=["192.0.2.10,192.0.2.11"]), 400,
        "monitors"),
    "no-pool": Case("POST", "/attach/rbd", lambda s, b: rbd(s, pool=None), 400, "pool"),
    "empty-pool": Case("POST", "/attach/rbd", lambda s, b: rbd(s, pool=""), 400, "pool"),
    "pool-space-injection": Case("POST", "/attach/rbd", lambda s, b: rbd(s, pool="rbd base"),
                                 400, "pool"),
    "image-comma-injection": Case("POST", "/attach/rbd", lambda s, b: rbd(s, image="base,rw"),
                                  400, "image"),
    "image-newline-injection": Case("POST", "/attach/rbd",
                                    lambda s, b: rbd(s, image="base\nrbd"), 400, "image"),
    "snapshot-space-injection": Case("POST", "/attach/rbd",
                                     lambda s, b: rbd(s, snapshot="v1 extra"), 400, "snapshot"),
    "unknown-field": Case("POST", "/attach/rbd", lambda s, b: {**rbd(s), "colour": "red"}, 400,
                          "colour"),
    "unknown-option": Case("POST", "/attach/rbd", opt(readonly=True), 400, "readonly"),
    "option-wrong-type": Case("POST", "/attach/rbd", opt(ro="yes"), 400, "ro"),
    "no-name": Case("POST", "/attach/rbd", without_option("name"), 400, "name"),
    "no-secret": Case("POST", "/attach/rbd", without_option("secret"), 400, "secret"),
    "secret-not-base64": Case("POST", "/attach/rbd", opt(secret="not base64!"), 400, "secret"),
    "secret-comma-injection": Case("POST", "/attach/rbd", opt(secret="QUJD,rw"), 400, "secret"),
    "name-comma-injection": Case("POST", "/attach/rbd", opt(name="admin,rw"), 400, "name"),
    "namespace-injection": Case("POST", "/attach/rbd", opt(namespace="ns rbd"), 400, "namespace"),
    "fsid-not-uuid": Case("POST", "/attach/rbd", opt(fsid="abc,rw"), 400, "fsid"),
    "ip-injection": Case("POST", "/attach/rbd", opt(ip="1.2.3.4,rw"), 400, "ip"),
    "negative-queue-depth": Case("POST", "/attach/rbd", opt(queue_depth=-1), 400, "queue_depth"),
    "string-queue-depth": Case("POST", "/attach/rbd", opt(queue_depth="64"), 400, "queue_depth"),
    "ro-and-rw": Case("POST", "/attach/rbd", opt(rw=True), 400, "rw"),
    # -- bodies that are not JSON objects ------------------------------------------------
    "not-json": Case("POST", "/attach/rbd", b'{"monitors": [', 400),
    "json-array": Case("POST", "/attach/rbd", lambda s, b: [rbd(s)], 400),
    "not-utf8": Case("POST", "/attach/rbd", b'{"pool": "\xff\xfe"}', 400),
    # -- schema and semantic violations on mounts ----------------------------------------
    "mount-no-fs-type": Case("POST", "/mount/rbd", lambda s, b: {"rbd_id": b.rbd}, 400,
                             "fs_type"),
    "fs-type-injection": Case("POST", "/mount/rbd",
                              lambda s, b: {"rbd_id": b.rbd, "fs_type": "squashfs,ro"}, 400,
                              "fs_type"),
    "mount-option-comma-injection": Case(
        "POST", "/mount/rbd",
        lambda s, b: inline_mount(rbd(s), options=["ro,lowerdir=/etc"]), 400, "mount_options"),
    "mount-option-bind": Case("POST", "/mount/rbd",
                              lambda s, b: inline_mount(rbd(s), options=["bind"]), 400, "bind"),
    "mount-option-space": Case("POST", "/mount/rbd",
                               lambda s, b: inline_mount(rbd(s), options=["ro", "a b"]), 400,
                               "mount_options"),
    "mount-without-source": Case("POST", "/mount/rbd", lambda s, b: {"fs_type": "squashfs"}, 400,
                                 "rbd"),
    "overlay-empty-lower": Case("POST", "/mount/overlay", lambda s, b: {"lower": []}, 400,
                                "lower"),
    "overlay-no-lower": Case("POST", "/mount/overlay", lambda s, b: {}, 400, "lower"),
    "overlay-bad-kind": Case("POST", "/mount/overlay",
                             lambda s, b: {"lower": [{"kind": "nfs", "mount_id": b.mnt}]}, 400,
                             "not a nfs mount"),
    "overlay-lower-without-id-or-definition": Case(
        "POST", "/mount/overlay", lambda s, b: {"lower": [{"kind": "rbd"}]}, 400, "lower"),
    "generic-post-with-reference": Case("POST", "/mount",
                                        lambda s, b: {"kind": "rbd", "mount_id": b.mnt}, 400,
                                        "mount_id"),
    "generic-delete-without-id": Case("DELETE", "/mount", lambda s, b: {"kind": "rbd"}, 400,
                                      "mount_id"),
    "generic-delete-empty": Case("DELETE", "/mount", lambda s, b: {}, 400, "kind"),
    "path-id-not-integer": Case("GET", "/attach/rbd/abc", None, 400, "id"),
    "path-id-negative": Case("GET", "/mount/rbd/-3", None, 400, "id"),
    # -- unknown ids, wrong kinds, unknown routes -----------------------------------------
    "get-unknown-rbd": Case("GET", f"/attach/rbd/{MISSING}", None, 404, str(MISSING)),
    "delete-unknown-rbd": Case("DELETE", f"/attach/rbd/{MISSING}", None, 404, str(MISSING)),
    "delete-unknown-overlay": Case("DELETE", f"/mount/overlay/{MISSING}", None, 404),
    "overlay-id-under-rbd-path": Case("GET", "/mount/rbd/{ovl}", None, 404),
    "mount-id-under-attach-path": Case("DELETE", "/attach/rbd/{mnt}", None, 404),
    "mount-unknown-rbd-id": Case("POST", "/mount/rbd",
                                 lambda s, b: {"rbd_id": MISSING, "fs_type": "squashfs"}, 404,
                                 str(MISSING)),
    "mount-rbd-id-is-a-mount": Case("POST", "/mount/rbd",
                                    lambda s, b: {"rbd_id": b.mnt, "fs_type": "squashfs"}, 404),
    "overlay-unknown-lower": Case(
        "POST", "/mount/overlay",
        lambda s, b: {"lower": [{"kind": "rbd", "mount_id": MISSING}]}, 404, str(MISSING)),
    "overlay-lower-wrong-kind": Case(
        "POST", "/mount/overlay", lambda s, b: {"lower": [{"kind": "rbd", "mount_id": b.ovl}]},
        400, "not an rbd mount"),
    "unknown-route": Case("GET", "/attach/nbd", None, 404),
    "wrong-method": Case("PUT", "/attach/rbd", lambda s, b: {}, 405),
    # -- conflicts -------------------------------------------------------------------------
    "duplicate-attach": Case("POST", "/attach/rbd", lambda s, b: rbd(s, "systemd.sqsh", "rbd"),
                             409, "already mapped"),
    "duplicate-attach-inline": Case(
        "POST", "/mount/rbd", lambda s, b: inline_mount(rbd(s, "systemd.sqsh", "rbd")), 409,
        "already mapped"),
    "delete-rbd-in-use": Case("DELETE", "/attach/rbd/{rbd}", None, 409, "in use"),
    "delete-mount-in-use": Case("DELETE", "/mount/rbd/{mnt}", None, 409, "overlay mount"),
    "generic-delete-in-use": Case("DELETE", "/mount",
                                  lambda s, b: {"kind": "rbd", "mount_id": b.mnt}, 409, "in use"),
    # -- the kernel refuses (the simulator answers as krbd would) ------------------------
    "unknown-image": Case("POST", "/attach/rbd", lambda s, b: rbd(s, image="nope"), 400,
                          "ENOENT"),
    "unknown-pool": Case("POST", "/attach/rbd", lambda s, b: rbd(s, pool="nopool"), 400,
                         "ENOENT"),
    "unknown-snapshot": Case("POST", "/attach/rbd", lambda s, b: rbd(s, snapshot="v9"), 400,
                             "ENOENT"),
    "wrong-key": Case("POST", "/attach/rbd",
                      lambda s, b: rbd(s, options={"secret": make_secret()}), 400, "EPERM"),
    "malformed-key": Case("POST", "/attach/rbd", opt(secret="d3Jvbmcga2V5IGZvciB0ZXN0cw=="),
                          400, "EINVAL"),
    "unreachable-monitors": Case("POST", "/attach/rbd",
                                 lambda s, b: rbd(s, monitors=["192.0.2.99"]), 500, "ETIMEDOUT"),
    "wrong-fs-type-inline": Case("POST", "/mount/rbd",
                                 lambda s, b: inline_mount(rbd(s), fs_type="ext4"), 400,
                                 "cannot mount"),
    "unknown-fs-type-inline": Case("POST", "/mount/rbd",
                                   lambda s, b: inline_mount(rbd(s), fs_type="nosuchfs"), 400,
                                   "fs_type: 'nosuchfs' is not a filesystem"),
    "bad-fs-option-inline": Case("POST", "/mount/rbd",
                                 lambda s, b: inline_mount(rbd(s), options=["ro", "nosuchopt"]),
                                 400, "not an option allowed for squashfs"),
    "kernel-refusal-mid-nested-build": Case(
        "POST", "/mount",
        lambda s, b: {"kind": "overlay", "overlay": {"lower": [
            {"kind": "rbd", "rbd": inline_mount(rbd(s))},
            {"kind": "overlay", "mount_id": b.ovl},
            {"kind": "rbd", "rbd": inline_mount(rbd(s, image="missing"))},
        ]}}, 400, "ENOENT"),
    "mount-refusal-mid-nested-build": Case(
        "POST", "/mount/overlay",
        lambda s, b: {"lower": [
            {"kind": "rbd", "rbd": inline_mount(rbd(s))},
            {"kind": "rbd", "rbd": inline_mount(rbd(s, snapshot=None, image="base",
                                                    options={"namespace": "team1"}),
                                                fs_type="ext4")},
        ]}, 400, "cannot mount"),
}


def expand(path: str, base: Base) -> str:
    return path.format(rbd=base.rbd, mnt=base.mnt, ovl=base.ovl)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_refused_and_changes_nothing(name: str, stack: Stack, base: Base) -> None:
    case = CASES[name]
    kwargs: dict[str, Any] = {}
    if isinstance(case.body, bytes):
        kwargs = {"content": case.body, "headers": {"Content-Type": "application/json"}}
    elif case.body is not None:
        kwargs = {"content": json.dumps(case.body(stack, base)),
                  "headers": {"Content-Type": "application/json"}}
    refs_before = [stack.api.get(p)["refs"] for p in
                   (f"/attach/rbd/{base.rbd}", f"/mount/rbd/{base.mnt}",
                    f"/mount/overlay/{base.ovl}")]
    response = stack.api.request(case.method, expand(case.path, base), case.status, **kwargs)
    message = response.json()["message"]
    assert case.says.lower() in message.lower(), f"message {message!r} lacks {case.says!r}"
    refs_after = [stack.api.get(p)["refs"] for p in
                  (f"/attach/rbd/{base.rbd}", f"/mount/rbd/{base.mnt}",
                   f"/mount/overlay/{base.ovl}")]
    assert refs_after == refs_before, "a refused request changed reference counts"


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40
