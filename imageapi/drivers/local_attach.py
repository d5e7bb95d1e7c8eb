"""A block device of the host that already exists (the 0.2 `local` attachment).

Nothing is made: the object is a reference to the device, so that a mount can stand on it
through the graph like on an rbd or a loop device. Deleting it leaves the device as it was.
It is recognised by its device number, so a device node renamed or recreated elsewhere in
/dev is still the same device, and a different device behind the same path is not.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Hashable
from typing import Any

from imageapi.drivers import checks
from imageapi.drivers.base import Driver, Node, Spec, State
from imageapi.errors import ApiError, BadRequest, SystemFault, describe_oserror

log = logging.getLogger(__name__)


class LocalAttach(Driver):
    collection = "attach"
    kind = "local"
    noun = "local attachment"
    claimed_as = "attached"

    def normalize(self, spec: Spec) -> Spec:
        return {"path": checks.host_path(spec.get("path"), "path")}

    def claim(self, spec: Spec) -> Hashable:
        return ("local", _rdev(spec["path"]))  # one object per device

    def describe_claim(self, claim: Hashable) -> str:
        rdev = claim[1]  # type: ignore[index]
        return f"block device {os.major(rdev)}:{os.minor(rdev)}"

    def build(self, node: Node) -> State:
        rdev = _rdev(node.spec["path"])
        log.info("attached the local block device %s (%d:%d)", node.spec["path"],
                 os.major(rdev), os.minor(rdev))
        return {"device_file": node.spec["path"], "rdev": rdev}

    def adopt(self, node: Node) -> str | None:
        try:
            same = _rdev(node.spec["path"]) == node.record["rdev"]
        except ApiError:
            same = False
        return None if same else f"{node.spec['path']} is no longer that block device"

    def destroy(self, node: Node, force: bool = False) -> None:
        # Never ours to remove: the object goes, the device stays (`force` changes nothing).
        log.info("released the local block device %s", node.spec["path"])

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        return {"id": node.id, "path": node.spec["path"],
                "device_file": node.record["device_file"]}


def _rdev(path: str) -> int:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise BadRequest(describe_oserror(exc, "path: cannot stat")) from exc
    except OSError as exc:
        raise SystemFault(describe_oserror(exc, f"cannot stat {path}")) from exc
    if not stat.S_ISBLK(st.st_mode):
        raise BadRequest(f"path: {path} is not a block device")
    return st.st_rdev
