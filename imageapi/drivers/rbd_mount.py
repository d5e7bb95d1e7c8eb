"""Mount a filesystem from an attached block device (typically a squashfs system image).

`DeviceMount` mounts the `device_file` of an attachment of one kind (`source_kind`): an rbd
(`RbdMount`, `mount_rbd`: `rbd_id` or `rbd`) or a loop device over an image file
(`LoopbackMount`, `mount_loopback`: `loopback_id` or `loopback`). The request fields are named
after the attachment kind; everything else is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from imageapi.drivers import checks
from imageapi.drivers.base import Need, Node, Spec, State
from imageapi.drivers.mountpoints import MountpointDriver, mount_error, remove_dir
from imageapi.errors import BadRequest
from imageapi.kernel import mount as kmount


class DeviceMount(MountpointDriver):
    # Which attachment kind this mounts, and the request fields naming it.
    source_kind: ClassVar[str]

    def normalize(self, spec: Spec) -> Spec:
        fs_type = checks.fs_type(spec.get("fs_type"))
        out: Spec = {
            "fs_type": fs_type,
            "mount_options": checks.mount_options(spec.get("mount_options"), fs_type),
        }
        ref_field = f"{self.source_kind}_id"
        ref = checks.reference(spec.get(ref_field), ref_field)
        if ref is not None:
            out[ref_field] = ref  # the reference wins over a definition
        elif isinstance(spec.get(self.source_kind), dict):
            out[self.source_kind] = spec[self.source_kind]
        else:
            raise BadRequest(
                f"{self.noun}: give {ref_field} (an attached {self.source_kind}) "
                f"or {self.source_kind} (one to attach)"
            )
        return out

    def needs(self, spec: Spec) -> list[Need]:
        field = f"{self.source_kind}_id"
        return [
            Need(
                slot=field if field in spec else self.source_kind,
                collection="attach",
                kind=self.source_kind,
                ref=spec.get(field),
                spec=spec.get(self.source_kind),
            )
        ]

    def build(self, node: Node) -> State:
        source = node.needs[0][1].record["device_file"]
        opts = kmount.parse_options(node.spec["mount_options"])
        target = self.fresh(node.id, "mount_")
        try:
            with self.step(node.id, "mount", path=str(target), source=source,
                           fstype=node.spec["fs_type"]):
                kmount.mount(source, str(target), node.spec["fs_type"], opts.flags, opts.data)
        except OSError as exc:
            remove_dir(target)
            raise mount_error(exc, f"cannot mount {source} ({node.spec['fs_type']})") from exc
        return {"mountpoint": str(target)}

    def fstype_of(self, node: Node) -> str | None:
        return str(node.spec["fs_type"])

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        _need, source = node.needs[0]
        view: dict[str, Any] = {
            "id": node.id,
            "fs_type": node.spec["fs_type"],
            "mount_options": list(node.spec["mount_options"]),
            f"{self.source_kind}_id": source.id,
        }
        if node.owns(source):
            view[self.source_kind] = embed(source)
        view["mountpoint"] = node.record["mountpoint"]
        return view


class RbdMount(DeviceMount):
    kind = "rbd"
    noun = "rbd mount"
    source_kind = "rbd"


class LoopbackMount(DeviceMount):
    kind = "loopback"
    noun = "loopback mount"
    source_kind = "loopback"


class LocalMount(DeviceMount):
    """A filesystem on a block device of the host (a `local` attachment); only the 0.2
    dialect's `attach` mount makes these, so `local_id` and `local` are internal names."""

    kind = "local"
    noun = "local mount"
    source_kind = "local"
