"""The state behind the simulated /sys/bus/rbd: clients, devices, and add/remove.

Thread-safe: FUSE calls come from several threads. One lock guards the tables; slow work
(losetup, the busy scan) runs outside it, with the device id or the device itself reserved, the
way the kernel reserves an id with ida before probing and marks a device REMOVING.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import loopdev
from .cluster import (
    RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_FEATURE_JOURNALING,
    RBD_FEATURES_SUPPORTED,
    Cluster,
    ClusterConfigError,
    ImageInfo,
)
from .kparse import (
    PAGE_SIZE,
    AddRequest,
    CephOptions,
    EntityAddr,
    KernelError,
    parse_add,
    parse_remove,
)

# Global ids handed out by the simulated monitors; real ones are also small increasing numbers.
FIRST_GLOBAL_ID = 4123


@dataclass
class Client:
    """One struct rbd_client (a libceph session), shared by the devices that may share it."""

    gid: int
    share_key: tuple[object, ...]
    noshare: bool
    addr: str
    fsid: str
    refs: int = 0


@dataclass
class Device:
    dev_id: int
    req: AddRequest
    image: ImageInfo
    pool_id: int
    client: Client
    loop: str
    rdev: int
    node: Path
    removing: bool = False
    attrs: dict[str, bytes] = field(default_factory=dict)

    def render(self) -> None:
        """The show() functions of rbd_attrs, evaluated once (nothing here changes later)."""
        req = self.req
        values = {
            "size": f"{self.image.size}",
            "features": f"0x{self.image.features:016x}",
            "major": f"{os.major(self.rdev)}",
            "minor": f"{os.minor(self.rdev)}",
            "client_addr": self.client.addr,
            "client_id": f"client{self.client.gid}",
            "cluster_fsid": self.client.fsid,
            "config_info": req.config_info,
            "pool": req.pool,
            "pool_id": f"{self.pool_id}",
            "pool_ns": req.pool_ns or "",
            "name": req.image,
            "image_id": self.image.image_id,
            "current_snap": req.snap,
            "snap_id": f"{self.image.snap_id}",
            "parent": "(no parent image)",
        }
        # sprintf(buf, "%s\n", ...) into one page.
        self.attrs = {k: (v + "\n").encode("latin-1")[:PAGE_SIZE] for k, v in values.items()}


class Simulator:
    def __init__(
        self,
        cluster_dir: Path,
        devdir: Path,
        single_major: bool = True,
        log: TextIO = sys.stderr,
    ) -> None:
        self.cluster_dir = cluster_dir
        self.devdir = devdir
        self.single_major = single_major
        self.log = log
        self._lock = threading.Lock()
        # rbd's client_mutex: find-or-create of a client is serialized, session setup included.
        self._client_mutex = threading.Lock()
        self._devices: dict[int, Device] = {}
        self._reserved: set[int] = set()
        self._clients: list[Client] = []
        self._next_gid = FIRST_GLOBAL_ID

    # ------------------------------------------------------------------ views

    def device_ids(self) -> list[str]:
        with self._lock:
            return [str(i) for i in sorted(self._devices)]

    def device(self, name: str) -> Device | None:
        if not name.isdigit() or str(int(name)) != name:
            return None
        with self._lock:
            return self._devices.get(int(name))

    def _say(self, text: str) -> None:
        # Our dmesg: one line per event, on stderr.
        print(f"krbdsim: {text}", file=self.log, flush=True)

    # ------------------------------------------------------------------ add

    def add(self, text: str) -> None:
        """do_rbd_add(), minus what a loop device gives for free. Raises KernelError."""
        try:
            cluster = Cluster.load(self.cluster_dir)
        except ClusterConfigError as exc:
            self._say(f"broken cluster: {exc}")
            raise KernelError(errno.EIO, str(exc)) from exc
        try:
            req = parse_add(text, cluster.keyring.get)
            client = self._get_client(req.ceph, cluster)
        except KernelError as exc:
            self._say(f"add refused ({errno.errorcode.get(exc.errno or 0)}): {exc.strerror}")
            raise
        try:
            self._add_with_client(req, cluster, client)
        except KernelError as exc:
            self._say(f"add refused ({errno.errorcode.get(exc.errno or 0)}): {exc.strerror}")
            self._put_client(client)
            raise
        except BaseException:
            self._put_client(client)
            raise

    def _connect(self, opts: CephOptions, cluster: Cluster) -> None:
        """__ceph_open_session(): reach a monitor, authenticate, get a monmap with our fsid."""
        if not any(cluster.serves(a, opts.msgr2) for a in opts.mon_addrs):
            raise KernelError(errno.ETIMEDOUT, "libceph: mon session timed out (no monitor)")
        if cluster.auth == "cephx":
            if opts.key is None:
                if opts.msgr2:
                    # msgr2 offers auth "none" without a key; the monitor refuses that method.
                    raise KernelError(errno.EACCES, "libceph: auth protocol 'none' not allowed")
                raise KernelError(errno.EINVAL, "libceph: no secret set (for auth_x protocol)")
            known = cluster.keys.get(opts.entity_name)
            if known is None:
                raise KernelError(errno.EPERM, f"libceph: no such entity client.{opts.entity_name}")
            if not known.same_secret(opts.key):
                raise KernelError(errno.EPERM, f"libceph: bad key for client.{opts.entity_name}")
        if opts.fsid is not None and opts.fsid != cluster.fsid.bytes:
            # ceph_check_fsid() drops the monmap; the session never completes.
            raise KernelError(errno.ETIMEDOUT, "libceph: bad fsid; mon session timed out")

    def _get_client(self, opts: CephOptions, cluster: Cluster) -> Client:
        """rbd_get_client(): reuse a matching client unless noshare, else open a session."""
        key = opts.share_key()
        with self._client_mutex:
            with self._lock:
                if not opts.noshare:
                    for client in self._clients:
                        # ceph_compare_options(): same options, one of our monitors in its map.
                        if client.share_key == key and any(
                            cluster.monmap_contains(a) for a in opts.mon_addrs
                        ):
                            client.refs += 1
                            return client
            self._connect(opts, cluster)
            with self._lock:
                gid = self._next_gid
                self._next_gid += 1
                my_ip = opts.my_addr.ip if opts.my_addr is not None else None
                addr = str(EntityAddr(my_ip, 0)) if my_ip is not None else "192.0.2.100:0"
                client = Client(
                    gid=gid,
                    share_key=key,
                    noshare=opts.noshare,
                    addr=f"{addr}/{random.getrandbits(32)}",
                    fsid=str(cluster.fsid),
                    refs=1,
                )
                self._clients.append(client)
                return client

    def _put_client(self, client: Client) -> None:
        with self._lock:
            client.refs -= 1
            if client.refs <= 0 and client in self._clients:
                self._clients.remove(client)

    def _add_with_client(self, req: AddRequest, cluster: Cluster, client: Client) -> None:
        pool_id = cluster.pools.get(req.pool)
        image = cluster.lookup(
            req.pool, req.pool_ns or "", req.image, req.snap if req.is_snap else None
        )
        assert pool_id is not None
        # rbd_dev_v2_features(): bits this driver does not know make the image unmappable;
        # journaling only matters to writers.
        unsupported = image.features & ~RBD_FEATURES_SUPPORTED
        if req.read_only:
            unsupported &= ~RBD_FEATURE_JOURNALING
        if unsupported:
            raise KernelError(
                errno.ENXIO, f"rbd: image uses unsupported features: 0x{unsupported:x}"
            )
        # rbd_add_acquire_lock(): these options need the exclusive-lock feature.
        if (req.rbd.exclusive or req.rbd.lock_on_read) and not (
            image.features & RBD_FEATURE_EXCLUSIVE_LOCK
        ):
            raise KernelError(errno.EINVAL, "rbd: exclusive-lock feature is not enabled")

        with self._lock:
            # ida: the lowest id neither mapped nor being set up.
            dev_id = 0
            while dev_id in self._devices or dev_id in self._reserved:
                dev_id += 1
            self._reserved.add(dev_id)
        loop = None
        node = self.devdir / f"rbd{dev_id}"
        try:
            try:
                loop = loopdev.attach(image.path, req.read_only)
                rdev = os.stat(loop).st_rdev
                if node.exists() or node.is_symlink():
                    node.unlink()
                os.mknod(node, stat.S_IFBLK | 0o660, rdev)
                os.chmod(node, 0o660)
            except (OSError, loopdev.LoopError) as exc:
                self._say(f"device setup failed: {exc}")
                raise KernelError(errno.EIO, f"krbdsim: device setup failed: {exc}") from exc
            dev = Device(dev_id, req, image, pool_id, client, loop, rdev, node)
            dev.render()
        except BaseException:
            self._undo_setup(loop, node)
            with self._lock:
                self._reserved.discard(dev_id)
            raise
        with self._lock:
            self._reserved.discard(dev_id)
            self._devices[dev_id] = dev
        self._say(
            f"rbd{dev_id}: {req.pool}/{req.pool_ns + '/' if req.pool_ns else ''}{req.image}"
            f"@{req.snap} on {loop} ({'ro' if req.read_only else 'rw'}), "
            f"capacity {image.size} features 0x{image.features:x}"
        )

    def _undo_setup(self, loop: str | None, node: Path) -> None:
        if node.is_block_device():
            node.unlink(missing_ok=True)
        if loop is not None:
            try:
                loopdev.detach(loop)
            except loopdev.LoopError as exc:
                self._say(f"WARNING: {exc}")

    # ------------------------------------------------------------------ remove

    def remove(self, text: str) -> None:
        """do_rbd_remove(). Raises KernelError."""
        try:
            dev_id, force = parse_remove(text)
            with self._lock:
                dev = self._devices.get(dev_id)
                if dev is None:
                    raise KernelError(errno.ENOENT, f"rbd: no device {dev_id}")
                if dev.removing:
                    raise KernelError(errno.EINPROGRESS, f"rbd: rbd{dev_id} already being removed")
                # Reserve it while we look (outside the lock) whether anyone holds it open.
                dev.removing = True
            busy = not force and self._in_use(dev)
            if busy:
                with self._lock:
                    dev.removing = False
                raise KernelError(errno.EBUSY, f"rbd: rbd{dev_id} is open")
        except KernelError as exc:
            self._say(f"remove refused ({errno.errorcode.get(exc.errno or 0)}): {exc.strerror}")
            raise
        self._teardown(dev)
        self._say(f"rbd{dev_id}: removed{' (forced)' if force else ''}")

    def _in_use(self, dev: Device) -> bool:
        return loopdev.in_use(dev.loop, dev.rdev)

    def _teardown(self, dev: Device) -> None:
        try:
            dev.node.unlink(missing_ok=True)
        except OSError as exc:
            self._say(f"WARNING: cannot remove {dev.node}: {exc}")
        try:
            loopdev.detach(dev.loop)
        except loopdev.LoopError as exc:
            self._say(f"WARNING: {exc}")
        with self._lock:
            self._devices.pop(dev.dev_id, None)
        self._put_client(dev.client)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> list[int]:
        """Called once FUSE has unmounted. A kernel keeps mappings when nobody removes them; we
        must not leave loop devices behind, so say loudly what was leaked, then detach it."""
        with self._lock:
            leaked = sorted(self._devices.values(), key=lambda d: d.dev_id)
        if leaked:
            listing = ", ".join(
                f"{d.dev_id} ({d.req.pool}/{d.req.image}@{d.req.snap} on {d.loop})" for d in leaked
            )
            self._say(
                f"WARNING: {len(leaked)} device(s) still mapped at shutdown: {listing}; "
                "a real kernel would keep them mapped; detaching them now"
            )
        for dev in leaked:
            with self._lock:
                dev.removing = True
            self._teardown(dev)
        return [d.dev_id for d in leaked]
