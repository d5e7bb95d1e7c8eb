"""An overlayfs mount over one or more lower mounts, with a private read-write upper layer.

The upper and work directories are created fresh for each overlay and removed with it, so an
overlay is a non-destructive, throw-away read-write view of its (read-only) lowers.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageapi.drivers import checks
from imageapi.drivers.base import Need, Node, Spec, State
from imageapi.drivers.mountpoints import MountpointDriver, fresh_dir, mount_error, remove_dir
from imageapi.errors import BadRequest, describe_oserror
from imageapi.kernel import mount as kmount


def generic_need(item: object, slot: str) -> Need:
    """A generic `mount` object (`kind` + `mount_id`, or the definition under `<kind>`)."""
    if not isinstance(item, dict):
        raise BadRequest(f"{slot}: must be a mount object (kind and mount_id, or a definition)")
    kind = item.get("kind")
    if not isinstance(kind, str):
        raise BadRequest(f"{slot}.kind: required")
    ref = checks.reference(item.get("mount_id"), f"{slot}.mount_id")
    definition = item.get(kind)
    if ref is None and not isinstance(definition, dict):
        raise BadRequest(f"{slot}: give mount_id or a {kind} mount definition under {kind!r}")
    return Need(slot=slot, collection="mount", kind=kind, ref=ref,
                spec=None if ref is not None else definition)


class OverlayMount(MountpointDriver):
    kind = "overlay"
    noun = "overlay mount"

    def normalize(self, spec: Spec) -> Spec:
        lower = spec.get("lower")
        if not isinstance(lower, list) or not lower:
            raise BadRequest("lower: at least one lower mount is required")
        for i, item in enumerate(lower):
            generic_need(item, f"lower[{i}]")  # check shapes before building anything
        return {"lower": lower}

    def needs(self, spec: Spec) -> list[Need]:
        return [generic_need(item, f"lower[{i}]") for i, item in enumerate(spec["lower"])]

    def build(self, node: Node) -> State:
        lowers = [dep.state["mountpoint"] for _need, dep in node.needs]
        made: list[Path] = []
        try:
            for prefix in ("mount_", "upper_", "work_"):
                made.append(fresh_dir(self.mount_dir, prefix))
            target, upper, work = made
            data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
            kmount.mount("overlay", str(target), "overlay", 0, data)
        except OSError as exc:
            for path in reversed(made):
                remove_dir(path, tree=True)
            if exc.errno == errno.ELOOP:
                # overlayfs refuses layers that overlap: the request named one filesystem twice
                # (the same mount, or two mounts of one image). The client's doing: a 400.
                raise BadRequest(
                    describe_oserror(exc, "cannot mount the overlay: its lower layers overlap")
                ) from exc
            raise mount_error(exc, "cannot mount the overlay") from exc
        return {"mountpoint": str(target), "upperdir": str(upper), "workdir": str(work)}

    def destroy(self, node: Node) -> None:
        super().destroy(node)
        remove_dir(Path(node.state["upperdir"]), tree=True)
        remove_dir(Path(node.state["workdir"]), tree=True)

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        lower = []
        for _need, dep in node.needs:
            item: dict[str, Any] = {"kind": dep.kind, "mount_id": dep.id}
            if node.owns(dep):
                item[dep.kind] = embed(dep)
            lower.append(item)
        return {"id": node.id, "lower": lower, **node.state}
