"""The generic `mount` object, as the drivers see it: what overlays, containers and
`base: "mount"` objects stand on.

The HTTP layer (`imageapi.api.dialect`) turns both dialects' shapes into this one: a
reference `{"kind": K, "mount_id": N}` or a definition `{"kind": K, K: {...}}`, with K a
registry kind (`rbd`, `loopback`, `local`, `bind`, `overlay`), or `attach` for a reference to
a filesystem mounted from an attachment of any kind.
"""

from __future__ import annotations

from imageapi.drivers import checks
from imageapi.drivers.base import Need
from imageapi.errors import BadRequest

# Mounts of a filesystem on an attachment, one registry kind per attachment kind.
DEVICE_MOUNT_KINDS = ("rbd", "loopback", "local")


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
    if ref is not None and kind == "attach":
        return Need(slot=slot, collection="mount", kind="attach", ref=ref,
                    accept=DEVICE_MOUNT_KINDS)
    return Need(slot=slot, collection="mount", kind=kind, ref=ref,
                spec=None if ref is not None else definition)
