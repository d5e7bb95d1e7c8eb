"""The user-space rbd driver, for kernels without krbd: librbd behind a FUSE file, a loop
device over it.

    /dev/loopN ──> <run_dir>/rbd/<id>/fs/image (FUSE) ──> imageapi-rbd server ──> librbd

Each mapping has a server process of its own (`imageapi.rbdfuse.server`): one client session,
one image; it outlives the daemon and is found again through its socket (`rbdfuse.client`).
The loop device is bound without autoclear and tagged (`imageapi-rbd <digest>`), like a
loopback attachment's, so recovery recognises it. A read-only or snapshot mapping opens the
image read-only (at the snapshot) and never writes to the cluster; its loop device reads
through the page cache, whose readahead makes sequential reads fast. A read-write one uses
direct I/O all the way down, so a flush reaches librbd.

Options (rbd_options) for this driver — the same meaning where librados has one:
- name, secret: the cephx user and its key (handed to the server over its socket only);
  namespace, snapshot, ro/rw as for krbd; fsid: checked against the cluster's.
- mount_timeout (default 10 s here): librados' client_mount_timeout and rados_mon_op_timeout,
  and the bound of the whole attach (connect, open, lock, mount).
- crc/nocrc: ms_crc_data; ceph_requires_signatures: cephx_require_signatures;
  tcp_nodelay: ms_tcp_nodelay; cephx_sign_messages: cephx_sign_messages;
  osdkeepalive: objecter_tick_interval (how often stuck OSD requests are pinged);
  osd_idle_ttl: ms_connection_idle_timeout; alloc_size: rbd_discard_granularity_bytes.
- exclusive: the exclusive lock is taken at attach and kept (lock_timeout, in ms, adds to the
  attach's time budget); abort_on_full: ENOSPC instead of blocking on a full pool (full-try);
  notrim: discard and write-zeroes are refused; queue_depth: requests the kernel keeps in
  flight to the server (FUSE max_background; default 32); force (detach): detach even while
  something outside imageapi holds the device (its I/O then fails).
- share: ignored (logged): every user-space mapping has a client of its own.
- ip and lock_on_read are refused (400): librados picks the client's address itself, and
  librbd takes the exclusive lock for writes only.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageapi.drivers.base import Node, Spec, State
from imageapi.drivers.rbd_spec import RbdBase, describe, identity, map_error, read_only
from imageapi.errors import BadRequest, Conflict, SystemFault, describe_oserror
from imageapi.journal import Intent
from imageapi.kernel.loop import Loop, LoopDevice
from imageapi.rbdfuse import bindings, client

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10
DEFAULT_QUEUE_DEPTH = 32
REFUSED = {
    "ip": "librados chooses the client's address itself",
    "lock_on_read": "librbd takes the exclusive lock for writes only",
}
IGNORED = {"share": "every user-space mapping has a client of its own"}
# rbd_option -> (librados/librbd option, value when true) for flags; ints map to one option.
CONF_FLAGS = {
    "crc": ("ms_crc_data", "true"), "nocrc": ("ms_crc_data", "false"),
    "ceph_requires_signatures": ("cephx_require_signatures", "true"),
    "noceph_requires_signatures": ("cephx_require_signatures", "false"),
    "tcp_nodelay": ("ms_tcp_nodelay", "true"), "notcp_nodelay": ("ms_tcp_nodelay", "false"),
    "cephx_sign_messages": ("cephx_sign_messages", "true"),
    "nocephx_sign_messages": ("cephx_sign_messages", "false"),
}  # fmt: skip
CONF_INTS = {
    "osdkeepalive": "objecter_tick_interval",
    "osd_idle_ttl": "ms_connection_idle_timeout",
    "alloc_size": "rbd_discard_granularity_bytes",
}
# librbd's bounds for rbd_discard_granularity_bytes.
ALLOC_MIN, ALLOC_MAX = 4096, 32 << 20
# A busy stop (the loop device's release not through yet) is tried again this long.
BUSY_PATIENCE = 5.0


def tag_for(run_dir: Path) -> str:
    """What marks this run directory's user-space rbd loop devices (not a prefix of the
    loopback driver's tag, `imageapi <digest>`, so neither sweeps the other's)."""
    digest = hashlib.sha256(os.fsencode(run_dir.resolve())).hexdigest()[:16]
    return f"imageapi-rbd {digest}"


class UserRbdAttach(RbdBase):
    def __init__(self, run_dir: Path, loop: Loop | None = None) -> None:
        self.root = run_dir / "rbd"
        self.loop = loop or Loop()
        self.tag = tag_for(run_dir)
        self._devices: set[int] = set()  # loop numbers of live mappings (built or adopted)
        self.bindings_from = ""

    def availability(self) -> str | None:
        """None when mappings can be made here, else why not (for the startup log)."""
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing (modprobe fuse)"
        try:
            where = bindings.locate()
        except bindings.BindingsMissing as exc:
            return str(exc)
        self.bindings_from = ", ".join(sorted(set(where.values())))
        return None

    # -- checking ----------------------------------------------------------------------------

    def check_options(self, spec: Spec) -> None:
        opts = spec["options"]
        for key, why in REFUSED.items():
            if opts.get(key):
                raise BadRequest(f"options.{key}: not supported by the user-space rbd driver "
                                 f"({why})")
        size = opts.get("alloc_size")
        if size is not None and (size & (size - 1) or not ALLOC_MIN <= size <= ALLOC_MAX):
            raise BadRequest(f"options.alloc_size: {size} must be a power of two from "
                             f"{ALLOC_MIN} to {ALLOC_MAX} for the user-space rbd driver")
        if opts.get("mount_timeout") == 0:
            raise BadRequest("options.mount_timeout: must be at least 1 s for the user-space "
                             "rbd driver")

    # -- building ----------------------------------------------------------------------------

    def build(self, node: Node) -> State:
        spec = node.spec
        opts = spec["options"]
        ro = read_only(spec)
        directory = self.root / str(node.id)
        self.root.mkdir(mode=0o700, exist_ok=True)
        timeout = self._timeout(spec)
        for key, why in IGNORED.items():
            if opts.get(key):
                log.info("rbd %d: options.%s ignored: %s", node.id, key, why)
        pool, ns, image, snap = identity(spec)
        with self.step(node.id, "rbd-fuse-start", dir=str(directory), pool=pool,
                       namespace=ns, image=image, snapshot=snap) as step:
            try:
                started = client.start(directory, self._request(spec, ro, timeout), timeout)
            except client.ServerError as exc:
                if exc.local:
                    name = errno.errorcode.get(exc.errno, "EIO")
                    raise SystemFault(f"{name}: cannot map {describe(identity(spec))} here: "
                                      f"{exc.message}") from exc
                raise map_error(exc.errno, spec, exc.message) from exc
            step.done(pid=started.pid, start=started.start_time)
        status = started.status
        try:
            device = self._attach_loop(node.id, status, ro, spec)
        except BaseException:
            self._stop_quietly(directory, started.pid, started.start_time)
            raise
        node.live["device"] = device
        self._devices.add(device.number)
        log.info("mapped %s as %s through librbd %s (FUSE server %d, %s)", describe(
            identity(spec)), device.path, status.get("librbd"), started.pid,
            "read-only, page cache" if ro else "read-write, direct I/O")  # fmt: skip
        return {"device_id": device.number, "device_file": device.path,
                "number": device.number, "backing": list(device.backing),
                "dir": str(directory), "pid": started.pid, "start": started.start_time}

    def _attach_loop(self, node_id: int, status: dict[str, Any], ro: bool,
                     spec: Spec) -> LoopDevice:
        path = status["file"]
        try:
            backing_fd = os.open(path, (os.O_RDONLY if ro else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise SystemFault(describe_oserror(exc, f"cannot open {path}")) from exc
        try:
            with self.step(node_id, "rbd-loop-attach", dir=str(Path(path).parent.parent),
                           backing=status["backing"]) as step:
                device = self.loop.attach(
                    backing_fd, read_only=ro, direct_io=not ro, autoclear=False, tag=self.tag,
                    name=f"rbd:{spec['pool']}/{spec['image']}",
                )  # fmt: skip
                step.done(number=device.number)
        except OSError as exc:
            raise SystemFault(describe_oserror(exc, f"cannot attach a loop device to {path}")
                              ) from exc
        finally:
            os.close(backing_fd)
        return device

    def _timeout(self, spec: Spec) -> int:
        opts = spec["options"]
        timeout = int(opts.get("mount_timeout") or DEFAULT_TIMEOUT)
        if opts.get("exclusive") and opts.get("lock_timeout"):
            timeout += max(1, int(opts["lock_timeout"]) // 1000)
        return timeout

    def _request(self, spec: Spec, ro: bool, timeout: int) -> dict[str, Any]:
        opts = spec["options"]
        # A punched range must read back as zeroes, as a discarded block device range does.
        conf = {"rbd_skip_partial_discard": "false"}
        for key, (option, value) in CONF_FLAGS.items():
            if opts.get(key):
                conf[option] = value
        for key, option in CONF_INTS.items():
            if key in opts:
                conf[option] = str(opts[key])
        return {
            "monitors": list(spec["monitors"]), "pool": spec["pool"],
            "namespace": opts.get("namespace", ""), "image": spec["image"],
            "snapshot": spec.get("snapshot", ""), "read_only": ro, "name": opts["name"],
            "key": opts["secret"], "timeout": timeout, "conf": conf,
            "fsid": opts.get("fsid", ""), "exclusive": bool(opts.get("exclusive")),
            "abort_on_full": bool(opts.get("abort_on_full")),
            "notrim": bool(opts.get("notrim")),
            "queue_depth": int(opts.get("queue_depth", DEFAULT_QUEUE_DEPTH)),
        }  # fmt: skip

    # -- tearing down ------------------------------------------------------------------------

    def destroy(self, node: Node, force: bool = False) -> None:
        record = node.record
        force = force or bool(node.spec["options"].get("force"))
        device: LoopDevice | None = node.live.get("device")
        if device is None:
            # Not held by this process (gone at recovery, or not checked in its time): clear
            # it by its record, if it is still bound to that very file.
            backing = (record["backing"][0], record["backing"][1])
            with self.step(node.id, "rbd-loop-detach", number=record["number"]):
                if not self.loop.clear(record["number"], backing, self.tag):
                    log.warning("%s was already detached outside imageapi",
                                record["device_file"])
        else:
            try:
                with self.step(node.id, "rbd-loop-detach", number=device.number):
                    unbound = self.loop.detach(device)
            except OSError as exc:
                what = f"cannot detach {device.path}"
                if exc.errno == errno.EBUSY and not force:
                    raise Conflict(describe_oserror(exc, what + " (mounted or open outside "
                                                    "imageapi)")) from exc
                if exc.errno != errno.EBUSY:
                    raise SystemFault(describe_oserror(exc, what)) from exc
                self.loop.clear(device.number, device.backing, self.tag)  # at its last close
                unbound = False
            node.live.pop("device", None)
            self._devices.discard(device.number)
            if not unbound:
                log.warning("%s is still open outside imageapi: it is unbound when that user "
                            "closes it", device.path)
        directory = Path(record["dir"])
        with self.step(node.id, "rbd-fuse-stop", dir=str(directory), pid=record["pid"]):
            self._stop(directory, record["pid"], record["start"], force)
        log.info("unmapped %s (%s)", record["device_file"], describe(identity(node.spec)))

    def _stop(self, directory: Path, pid: int, start: int, force: bool) -> None:
        deadline = time.monotonic() + BUSY_PATIENCE
        while True:
            try:
                client.stop(directory, pid, start, force=force)
                return
            except client.ServerBusy:
                # The loop device lets go of the file at its last close: a moment, or never
                # (someone outside imageapi keeps it open; then its I/O fails from now on).
                if time.monotonic() >= deadline:
                    log.warning("%s is still in use after the detach: dropping it", directory)
                    force = True
                time.sleep(0.05)
            except client.ServerError as exc:
                raise SystemFault(f"{errno.errorcode.get(exc.errno, 'EIO')}: cannot stop the "
                                  f"FUSE server in {directory}: {exc.message}") from exc

    def _stop_quietly(self, directory: Path, pid: int, start: int) -> None:
        try:
            client.stop(directory, pid, start, force=True)
        except client.ServerError as exc:
            log.error("could not stop the FUSE server in %s after a failed attach: %s",
                      directory, exc.message)
            client.kill(pid, start)
            client.cleanup(directory)

    # -- recovery ----------------------------------------------------------------------------

    def adopt(self, node: Node) -> str | None:
        record = node.record
        directory = Path(record["dir"])
        status = client.hello(directory)
        if status is None or status.get("pid") != record["pid"]:
            return f"its FUSE server ({directory}) is gone"
        pool, ns, image, snap = identity(node.spec)
        if (status["pool"], status["namespace"], status["image"], status["snapshot"] or "-") \
                != (pool, ns, image, snap):
            return f"the FUSE server in {directory} serves another image"
        backing = (record["backing"][0], record["backing"][1])
        device = self.loop.adopt(record["number"], backing, read_only(node.spec), self.tag)
        if device is None:
            return f"{record['device_file']} is no longer bound to its FUSE file"
        node.live["device"] = device
        self._devices.add(device.number)
        return None

    def undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> str | None:
        detail = intent.detail
        if intent.effect == "rbd-loop-attach":
            backing = (detail["backing"][0], detail["backing"][1])
            numbers = [intent.outcome["number"]] if intent.outcome and "number" in \
                intent.outcome else [int(b.name[4:]) for b in self.loop.bindings()
                                     if b.backing == backing]
            for number in numbers:
                if not held("number", number) and self.loop.clear(number, backing, self.tag):
                    return f"detached /dev/loop{number} from {detail['dir']}"
            return None
        if intent.effect == "rbd-fuse-start":
            if held("dir", detail["dir"]):
                return None
            return self._end_server(Path(detail["dir"]))
        return None

    def sweep_orphans(self, recorded: set[str], unmounted: list[str]) -> list[str]:
        """Tagged loop devices and server directories that no record holds."""
        done = []
        for number, backing in self.loop.tagged(self.tag):
            if number in self._devices or f"/dev/loop{number}" in recorded:
                continue
            if self.loop.clear(number, backing, self.tag):
                done.append(f"loop device /dev/loop{number}")
        if self.root.is_dir():
            for directory in sorted(self.root.iterdir()):
                if str(directory) not in recorded:
                    what = self._end_server(directory)
                    if what:
                        done.append(what)
        return done

    def _end_server(self, directory: Path) -> str | None:
        status = client.hello(directory)
        if status is None:
            if not directory.exists():
                return None
            client.cleanup(directory)
            return f"directory {directory}"
        pid = int(status["pid"])
        start = client.start_time(pid) or 0
        try:
            client.stop(directory, pid, start, force=True)
        except client.ServerError:
            client.kill(pid, start)
            client.cleanup(directory)
        return f"FUSE server {pid} ({directory})"
