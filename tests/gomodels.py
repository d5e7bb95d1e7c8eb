"""Responses decoded the way the Go clients generated from each spec decode them.

go-swagger's clients unmarshal a response body with encoding/json into the operation's model
and do not validate it: a field the model does not know is ignored, a field left out or
`null` is the zero value, and a value of the wrong JSON type is an error (a number into a
string, an object into an array). `decode(model, value)` does the same for the models below,
so a test sees exactly what Kraken sees. Field names and types are the dialects' (the 0.2
facts sheet, and ../shared/api-v1-facts.md for the 0.1 client).
"""

from __future__ import annotations

from typing import Any

# A model: field -> "int64" | "string" | "bool" | a model name | [item type].
Model = dict[str, Any]

RBD_OPTIONS: Model = {"name": "string", "secret": "string", "ro": "bool", "rw": "bool",
                      "namespace": "string", "queue_depth": "int64"}  # fmt: skip

MODELS_02: dict[str, Model] = {
    "error": {"code": "int64", "message": "string"},
    "rbd_options": RBD_OPTIONS,
    "attach": {"id": "int64", "kind": "string", "device_file": "string", "refs": "int64",
               "rbd": "attach_rbd", "loopback": "attach_loopback", "local": "attach_local"},
    "attach_rbd": {"monitors": ["string"], "pool": "string", "image": "string",
                   "snapshot": "string", "options": "rbd_options", "device_id": "int64"},
    "attach_loopback": {"path": "string", "base": "string", "mount": "mount",
                        "readPartitions": "bool"},
    "attach_local": {"path": "string"},
    "mount": {"id": "int64", "kind": "string", "mountpoint": "string", "refs": "int64",
              "attach": "mount_attach", "bind": "mount_bind", "overlay": "mount_overlay"},
    "mount_attach": {"attach": "attach", "fs_type": "string", "mount_options": ["string"]},
    "mount_bind": {"path": "string", "base": "string", "mount": "mount", "recursive": "bool",
                   "ro": "bool"},
    "mount_overlay": {"lower": ["mount"], "upperdir": "string", "workdir": "string"},
    "container": {"id": "int64", "name": "string", "command": "string", "mount": "mount",
                  "systemd": "bool", "state": "string", "namespaces": ["string"],
                  "logfile": "string", "refs": "int64"},
}  # fmt: skip

MODELS_01: dict[str, Model] = {
    "error": {"code": "int64", "message": "string"},
    "rbd_options": RBD_OPTIONS,
    "rbd": {"id": "int64", "monitors": ["string"], "pool": "string", "image": "string",
            "snapshot": "string", "options": "rbd_options", "device_id": "int64",
            "device_file": "string", "refs": "int64"},
    "mount_rbd": {"id": "int64", "fs_type": "string", "mount_options": ["string"],
                  "rbd_id": "int64", "rbd": "rbd", "mountpoint": "string", "refs": "int64"},
    "mount_overlay": {"id": "int64", "lower": ["mount"], "mountpoint": "string",
                      "upperdir": "string", "workdir": "string", "refs": "int64"},
    "mount": {"kind": "string", "mount_id": "int64", "rbd": "mount_rbd",
              "overlay": "mount_overlay"},
    "container": {"id": "int64", "name": "string", "command": "string", "mount": "mount",
                  "systemd": "bool", "state": "string", "namespaces": ["string"],
                  "logfile": "string"},
}  # fmt: skip

ZERO = {"int64": 0, "string": "", "bool": False}


class DecodeError(AssertionError):
    pass


def decode(models: dict[str, Model], kind: Any, value: Any, where: str = "body") -> Any:
    """`value` as a Go client of `models` would hold it, typed `kind` (a model name, a
    scalar type or `[item]`)."""
    if isinstance(kind, list):
        if value is None:
            return []
        if not isinstance(value, list):
            raise DecodeError(f"{where}: cannot unmarshal {type(value).__name__} into a slice")
        return [decode(models, kind[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if kind in ZERO:
        if value is None:
            return ZERO[kind]
        ok = {"int64": isinstance(value, int) and not isinstance(value, bool),
              "string": isinstance(value, str), "bool": isinstance(value, bool)}[kind]
        if not ok:
            raise DecodeError(f"{where}: cannot unmarshal {value!r} into a Go {kind}")
        return value
    if value is None:
        return None  # a nil pointer
    if not isinstance(value, dict):
        raise DecodeError(f"{where}: cannot unmarshal {type(value).__name__} into {kind}")
    return {field: decode(models, sub, value.get(field), f"{where}.{field}")
            for field, sub in models[kind].items()}


def decode_02(kind: Any, value: Any) -> Any:
    return decode(MODELS_02, kind, value)


def decode_01(kind: Any, value: Any) -> Any:
    return decode(MODELS_01, kind, value)
