"""Attach (map) a Ceph RBD image through the kernel's rbd driver.

The request becomes one krbd "add" string; every rbd_option that is set becomes the krbd or
libceph option of the same meaning. Values are checked against allow-lists first, so a
rejected request writes nothing to sysfs.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from imageapi.drivers import checks
from imageapi.drivers.base import Driver, Node, Spec, State
from imageapi.errors import BadRequest, Conflict, SystemFault, describe_oserror, errno_name
from imageapi.journal import Intent
from imageapi.kernel.krbd import Krbd, KrbdUnavailable

log = logging.getLogger(__name__)

FLAG, INT, TEXT = "flag", "int", "text"

# API option -> (krbd word, type). Order here is the order in the add string.
OPTIONS: dict[str, tuple[str, str]] = {
    "name": ("name", TEXT),
    "secret": ("secret", TEXT),
    "fsid": ("fsid", TEXT),
    "ip": ("ip", TEXT),
    "namespace": ("_pool_ns", TEXT),
    "share": ("share", FLAG),
    "noshare": ("noshare", FLAG),
    "crc": ("crc", FLAG),
    "nocrc": ("nocrc", FLAG),
    "ceph_requires_signatures": ("cephx_require_signatures", FLAG),
    "noceph_requires_signatures": ("nocephx_require_signatures", FLAG),
    "tcp_nodelay": ("tcp_nodelay", FLAG),
    "notcp_nodelay": ("notcp_nodelay", FLAG),
    "cephx_sign_messages": ("cephx_sign_messages", FLAG),
    "nocephx_sign_messages": ("nocephx_sign_messages", FLAG),
    "abort_on_full": ("abort_on_full", FLAG),
    "mount_timeout": ("mount_timeout", INT),
    "osdkeepalive": ("osdkeepalive", INT),
    "osd_idle_ttl": ("osd_idle_ttl", INT),
    "ro": ("ro", FLAG),
    "rw": ("rw", FLAG),
    "lock_on_read": ("lock_on_read", FLAG),
    "exclusive": ("exclusive", FLAG),
    "notrim": ("notrim", FLAG),
    "queue_depth": ("queue_depth", INT),
    "lock_timeout": ("lock_timeout", INT),
    "alloc_size": ("alloc_size", INT),
}
# Options that are not part of the map request.
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


class RbdAttach(Driver):
    collection = "attach"
    kind = "rbd"
    noun = "rbd"
    claimed_as = "mapped"

    def __init__(self, sysfs: Path, dev_dir: Path, device_timeout: float) -> None:
        self.krbd = Krbd(sysfs)
        self.dev_dir = dev_dir
        self.device_timeout = device_timeout
        self._adopted: set[int] = set()  # device ids found in the record at recovery

    # -- checking ----------------------------------------------------------------------------

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
        return _identity(spec)

    def describe_claim(self, claim: Hashable) -> str:
        pool, ns, image, snap = claim  # type: ignore[misc]
        where = f"{pool}/{ns}/" if ns else f"{pool}/"
        return f"image {where}{image}" + (f"@{snap}" if snap != "-" else "")

    def check_available(self, spec: Spec) -> None:
        want = _identity(spec)
        for dev_id in sorted(self.krbd.device_ids()):
            if _identity_of(self.krbd.identity(dev_id)) == want:
                raise Conflict(
                    f"{self.describe_claim(want)} is already mapped as "
                    f"{self.dev_dir / f'rbd{dev_id}'} (outside imageapi)"
                )

    # -- kernel work -------------------------------------------------------------------------

    def build(self, node: Node) -> State:
        spec = node.spec
        pool, ns, image, snap = _identity(spec)
        with self.step(node.id, "rbd-map", pool=pool, namespace=ns, image=image,
                       snapshot=snap) as step:
            before = self.krbd.device_ids()
            try:
                self.krbd.add(add_request(spec))
            except KrbdUnavailable as exc:
                raise SystemFault(describe_oserror(exc, "cannot map rbd images")) from exc
            except OSError as exc:
                raise _map_error(exc, spec, self.describe_claim(_identity(spec))) from exc
            dev_id = self._find_new_device(before, _identity(spec))
            step.done(device_id=dev_id)
        device = self.dev_dir / f"rbd{dev_id}"
        try:
            _wait_for_block_node(device, self.device_timeout)
        except SystemFault:
            self._unmap_quietly(dev_id)
            raise
        log.info("mapped %s as %s", self.describe_claim(_identity(spec)), device)
        return {"device_id": dev_id, "device_file": str(device)}

    def recordable_spec(self, spec: Spec) -> Spec:
        return {**spec, "options": {k: v for k, v in spec["options"].items()
                                    if k not in WRITE_ONLY}}

    def _maps(self, dev_id: int, identity: tuple[str, ...]) -> bool:
        """Whether device `dev_id` still maps that image (ids are reused after an unmap)."""
        return _identity_of(self.krbd.identity(dev_id)) == identity

    def adopt(self, node: Node) -> str | None:
        dev_id = node.record["device_id"]
        if not self._maps(dev_id, _identity(node.spec)):
            return f"rbd{dev_id} no longer maps {self.describe_claim(_identity(node.spec))}"
        self._adopted.add(dev_id)
        return None

    def sweep_orphans(self, recorded: set[str], unmounted: list[str]) -> list[str]:
        """Devices that were mounted under our mount dir with nothing recording them: after a
        lost record, what the mounts said is all that names them."""
        done = []
        for source in unmounted:
            name = Path(source).name
            if Path(source).parent != self.dev_dir or not name.startswith("rbd") \
                    or not name[3:].isdigit() or int(name[3:]) in self._adopted \
                    or source in recorded:
                continue
            try:
                _retry_busy(lambda n=int(name[3:]): self.krbd.remove(n))
                done.append(f"rbd mapping {source}")
            except OSError as exc:
                log.error("recovery: cannot unmap %s: %s", source, exc)
        return done

    def undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> str | None:
        if intent.effect != "rbd-map":
            return None
        d = intent.detail
        want = (d["pool"], d["namespace"], d["image"], d["snapshot"])
        for dev_id in sorted(self.krbd.device_ids()):
            if held("device_id", dev_id) or not self._maps(dev_id, want):
                continue
            # Mapped for an object that was never committed: no one else can have it (the
            # claim on the image was ours), so it is ours to unmap.
            self.krbd.remove(dev_id)
            return f"unmapped rbd{dev_id} ({self.describe_claim(want)})"
        return None

    def _find_new_device(self, before: set[int], want: tuple[str, ...]) -> int:
        for dev_id in sorted(self.krbd.device_ids() - before):
            if _identity_of(self.krbd.identity(dev_id)) == want:
                return dev_id
        raise SystemFault("the kernel accepted the map request but no new rbd device appeared")

    def _unmap_quietly(self, dev_id: int) -> None:
        try:
            self.krbd.remove(dev_id)
        except OSError as exc:
            log.error("could not unmap rbd%d after a failed attach: %s", dev_id, exc)

    def destroy(self, node: Node, force: bool = False) -> None:
        dev_id = node.record["device_id"]
        # krbd's own "force": unmap even while the device is open outside imageapi.
        force = force or bool(node.spec["options"].get("force"))
        if not self._maps(dev_id, _identity(node.spec)):
            log.warning("rbd%d was already unmapped outside imageapi", dev_id)
            return
        with self.step(node.id, "rbd-unmap", device_id=dev_id):
            try:
                _retry_busy(lambda: self.krbd.remove(dev_id, force=force))
            except OSError as exc:
                if exc.errno == errno.ENOENT and not isinstance(exc, KrbdUnavailable):
                    log.warning("rbd%d was already unmapped outside imageapi", dev_id)
                    return
                what = f"cannot unmap {node.record['device_file']}"
                if exc.errno == errno.EBUSY:
                    raise Conflict(describe_oserror(exc, what + " (mounted or open)")) from exc
                raise SystemFault(describe_oserror(exc, what)) from exc
        log.info("unmapped %s", node.record["device_file"])

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        spec = node.spec
        view: dict[str, Any] = {"id": node.id, "monitors": list(spec["monitors"])}
        view["pool"] = spec["pool"]
        view["image"] = spec["image"]
        if "snapshot" in spec:
            view["snapshot"] = spec["snapshot"]
        view["options"] = {k: v for k, v in spec["options"].items() if k not in WRITE_ONLY}
        view.update(node.record)
        return view


def add_request(spec: Spec) -> str:
    """The string the kernel's rbd_add parses: "<mons> <options> <pool> <image> [<snap>]"."""
    opts = spec["options"]
    words = []
    for api_name, (word, kind) in OPTIONS.items():
        if api_name not in opts:
            continue
        value = opts[api_name]
        if kind == FLAG:
            if value:
                words.append(word)
        else:
            words.append(f"{word}={value}")
    fields = [",".join(spec["monitors"]), ",".join(words), spec["pool"], spec["image"]]
    if "snapshot" in spec:
        fields.append(spec["snapshot"])
    return " ".join(fields)


