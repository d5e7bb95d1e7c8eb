"""What every rbd attach driver shares: the request (validation, the rbd_options and their
types), the identity an attachment claims, and how an attachment is shown.

The drivers (`rbd_krbd`: the kernel's rbd module; `rbd_user`: librbd behind FUSE and a loop
device) differ only in how an image becomes a block device; `rbd_attach` picks one.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import uuid
from collections.abc import Callable, Hashable
from typing import Any

from imageapi.drivers import checks
from imageapi.drivers.base import Driver, Node, Spec
from imageapi.errors import (
    ApiError,
    BadRequest,
    Conflict,
    SystemFault,
    describe_oserror,
    errno_name,
)

FLAG, INT, TEXT = "flag", "int", "text"

# Every option of rbd_options, by type; what each means to a driver is the driver's.
OPTION_TYPES: dict[str, str] = {
    "name": TEXT, "secret": TEXT, "fsid": TEXT, "ip": TEXT, "namespace": TEXT,
    "share": FLAG, "noshare": FLAG, "crc": FLAG, "nocrc": FLAG,
    "ceph_requires_signatures": FLAG, "noceph_requires_signatures": FLAG,
    "tcp_nodelay": FLAG, "notcp_nodelay": FLAG, "cephx_sign_messages": FLAG,
    "nocephx_sign_messages": FLAG, "abort_on_full": FLAG, "mount_timeout": INT,
    "osdkeepalive": INT, "osd_idle_ttl": INT, "ro": FLAG, "rw": FLAG, "lock_on_read": FLAG,
    "exclusive": FLAG, "notrim": FLAG, "queue_depth": INT, "lock_timeout": INT,
    "alloc_size": INT, "force": FLAG,
}  # fmt: skip
# Options that are not part of the map request but of the unmap.
UNMAP_ONLY = {"force"}
OPPOSITES = [
    ("share", "noshare"),
    ("crc", "nocrc"),
    ("ceph_requires_signatures", "noceph_requires_signatures"),
    ("tcp_nodelay", "notcp_nodelay"),
    ("cephx_sign_messages", "nocephx_sign_messages"),
    ("ro", "rw"),
]
WRITE_ONLY = {"secret"}
MIN_INT = {"queue_depth": 1, "alloc_size": 512}
# What the API shows of a driver's record.
SHOWN = ("device_id", "device_file")

Identity = tuple[str, str, str, str]  # pool, namespace, image, snapshot ("-": the head)


class RbdBase(Driver):
    """The API side of an rbd attachment, whichever driver maps it."""

    collection = "attach"
    kind = "rbd"
    noun = "rbd"
    claimed_as = "mapped"

    def normalize(self, spec: Spec) -> Spec:
        monitors = spec.get("monitors")
        if not isinstance(monitors, list) or not monitors:
            raise BadRequest("monitors: at least one monitor address is required")
        mons = [_ipv4(m, f"monitors[{i}]") for i, m in enumerate(monitors)]
        out: Spec = {
            "monitors": mons,
            "pool": checks.plain_name(spec.get("pool"), "pool"),
            "image": checks.plain_name(spec.get("image"), "image"),
        }
        if spec.get("snapshot") not in (None, ""):
            out["snapshot"] = checks.plain_name(spec["snapshot"], "snapshot")
            if out["snapshot"] == "-":
                raise BadRequest("snapshot: '-' names the image head; leave snapshot out")
        out["options"] = _options(spec.get("options") or {})
        return out

    def claim(self, spec: Spec) -> Hashable:
        return identity(spec)

    def describe_claim(self, claim: Hashable) -> str:
        return describe(claim)  # type: ignore[arg-type]

    def recordable_spec(self, spec: Spec) -> Spec:
        return {**spec, "options": {k: v for k, v in spec["options"].items()
                                    if k not in WRITE_ONLY}}

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        spec = node.spec
        view: dict[str, Any] = {"id": node.id, "monitors": list(spec["monitors"])}
        view["pool"] = spec["pool"]
        view["image"] = spec["image"]
        if "snapshot" in spec:
            view["snapshot"] = spec["snapshot"]
        view["options"] = {k: v for k, v in spec["options"].items() if k not in WRITE_ONLY}
        view.update({k: node.record[k] for k in SHOWN if k in node.record})
        return view


def identity(spec: Spec) -> Identity:
    ns = spec["options"].get("namespace", "")
    return (spec["pool"], ns, spec["image"], spec.get("snapshot", "-"))


def describe(claim: Identity) -> str:
    pool, ns, image, snap = claim
    where = f"{pool}/{ns}/" if ns else f"{pool}/"
    return f"image {where}{image}" + (f"@{snap}" if snap != "-" else "")


def read_only(spec: Spec) -> bool:
    """A snapshot is always read-only; otherwise `ro` (both drivers map read-write without)."""
    return "snapshot" in spec or bool(spec["options"].get("ro"))


def map_error(code: int, spec: Spec, detail: str = "") -> ApiError:
    """The API's answer to a failed map, from the errno the kernel or librbd gave."""
    image = describe(identity(spec))
    name = errno_name(code)
    more = f" ({detail})" if detail else ""
    if code == errno.ENOENT:
        return BadRequest(f"ENOENT: {image} not found in the cluster (pool, image or "
                          f"snapshot){more}")
    if code in (errno.EPERM, errno.EACCES):
        user = spec["options"].get("name")
        return BadRequest(f"{name}: the cluster refused the key of client {user!r}{more}")
    if code == errno.EINVAL:
        return BadRequest(f"EINVAL: the map request for {image} was rejected{more}")
    if code in (errno.EBUSY, errno.EEXIST):
        return Conflict(f"{name}: {image} cannot be mapped{more}")
    if code == errno.ETIMEDOUT:
        mons = ", ".join(spec["monitors"])
        return SystemFault(f"ETIMEDOUT: the cluster did not answer ({mons}){more}")
    return SystemFault(describe_oserror(OSError(code, detail or "map failed"),
                                        f"cannot map {image}"))


