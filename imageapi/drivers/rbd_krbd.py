"""The krbd driver: map a Ceph RBD image through the kernel's rbd module (`/sys/bus/rbd`).

The request becomes one krbd "add" string; every rbd_option that is set becomes the krbd or
libceph option of the same meaning (`WORDS`). Values are checked against allow-lists first
(`rbd_spec`), so a rejected request writes nothing to sysfs.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageapi.drivers.base import Node, Spec, State
from imageapi.drivers.rbd_spec import FLAG, OPTION_TYPES, RbdBase, describe, identity, map_error
from imageapi.errors import (
    ApiError,
    BadRequest,
    Conflict,
    SystemFault,
    describe_oserror,
    errno_name,
)
from imageapi.journal import Intent
from imageapi.kernel.krbd import Krbd, KrbdUnavailable

log = logging.getLogger(__name__)

# API option -> krbd (or libceph) word. Order here is the order in the add string.
WORDS: dict[str, str] = {
    "name": "name",
    "secret": "secret",
    "fsid": "fsid",
    "ip": "ip",
    "namespace": "_pool_ns",
    "share": "share",
    "noshare": "noshare",
    "crc": "crc",
    "nocrc": "nocrc",
    "ceph_requires_signatures": "cephx_require_signatures",
    "noceph_requires_signatures": "nocephx_require_signatures",
    "tcp_nodelay": "tcp_nodelay",
    "notcp_nodelay": "notcp_nodelay",
    "cephx_sign_messages": "cephx_sign_messages",
    "nocephx_sign_messages": "nocephx_sign_messages",
    "abort_on_full": "abort_on_full",
    "mount_timeout": "mount_timeout",
    "osdkeepalive": "osdkeepalive",
    "osd_idle_ttl": "osd_idle_ttl",
    "ro": "ro",
    "rw": "rw",
    "lock_on_read": "lock_on_read",
    "exclusive": "exclusive",
    "notrim": "notrim",
    "queue_depth": "queue_depth",
    "lock_timeout": "lock_timeout",
    "alloc_size": "alloc_size",
}  # "force" is a word of the unmap


class KrbdAttach(RbdBase):
    """Mappings made by the kernel: the record names the rbd device (`device_id` N of
    /dev/rbdN), which sysfs identifies by pool, namespace, image and snapshot."""

    def __init__(self, sysfs: Path, dev_dir: Path, device_timeout: float) -> None:
        self.krbd = Krbd(sysfs)
        self.dev_dir = dev_dir
        self.device_timeout = device_timeout
        self._adopted: set[int] = set()  # device ids found in the record at recovery

    # -- checking ----------------------------------------------------------------------------

    def check_available(self, spec: Spec) -> None:
        want = identity(spec)
        for dev_id in sorted(self.krbd.device_ids()):
            if _identity_of(self.krbd.identity(dev_id)) == want:
                raise Conflict(
                    f"{self.describe_claim(want)} is already mapped as "
                    f"{self.dev_dir / f'rbd{dev_id}'} (outside imageapi)"
                )

    # -- kernel work -------------------------------------------------------------------------

    def build(self, node: Node) -> State:
        spec = node.spec
        pool, ns, image, snap = identity(spec)
        before = self.krbd.device_ids()
        # `before`: the devices that are not ours to undo, whatever they map.
        with self.step(node.id, "rbd-map", pool=pool, namespace=ns, image=image,
                       snapshot=snap, before=sorted(before)) as step:
            try:
                self.krbd.add(add_request(spec))
            except KrbdUnavailable as exc:
                raise SystemFault(describe_oserror(exc, "cannot map rbd images")) from exc
            except OSError as exc:
                raise _map_error(exc, spec, describe(identity(spec))) from exc
            dev_id = self._find_new_device(before, identity(spec))
            step.done(device_id=dev_id)
        device = self.dev_dir / f"rbd{dev_id}"
        try:
            _wait_for_block_node(device, self.device_timeout)
        except SystemFault:
            self._unmap_quietly(dev_id)
            raise
        log.info("mapped %s as %s", describe(identity(spec)), device)
        return {"device_id": dev_id, "device_file": str(device)}

    def _maps(self, dev_id: int, want: tuple[str, ...]) -> bool:
        """Whether device `dev_id` still maps that image (ids are reused after an unmap)."""
        return _identity_of(self.krbd.identity(dev_id)) == want

    def adopt(self, node: Node) -> str | None:
        dev_id = node.record["device_id"]
        if not self._maps(dev_id, identity(node.spec)):
            return f"rbd{dev_id} no longer maps {self.describe_claim(identity(node.spec))}"
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
        if intent.outcome and "device_id" in intent.outcome:
            candidates = [intent.outcome["device_id"]]
        else:  # it died in the write: a new device of that image, if any
            before = set(d.get("before", []))
            candidates = sorted(self.krbd.device_ids() - before)
        for dev_id in candidates:
            if held("device_id", dev_id) or not self._maps(dev_id, want):
                continue
            # Mapped for an object that was never committed (the claim on the image was
            # ours while it was made): ours to unmap.
            _retry_busy(lambda n=dev_id: self.krbd.remove(n))
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
        if not self._maps(dev_id, identity(node.spec)):
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


def add_request(spec: Spec) -> str:
    """The string the kernel's rbd_add parses: "<mons> <options> <pool> <image> [<snap>]"."""
    opts = spec["options"]
    words = []
    for api_name, word in WORDS.items():
        if api_name not in opts:
            continue
        value = opts[api_name]
        if OPTION_TYPES[api_name] == FLAG:
            if value:
                words.append(word)
        else:
            words.append(f"{word}={value}")
    fields = [",".join(spec["monitors"]), ",".join(words), spec["pool"], spec["image"]]
    if "snapshot" in spec:
        fields.append(spec["snapshot"])
    return " ".join(fields)


def _identity_of(attrs: dict[str, str] | None) -> tuple[str, ...] | None:
    if attrs is None:
        return None
    return (attrs["pool"], attrs["pool_ns"], attrs["name"], attrs["current_snap"])


def _map_error(exc: OSError, spec: Spec, image: str) -> ApiError:
    code = exc.errno or 0
    if code in (errno.ENOENT, errno.EPERM, errno.EACCES):
        return map_error(code, spec)
    name = errno_name(code)
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
