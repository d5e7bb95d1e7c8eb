"""Attach an image file of the host as a loop device (`/dev/loopN`).

The loop device is set up with autoclear and held open by the daemon for as long as the
attachment exists (see `imageapi.kernel.loop`): detaching closes it, and the kernel unbinds the
device when its last user has gone; if the daemon dies, nothing is leaked either.

Sharing: a file may be attached read-only any number of times (each attachment is a device of
its own, e.g. one per container that defines its image inline), but a read-write attachment
must be the only one — no other attachment, by imageapi or by anybody else (`losetup`), may
exist while a device can write to the file. Files are told apart by (st_dev, st_ino), so two
paths to one file (links, bind mounts) are the same file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

from imageapi.drivers import checks, inmount
from imageapi.drivers.base import Driver, Need, Node, Spec, State
from imageapi.drivers.generic import generic_need
from imageapi.errors import ApiError, BadRequest, Conflict, SystemFault, describe_oserror
from imageapi.journal import Intent
from imageapi.kernel import statfs as kstatfs
from imageapi.kernel.loop import Loop, LoopDevice

log = logging.getLogger(__name__)

Identity = tuple[int, int]  # (st_dev, st_ino)

# open(2) errors that describe the request's path, not a fault of the system.
_PATH_ERRNOS = {
    errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
    errno.EROFS, errno.ETXTBSY, errno.EISDIR, errno.ENXIO,
}  # fmt: skip


class LoopbackAttach(Driver):
    collection = "attach"
    kind = "loopback"
    noun = "loopback"

    def __init__(self, loop: Loop | None = None, tag: str = "") -> None:
        self.loop = loop or Loop()
        # Written into each device we set up, so that one no record names (the record lost)
        # is still recognised as ours at recovery.
        self.tag = tag
        # Our attachments per file: identity -> {node id: read-only}; and our devices
        # ("loop3"), so the check against devices bound outside imageapi skips them.
        self._lock = threading.Lock()
        self._users: dict[Identity, dict[int, bool]] = {}
        self._devices: set[str] = set()

    # -- checking ----------------------------------------------------------------------------

    def normalize(self, spec: Spec) -> Spec:
        out = checks.host_file_spec(spec)
        if out.get("base") == "mount":
            generic_need(out["mount"], "mount")
        partscan = spec.get("partscan", False)
        if not isinstance(partscan, bool):
            raise BadRequest("readPartitions: must be true or false")
        if partscan:
            out["partscan"] = True
        return out

    def needs(self, spec: Spec) -> list[Need]:
        return [generic_need(spec["mount"], "mount")] if spec.get("base") == "mount" else []

    def check_available(self, spec: Spec) -> None:
        # Early and friendly; `build` checks again, on the file it actually opens. A file
        # inside a mount is checked there, once the mount exists.
        if spec.get("base") != "mount":
            os.close(_pin_image(spec["path"]))

    # -- kernel work -------------------------------------------------------------------------

    def build(self, node: Node) -> State:
        ro = node.spec["ro"]
        mount = inmount.base_mount(node)
        path = node.spec["path"] if mount is None else inmount.host_view(mount, node.spec["path"])
        if mount is None:
            backing_fd = _open_image(path, ro)
        else:
            backing_fd = _reopen(_check_image(inmount.pin_in_mount(mount, node.spec["path"], 0),
                                              path), path, ro)
        try:
            st = os.fstat(backing_fd)
            identity = (st.st_dev, st.st_ino)
            with self._lock:
                self._refuse_if_taken(identity, ro, path)
                self._users.setdefault(identity, {})[node.id] = ro
            try:
                with self.step(node.id, "loop-attach", path=path, backing=list(identity),
                               ro=ro) as step:
                    # No autoclear: the attachment is an object of the record, like an rbd
                    # mapping, and outlives a daemon restart even while nothing mounts it.
                    device = self.loop.attach(backing_fd, read_only=ro, name=path,
                                              autoclear=False, tag=self.tag,
                                              partscan=bool(node.spec.get("partscan")))
                    step.done(number=device.number)
            except BaseException as exc:
                self._forget(identity, node.id, None)
                if isinstance(exc, OSError):
                    raise _attach_error(exc, path) from exc
                raise
        finally:
            os.close(backing_fd)  # the loop device holds its own reference to the file
        with self._lock:
            self._devices.add(device.name)
        node.live["device"] = device
        log.info(
            "attached %s as %s (%s, direct I/O %s)", path, device.path,
            "read-only" if device.read_only else "read-write", "on" if device.direct_io else "off",
        )  # fmt: skip
        return {"device_file": device.path, "number": device.number,
                "backing": list(device.backing), "file": path}

    def adopt(self, node: Node) -> str | None:
        record = node.record
        backing = (record["backing"][0], record["backing"][1])
        device = self.loop.adopt(record["number"], backing, node.spec["ro"], self.tag)
        if device is None:
            return f"{record['device_file']} is no longer bound to {node.spec['path']}"
        node.live["device"] = device
        with self._lock:
            self._users.setdefault(backing, {})[node.id] = node.spec["ro"]
            self._devices.add(device.name)
        return None

    def sweep_orphans(self, recorded: set[str], unmounted: list[str]) -> list[str]:
        """Devices with our tag that no record holds (after the mounts on them are gone)."""
        if not self.tag:
            return []
        done = []
        for number, backing in self.loop.tagged(self.tag):
            with self._lock:
                ours = f"loop{number}" in self._devices
            # A record names it (even one recovery had no time to check): it stays.
            ours = ours or str(self.loop.dev_dir / f"loop{number}") in recorded
            if not ours and self.loop.clear(number, backing, self.tag):
                done.append(f"loop device /dev/loop{number}")
        return done

    def undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> str | None:
        if intent.effect != "loop-attach":
            return None
        backing = (intent.detail["backing"][0], intent.detail["backing"][1])
        numbers = [intent.outcome["number"]] if intent.outcome and "number" in intent.outcome \
            else [int(b.name[4:]) for b in self.loop.bindings() if b.backing == backing]
        for number in numbers:
            if not held("number", number) and self.loop.clear(number, backing, self.tag):
                return f"detached /dev/loop{number} from {intent.detail['path']}"
        return None

    def _refuse_if_taken(self, identity: Identity, ro: bool, path: str) -> None:
        """Lock held. A read-write attachment excludes every other one, ours or not."""
        for other, other_ro in sorted(self._users.get(identity, {}).items()):
            if not (ro and other_ro):
                how = "read-only" if other_ro else "read-write"
                raise Conflict(f"{path} is already attached {how} by loopback {other}"
                               + _why(ro))  # fmt: skip
        for bound in self.loop.bindings():
            if bound.name in self._devices or bound.backing != identity:
                continue
            if not (ro and bound.read_only):
                how = "read-only" if bound.read_only else "read-write"
                raise Conflict(
                    f"{path} is already attached {how} as /dev/{bound.name} (outside imageapi)"
                    + _why(ro)
                )

    def _forget(self, identity: Identity, node_id: int, device: LoopDevice | None) -> None:
        with self._lock:
            users = self._users.get(identity, {})
            users.pop(node_id, None)
            if not users:
                self._users.pop(identity, None)
            if device is not None:
                self._devices.discard(device.name)

    def destroy(self, node: Node, force: bool = False) -> None:
        device: LoopDevice | None = node.live.get("device")
        if device is None:
            # Not held by this process (gone at recovery, or not checked in its time): clear
            # it by its record, if it is still bound to that very file.
            backing = (node.record["backing"][0], node.record["backing"][1])
            with self.step(node.id, "loop-detach", number=node.record["number"]):
                if not self.loop.clear(node.record["number"], backing, self.tag):
                    log.warning("%s was already detached outside imageapi",
                                node.record["device_file"])
            return
        try:
            with self.step(node.id, "loop-detach", number=device.number):
                unbound = self.loop.detach(device, force=force)
        except OSError as exc:
            what = f"cannot detach {device.path}"
            if exc.errno == errno.EBUSY:
                raise Conflict(describe_oserror(exc, what + " (mounted outside imageapi)")) from exc
            raise SystemFault(describe_oserror(exc, what)) from exc
        self._forget(device.backing, node.id, device)
        if unbound:
            log.info("detached %s from %s", device.path, node.spec["path"])
        else:
            log.warning(
                "%s is still open outside imageapi: the kernel unbinds it when that user closes it",
                device.path,
            )

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        # v1's view: the file as the host sees it (inside a mount: under its mountpoint).
        return {
            "id": node.id,
            "path": node.record.get("file", node.spec["path"]),
            "ro": node.spec["ro"],
            "device_file": node.record["device_file"],
        }


def _why(ro: bool) -> str:
    return "" if ro else "; a read-write attachment must be the only one of its file"


def _open_image(path: str, ro: bool) -> int:
    """Open the image file for the loop device, checking it is an image file first.

    An O_PATH open has no side effects (a fifo does not block, a device is not opened), so
    the file is checked through that descriptor and then reopened through it — the same
    inode, whatever happens to the path meanwhile.
    """
    return _reopen(_pin_image(path), path, ro)


def _reopen(pinned: int, path: str, ro: bool) -> int:
    """The file behind the O_PATH descriptor `pinned` (closed here), open for the device."""
    try:
        try:
            return os.open(f"/proc/self/fd/{pinned}",
                           (os.O_RDONLY if ro else os.O_RDWR) | os.O_CLOEXEC)  # fmt: skip
        except OSError as exc:
            raise _path_error(OSError(exc.errno, exc.strerror, path), path) from exc
    finally:
        os.close(pinned)


def _pin_image(path: str) -> int:
    """An O_PATH descriptor of `path`, once it is known to be an image file: a regular file
    with data, on a filesystem that stores data (not /proc, /sys and their kin, whose
    "regular files" are kernel interfaces: /proc/self/mem, a sysfs attribute)."""
    try:
        pinned = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise _path_error(exc, path) from exc
    return _check_image(pinned, path)


def _check_image(pinned: int, path: str) -> int:
    """`pinned`, once it is known to be an image file (else it is closed and refused)."""
    try:
        st = os.fstat(pinned)
        _require_regular(st.st_mode, path)
        try:
            pseudo = kstatfs.pseudo_filesystem(pinned, path)
        except OSError as exc:
            raise SystemFault(describe_oserror(exc, f"cannot statfs {path}")) from exc
        if pseudo is not None:
            raise BadRequest(f"path: {path} is a file of {pseudo}, a kernel interface, "
                             "not an image file")  # fmt: skip
        if st.st_size == 0:
            raise BadRequest(f"path: {path} is empty (0 bytes), not an image file")
    except BaseException:
        os.close(pinned)
        raise
    return pinned


def _require_regular(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    what = {
        stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket",
    }.get(stat.S_IFMT(mode), "not a file")  # fmt: skip
    raise BadRequest(f"path: {path} is {what}, not a regular file (an image file)")


def _attach_error(exc: OSError, path: str) -> ApiError:
    # The file passed every check above, so an EINVAL is the loop driver refusing this file
    # (one it cannot read through, e.g. on a filesystem without read_iter): the request's.
    if exc.errno == errno.EINVAL:
        return BadRequest(describe_oserror(exc, f"path: the loop driver cannot use {path}"))
    return SystemFault(describe_oserror(exc, f"cannot attach {path}"))


def _path_error(exc: OSError, path: str) -> ApiError:
    if exc.errno in _PATH_ERRNOS:
        return BadRequest(describe_oserror(exc, "path: cannot open"))
    return SystemFault(describe_oserror(exc, f"cannot open {path}"))