def _options(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest("options: must be an object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        field = f"options.{key}"
        kind = OPTION_TYPES.get(key)
        if kind is None:
            raise BadRequest(f"{field}: unknown rbd option")
        if kind == FLAG:
            out[key] = _bool(value, field)
        elif kind == INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"{field}: must be an integer")
            too_big = value > 2**31 - 1 and key != "lock_timeout"
            if value < MIN_INT.get(key, 0) or too_big:
                raise BadRequest(f"{field}: {value} is out of range")
            out[key] = value
        else:
            out[key] = _text_option(key, value, field)
    for a, b in OPPOSITES:
        if out.get(a) and out.get(b):
            raise BadRequest(f"options: {a} and {b} contradict each other")
    for required in ("name", "secret"):
        if not out.get(required):
            raise BadRequest(f"options.{required}: required to map an rbd image")
    return out


def _text_option(key: str, value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field}: must be a non-empty string")
    if key == "secret":
        try:
            if not base64.b64decode(value, validate=True):
                raise ValueError
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field}: must be a base64 key (as in a ceph keyring)") from None
        return value
    if key == "fsid":
        try:
            return str(uuid.UUID(value)) if len(value) == 36 else _bad_fsid(field)
        except ValueError:
            return _bad_fsid(field)
    if key == "ip":
        return _ipv4(value, field)
    return checks.plain_name(value, field)


def _bad_fsid(field: str) -> str:
    raise BadRequest(f"{field}: must be a cluster fsid (a UUID like 4bc8e219-dd58-473f-...)")


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field}: must be true or false")
    return value


def _ipv4(value: object, field: str) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            pass
    raise BadRequest(f"{field}: {value!r} is not an IPv4 address")
