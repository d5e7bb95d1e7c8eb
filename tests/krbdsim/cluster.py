"""The simulated Ceph cluster: a directory with `cluster.json` and one file per image.

Layout::

    <cluster>/cluster.json
    <cluster>/<pool>/<image>            image in the pool's default namespace
    <cluster>/<pool>/<image>@<snap>     a snapshot of it
    <cluster>/<pool>/<ns>/<image>       image in namespace <ns> (mapped with _pool_ns=<ns>)
    <cluster>/<pool>/<ns>/<image>@<snap>

cluster.json::

    {"fsid": "<uuid>",
     "monitors": ["192.0.2.10", "192.0.2.11"],   # each serves msgr1 on 6789 and msgr2 on 3300
     "keys": {"admin": "<armored ceph key>"},    # entity id (client.<id>) -> secret
     "pools": {"rbd": 1},                        # pool name -> pool id
     "auth": "cephx",                            # optional; "none" turns authentication off
     "keyring": {"client.admin": "<armored>"},   # optional; the host keyring that key= reads
     "features": {"rbd/img": 61}}                # optional; "<pool>[/<ns>]/<image>" -> bits

The file is read again for every add, so a test may change it while the simulator runs.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kparse import CEPH_MON_PORT, CEPH_NOSNAP, CryptoKey, EntityAddr, KernelError, unarmor_key

CEPH_MON_PORT_MSGR2 = 3300

RBD_FEATURE_LAYERING = 1 << 0
RBD_FEATURE_STRIPINGV2 = 1 << 1
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2
RBD_FEATURE_OBJECT_MAP = 1 << 3
RBD_FEATURE_FAST_DIFF = 1 << 4
RBD_FEATURE_DEEP_FLATTEN = 1 << 5
RBD_FEATURE_JOURNALING = 1 << 6
RBD_FEATURE_DATA_POOL = 1 << 7
RBD_FEATURE_OPERATIONS = 1 << 8
# RBD_FEATURES_SUPPORTED in drivers/block/rbd.c (0x1bf): what supported_features shows.
RBD_FEATURES_SUPPORTED = (
    RBD_FEATURE_LAYERING | RBD_FEATURE_STRIPINGV2 | RBD_FEATURE_EXCLUSIVE_LOCK
    | RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF | RBD_FEATURE_DEEP_FLATTEN
    | RBD_FEATURE_DATA_POOL | RBD_FEATURE_OPERATIONS
)  # fmt: skip
# What `rbd create` gives a new image by default (0x3d).
RBD_FEATURES_DEFAULT = (
    RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK | RBD_FEATURE_OBJECT_MAP
    | RBD_FEATURE_FAST_DIFF | RBD_FEATURE_DEEP_FLATTEN
)  # fmt: skip


class ClusterConfigError(Exception):
    """cluster.json is missing or malformed: a broken test setup, not a kernel behaviour."""


@dataclass(frozen=True)
class ImageInfo:
    """One mappable thing: an image head or one of its snapshots."""

    path: Path
    size: int
    image_id: str
    snap_id: int
    features: int


def image_id_for(pool_id: int, namespace: str, image: str) -> str:
    """A stable id in the shape of a format 2 image id (12 hex digits)."""
    digest = hashlib.sha256(f"{pool_id}\0{namespace}\0{image}".encode("latin-1")).hexdigest()
    return digest[:12]


def snap_id_for(image_id: str, snap: str) -> int:
    digest = hashlib.sha256(f"{image_id}@{snap}".encode("latin-1")).hexdigest()
    return int(digest[:6], 16) + 1


def _fs_name(name: str) -> str:
    """Names are latin-1 text here (one char per byte); files are named by those bytes."""
    return name.encode("latin-1").decode("utf-8", "surrogateescape")


def _valid_component(name: str) -> bool:
    # Names that cannot be a single directory entry cannot exist in the simulated cluster.
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


@dataclass
class Cluster:
    root: Path
    fsid: uuid.UUID
    monitors: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    keys: dict[str, CryptoKey]
    pools: dict[str, int]
    auth: str = "cephx"
    keyring: dict[str, str] = field(default_factory=dict)
    features: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> Cluster:
        path = root / "cluster.json"
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
            monitors = [ipaddress.ip_address(str(m).strip("[]")) for m in raw["monitors"]]
            keys = {str(k): unarmor_key(str(v)) for k, v in raw.get("keys", {}).items()}
            pools = {str(k): int(v) for k, v in raw["pools"].items()}
            auth = str(raw.get("auth", "cephx"))
            if auth not in ("cephx", "none"):
                raise ValueError(f"auth must be cephx or none, not {auth!r}")
            return cls(
                root=root,
                fsid=uuid.UUID(str(raw["fsid"])),
                monitors=monitors,
                keys=keys,
                pools=pools,
                auth=auth,
                keyring={str(k): str(v) for k, v in raw.get("keyring", {}).items()},
                features={str(k): int(v) for k, v in raw.get("features", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError, KernelError) as exc:
            raise ClusterConfigError(f"{path}: {exc}") from exc

    def serves(self, addr: EntityAddr, msgr2: bool) -> bool:
        """Would a connection to `addr` reach a monitor speaking the client's protocol?"""
        port = CEPH_MON_PORT_MSGR2 if msgr2 else CEPH_MON_PORT
        return addr.ip in self.monitors and addr.port == port

    def monmap_contains(self, addr: EntityAddr) -> bool:
        """ceph_monmap_contains() for a client that has this cluster's monmap."""
        return addr.ip in self.monitors and addr.port in (CEPH_MON_PORT, CEPH_MON_PORT_MSGR2)

    def lookup(self, pool: str, namespace: str, image: str, snap: str | None) -> ImageInfo:
        """The image (or snapshot) to map; ENOENT when it does not exist."""
        pool_id = self.pools.get(pool)
        if pool_id is None or not _valid_component(pool):
            raise KernelError(errno.ENOENT, f"rbd: pool {pool} does not exist")
        where = self.root / _fs_name(pool)
        shown = f"{pool}/{namespace}/" if namespace else f"{pool}/"
        if namespace:
            if not _valid_component(namespace) or not (where / _fs_name(namespace)).is_dir():
                raise KernelError(errno.ENOENT, f"rbd: image {shown}{image} does not exist")
            where = where / _fs_name(namespace)
        head = where / _fs_name(image)
        if not _valid_component(image) or "@" in image or not head.is_file():
            raise KernelError(errno.ENOENT, f"rbd: image {shown}{image} does not exist")
        image_id = image_id_for(pool_id, namespace, image)
        features = self.features.get(f"{shown}{image}", RBD_FEATURES_DEFAULT)
        if snap is None:
            return ImageInfo(head, head.stat().st_size, image_id, CEPH_NOSNAP, features)
        snap_path = where / _fs_name(f"{image}@{snap}")
        if "/" in snap or "\0" in snap or not snap_path.is_file():
            raise KernelError(errno.ENOENT, f"rbd: snap {shown}{image}@{snap} does not exist")
        return ImageInfo(
            snap_path, snap_path.stat().st_size, image_id, snap_id_for(image_id, snap), features
        )