def _options(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest("options: must be an object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        field = f"options.{key}"
        if key in UNMAP_ONLY:
            out[key] = _bool(value, field)
            continue
        if key not in OPTIONS:
            raise BadRequest(f"{field}: unknown rbd option")
        kind = OPTIONS[key][1]
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


def _identity(spec: Spec) -> tuple[str, str, str, str]:
    ns = spec["options"].get("namespace", "")
    return (spec["pool"], ns, spec["image"], spec.get("snapshot", "-"))


def _identity_of(attrs: dict[str, str] | None) -> tuple[str, ...] | None:
    if attrs is None:
        return None
    return (attrs["pool"], attrs["pool_ns"], attrs["name"], attrs["current_snap"])


def _map_error(exc: OSError, spec: Spec, image: str) -> Exception:
    name = errno_name(exc.errno)
    code = exc.errno
    if code == errno.ENOENT:
        return BadRequest(f"ENOENT: {image} not found in the cluster (pool, image or snapshot)")
    if code in (errno.EPERM, errno.EACCES):
        user = spec["options"].get("name")
        return BadRequest(f"{name}: the cluster refused the key of client {user!r}")
    if code == errno.EINVAL:
        return BadRequest(f"EINVAL: the kernel rejected the map request for {image}")
    if code in (errno.EBUSY, errno.EEXIST):
        return Conflict(f"{name}: the kernel refused to map {image}: {exc.strerror}")
    if code == errno.ETIMEDOUT:
        mons = ", ".join(spec["monitors"])
        return SystemFault(f"ETIMEDOUT: no monitor answered ({mons})")
    return SystemFault(describe_oserror(exc, f"cannot map {image}"))


def _retry_busy(action: Callable[[], None], patience: float = 2.0) -> None:
    """Run `action`, retrying a short while on EBUSY.

    A container that is starting holds copies of every host mount in its new mount namespace
    for the few milliseconds until it pivots into its image; a device unmounted on the host in
    that window stays busy until then.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            action()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _wait_for_block_node(device: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            if stat.S_ISBLK(os.stat(device).st_mode):
                return
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            raise SystemFault(f"ETIMEDOUT: {device} did not appear within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
