"""The two dialects of the Image API on one object graph: v1 (0.1.x) and 0.2.

Requests. `Parser` turns a body of either dialect into the registry's internal specs (see
`imageapi.drivers.generic`), telling the shapes apart where they share a definition:

- a generic mount's kind: v1's `rbd` and `loopback` name a filesystem on that attachment kind;
  0.2's `attach` names one on an attachment of any kind, given in its `attach` member by
  reference (`{"id": N}`, kind looked up) or definition (`{"kind": K, K: {...}}`);
- a mount reference: v1's `mount_id`, 0.2's `id` (either is accepted anywhere; a reference
  wins over a definition given beside it, in both dialects);
- a bind: v1's `{path, ro}` (read-only by default) has no `base`; 0.2's has one (`root` or
  `mount`, read-write by default, `recursive`);
- `nfs` and `uri` mounts and `iscsi` attachments: in the 0.2 schema, refused with 501.

`Parser.dialect` ends as "0.2" if the body used a shape only 0.2 has, so the answer speaks it.

Answers. `Views(dialect)` renders nodes. A generic mount is the same superset in both: `id`
and `mount_id`, `kind`, `mountpoint` and `refs` at the top, and the definition both under v1's
member (`rbd`, `loopback`) and 0.2's (`attach`) where they differ; a reference shows only the
top, an owned definition is shown whole. The one difference is `kind`: in 0.2 a filesystem on
an attachment is `attach`; in v1 it is the attachment's kind (`attach` for a `local` one, which
v1 has no name for). Operations shared by both dialects answer in v1's names unless the request
spoke 0.2 (a 0.2 query parameter, a 0.2 shape in the body).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageapi.drivers.base import Node
from imageapi.drivers.generic import DEVICE_MOUNT_KINDS
from imageapi.errors import ApiError, BadRequest, NotFound

V1, V02 = "v1", "0.2"
Body = dict[str, Any]
KindOf = Callable[[int, str], str | None]
V1Render = Callable[[Node], dict[str, Any]]

ATTACH_KINDS_02 = ("iscsi", "local", "loopback", "rbd")  # the 0.2 enum
MOUNT_KINDS_02 = ("attach", "bind", "nfs", "overlay", "uri")
V1_MOUNT_KINDS = ("rbd", "overlay", "loopback", "bind")
# 0.2 wire kind -> the registry kinds it covers.
MOUNT_FILTER_02 = {"attach": DEVICE_MOUNT_KINDS, "bind": ("bind",), "overlay": ("overlay",),
                   "nfs": (), "uri": ()}  # fmt: skip


class NotImplementedHere(ApiError):
    """A kind of the contract this server cannot serve on this machine."""

    status = 501


def _nfs_client() -> bool:
    try:
        return any(line.split()[-1].startswith("nfs")
                   for line in Path("/proc/filesystems").read_text().splitlines())
    except OSError:
        return False


def _iscsi_initiator() -> bool:
    return Path("/sys/module/scsi_transport_iscsi").exists()


def unsupported(collection: str, kind: str) -> NotImplementedHere:
    """Why `kind` cannot be served, truthfully for this machine."""
    if kind == "nfs":
        if not _nfs_client():
            return NotImplementedHere(
                "nfs mounts need the kernel's NFS client, which this machine does not have "
                "(no nfs in /proc/filesystems); imageapi does not serve them")
        return NotImplementedHere("nfs mounts are not implemented by imageapi")
    if kind == "iscsi":
        if not _iscsi_initiator():
            return NotImplementedHere(
                "iscsi attachments need the kernel's iSCSI initiator (scsi_transport_iscsi) "
                "and iscsid, which this machine does not have; imageapi does not serve them")
        return NotImplementedHere("iscsi attachments are not implemented by imageapi")
    return NotImplementedHere(f"{kind} {collection}s are in the 0.2 schema, but no server "
                              "implements them, this one included")


class Parser:
    """One request body of either dialect -> internal specs. `kind_of(id, collection)` is the
    registry's: kinds never change and ids are never reused, so a kind looked up here stays
    true; if the object goes meanwhile, the create answers 404 for it."""

    def __init__(self, kind_of: KindOf) -> None:
        self.kind_of = kind_of
        self.dialect = V1

    def spoke_02(self) -> None:
        self.dialect = V02

    # -- mounts ---------------------------------------------------------------------------

    def mount(self, item: object, slot: str) -> Body:
        """A generic mount (reference or definition) -> the internal generic mount."""
        if not isinstance(item, dict):
            raise BadRequest(f"{slot}: must be a mount object (kind and id, or a definition)")
        kind = item.get("kind")
        if not isinstance(kind, str):
            raise BadRequest(f"{slot}.kind: required")
        ref = _ref(item, slot)
        if ref is not None:
            return self.mount_ref(kind, ref, slot)
        kind, spec = self.mount_definition(item, slot)
        return {"kind": kind, kind: spec}

    def mount_ref(self, kind: str, ref: int, slot: str) -> Body:
        if kind in ("attach", "nfs", "uri"):
            self.spoke_02()
        if kind not in (*V1_MOUNT_KINDS, *MOUNT_KINDS_02):
            raise BadRequest(f"{slot}.kind: unknown mount kind {kind!r}")
        return {"kind": kind, "mount_id": ref}

    def mount_definition(self, item: Body, slot: str) -> tuple[str, Body]:
        """(registry kind, internal spec) of a generic mount's definition."""
        kind = item["kind"]
        definition = item.get(kind)
        if kind in ("nfs", "uri"):
            self.spoke_02()
            raise unsupported("mount", kind)
        if kind not in (*V1_MOUNT_KINDS, "attach"):
            raise BadRequest(f"{slot}.kind: unknown mount kind {kind!r}")
        if not isinstance(definition, dict):
            raise BadRequest(f"{slot}: give mount_id or a {kind} mount definition under "
                             f"{kind!r}")
        where = f"{slot}.{kind}"
        if kind == "attach":
            return self.attach_mount(definition, where)
        if kind == "overlay":
            return kind, self.overlay(definition, where)
        if kind == "bind":
            return kind, self.bind(definition, where)
        return kind, self.device_mount(kind, definition, where)

    def device_mount(self, kind: str, spec: Body, slot: str) -> Body:
        """v1's mount_rbd / mount_loopback: the attachment by `<kind>_id` or inline."""
        out = {k: spec[k] for k in ("fs_type", "mount_options") if k in spec}
        ref_field = f"{kind}_id"
        if spec.get(ref_field) not in (None, 0):
            out[ref_field] = spec[ref_field]
        elif isinstance(spec.get(kind), dict):
            out[kind] = self.attach_spec(kind, spec[kind], f"{slot}.{kind}", v1=True)
        else:
            out[ref_field] = spec.get(ref_field)  # the driver says what is missing
        return out

    def attach_mount(self, spec: Body, slot: str) -> tuple[str, Body]:
        """0.2's mount_attach: a filesystem on an attachment of any kind."""
        self.spoke_02()
        out = {k: spec[k] for k in ("fs_type", "mount_options") if k in spec}
        attach = spec.get("attach")
        if not isinstance(attach, dict):
            raise BadRequest(f"{slot}.attach: required (an attachment: {{\"id\": N}} or a "
                             "definition)")
        ref = _ref(attach, f"{slot}.attach")
        if ref is not None:
            kind = self.kind_of(ref, "attach")
            if kind is None:
                raise NotFound(f"{slot}.attach: no attachment with id {ref}")
            given = attach.get("kind")
            if given not in (None, kind):
                raise BadRequest(f"{slot}.attach: attachment {ref} is {kind}, not {given}")
            return kind, {**out, f"{kind}_id": ref}
        kind, definition = self.attach(attach, f"{slot}.attach")
        return kind, {**out, kind: definition}

    def overlay(self, spec: Body, slot: str) -> Body:
        lower = spec.get("lower")
        if not isinstance(lower, list) or not lower:
            raise BadRequest(f"{slot}.lower: at least one lower mount is required")
        return {"lower": [self.mount(x, f"{slot}.lower[{i}]") for i, x in enumerate(lower)]}

    def bind(self, spec: Body, slot: str) -> Body:
        if "base" not in spec:  # v1: a host directory, read-only unless told
            return {k: spec[k] for k in ("path", "ro") if k in spec}
        self.spoke_02()
        return self.based(spec, slot, defaults={"ro": False, "recursive": False},
                          keys=("ro", "recursive"))

    def based(self, spec: Body, slot: str, defaults: Body, keys: tuple[str, ...]) -> Body:
        """A 0.2 path with `base`: `root` (the host's /) or `mount` (inside that mount)."""
        out: Body = {**defaults, **{k: spec[k] for k in keys if k in spec}}
        base = spec.get("base")
        path = spec.get("path")
        out["base"], out["path"] = base, path
        if base == "root" and isinstance(path, str):
            out["path"] = "/" + path.lstrip("/")
        elif base == "mount":
            if spec.get("mount") is None:
                raise BadRequest(f"{slot}.mount: required when base is 'mount' (the mount the "
                                 "path lies in)")
            out["mount"] = self.mount(spec.get("mount"), f"{slot}.mount")
        return out

    # -- attachments ----------------------------------------------------------------------

    def attach(self, item: object, slot: str) -> tuple[str, Body]:
        """A 0.2 `attach` definition -> (kind, internal spec)."""
        if not isinstance(item, dict):
            raise BadRequest(f"{slot}: must be an attach object")
        kind = item.get("kind")
        if not isinstance(kind, str):
            raise BadRequest(f"{slot}.kind: required to define an attachment")
        if kind == "iscsi":
            raise unsupported("attach", kind)
        if kind not in ATTACH_KINDS_02:
            raise BadRequest(f"{slot}.kind: unknown attach kind {kind!r}")
        definition = item.get(kind)
        if not isinstance(definition, dict):
            raise BadRequest(f"{slot}: the {kind} attachment to create is required under "
                             f"{kind!r}")
        return kind, self.attach_spec(kind, definition, f"{slot}.{kind}", v1=False)

    def attach_spec(self, kind: str, spec: Body, slot: str, v1: bool) -> Body:
        if kind == "loopback" and not v1:
            out = self.based(spec, slot, defaults={"ro": True}, keys=("ro",))
            if spec.get("readPartitions"):
                out["partscan"] = spec["readPartitions"]
            return out
        return spec  # rbd (the same in both), v1's loopback, local: the drivers check them

    # -- containers -----------------------------------------------------------------------

    def container(self, body: Body) -> Body:
        out = dict(body)
        out["mount"] = self.mount(body.get("mount"), "mount")
        return out


def _ref(item: Body, slot: str) -> int | None:
    """The id a mount or attach object refers to: v1's `mount_id` (first) or 0.2's `id`."""
    for key in ("mount_id", "id"):
        value = item.get(key)
        if value is None or value == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"{slot}.{key}: must be a positive integer id")
        return value
    return None


# -- answers ----------------------------------------------------------------------------------


class Views:
    """How one answer shows nodes; each method takes (node, the drivers' v1 view)."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def kind(self, node: Node) -> str:
        if node.kind in DEVICE_MOUNT_KINDS and (self.dialect == V02 or node.kind == "local"):
            return "attach"
        return node.kind

    # Generic mounts: everywhere a mount is named (lists, lowers, containers, base mounts).

    def mount(self, node: Node, v1: V1Render, whole: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind(node), "id": node.id, "mount_id": node.id,
                               "mountpoint": node.record["mountpoint"], "refs": node.refs}
        if whole:
            out.update(self.members(node, v1))
        return out

    def members(self, node: Node, v1: V1Render) -> dict[str, Any]:
        if node.kind in DEVICE_MOUNT_KINDS:
            out: dict[str, Any] = {}
            if node.kind != "local":
                out[node.kind] = v1(node)
            _need, source = node.needs[0]
            out["attach"] = {"fs_type": node.spec["fs_type"],
                             "mount_options": list(node.spec["mount_options"]),
                             "attach": self.attach(source, v1, whole=node.owns(source))}
            return out
        return {node.kind: self.specific(node, v1)}

    def owned(self, parent: Node, child: Node, v1: V1Render) -> dict[str, Any]:
        return self.mount(child, v1, whole=parent.owns(child))

    # The object itself, as its own path shows it (`/mount/overlay/{id}`, ...).

    def specific(self, node: Node, v1: V1Render) -> dict[str, Any]:
        view = v1(node)
        if node.kind == "overlay":
            view["lower"] = [self.owned(node, dep, v1) for _need, dep in node.needs]
        elif node.kind == "bind" and node.spec.get("base") == "mount":
            view["mount"] = self.owned(node, node.needs[0][1], v1)
        return view

    def container(self, node: Node, v1: V1Render) -> dict[str, Any]:
        view = v1(node)
        view["mount"] = self.owned(node, node.needs[0][1], v1)
        view["refs"] = node.refs
        return view

    # Attachments, as 0.2 shows them (`/attach`): the definition under the kind's member.

    def attach(self, node: Node, v1: V1Render, whole: bool = True) -> dict[str, Any]:
        view = v1(node)
        out: dict[str, Any] = {"id": node.id, "kind": node.kind,
                               "device_file": node.record["device_file"], "refs": node.refs}
        if not whole:
            return out
        if node.kind == "rbd":
            out["rbd"] = {k: v for k, v in view.items() if k not in ("id", "device_file",
                                                                     "refs")}
        elif node.kind == "loopback":
            spec = node.spec
            member: dict[str, Any] = {"path": spec["path"], "base": spec.get("base", "root")}
            if spec.get("base") == "mount":
                member["mount"] = self.owned(node, node.needs[0][1], v1)
            member["readPartitions"] = bool(spec.get("partscan"))
            member["ro"] = spec["ro"]
            out["loopback"] = member
        else:
            out[node.kind] = {"path": node.spec["path"]}
        return out


def mount_kinds_02(kind: str | None) -> tuple[str, ...] | None:
    """The registry kinds a 0.2 `kind` filter of GET /mount covers (None: every kind)."""
    return None if kind is None else MOUNT_FILTER_02[kind]


def v1_kind(kind: str | None) -> str | None:
    """A registry mount kind as v1 names it on the wire (for the legacy shim)."""
    return "attach" if kind == "local" else kind

