"""Checks shared by drivers: strings that end up inside kernel strings must be plain.

Anything a client sends that reaches a sysfs control string or a mount(2) data string is
checked here against an allow-list, so no value can smuggle a separator (`,` between
options, whitespace between fields, `=` inside a value, `:` inside overlayfs lowerdir).
Filesystem types and their options are held to `fs_options`' allow-lists besides.
"""

from __future__ import annotations

import re

from imageapi.drivers import fs_options
from imageapi.errors import BadRequest
from imageapi.kernel.mount import FORBIDDEN_WORDS

PLAIN_NAME = re.compile(r"[A-Za-z0-9._+:-]+")
FS_TYPE = re.compile(r"[a-z0-9][a-z0-9._+-]*")
# A mount(8) word: `flag` or `key=value`; no comma, whitespace or control character.
MOUNT_WORD = re.compile(r"[A-Za-z0-9_.:/@+-]+(=[A-Za-z0-9_.:/@+=-]*)?")


def plain_name(value: object, field: str, max_len: int = 128) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field}: must be a non-empty string")
    if len(value) > max_len or not PLAIN_NAME.fullmatch(value):
        raise BadRequest(
            f"{field}: {value!r} is not a plain name (letters, digits and . _ + : - only, "
            f"at most {max_len} characters)"
        )
    return value


def fs_type(value: object) -> str:
    """A filesystem that lives on a block device (see `fs_options`): an attach mount's."""
    if not isinstance(value, str) or not FS_TYPE.fullmatch(value) or len(value) > 64:
        raise BadRequest(f"fs_type: {value!r} is not a filesystem type name")
    allowed = fs_options.allowed_filesystems()
    if value not in allowed:
        raise BadRequest(
            f"fs_type: {value!r} is not a filesystem imageapi mounts from a block device; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return value


def mount_options(value: object, fs_type: str) -> list[str]:
    """Options for `fs_type` (already checked): each one the allow-list has for it."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("mount_options: must be an array of strings")
    words: list[str] = []
    for i, word in enumerate(value):
        if not isinstance(word, str) or not MOUNT_WORD.fullmatch(word) or len(word) > 256:
            raise BadRequest(
                f"mount_options[{i}]: {word!r} is not a single mount option "
                "(one word or key=value, no commas, spaces or control characters)"
            )
        if word.split("=", 1)[0] in FORBIDDEN_WORDS:
            raise BadRequest(f"mount_options[{i}]: {word!r} is not a filesystem option")
        why = fs_options.check_option(word, fs_type)
        if why is not None:
            raise BadRequest(f"mount_options[{i}]: {word!r}: {why}")
        words.append(word)
    return words


def reference(value: object, field: str) -> int | None:
    """An id reference; 0 and absence both mean "not given" (the contract's rule)."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{field}: must be a positive integer id")
    return value


# PATH_MAX less the terminating NUL.
MAX_PATH = 4095


def host_path(value: object, field: str) -> str:
    """An absolute path on the host, as given (symlinks are followed when it is opened)."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field}: must be a non-empty string")
    if not value.startswith("/"):
        raise BadRequest(f"{field}: {value!r} is not an absolute path")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"{field}: not a valid UTF-8 path") from None
    if "\0" in value or size > MAX_PATH:
        raise BadRequest(f"{field}: not a usable path (NUL byte, or longer than {MAX_PATH})")
    return value


def host_file_spec(spec: dict[str, object]) -> dict[str, object]:
    """`{"path": <absolute host path>, "ro": <bool, default true>}`: local images' common part.

    With `base` (the 0.2 shape, translated by `imageapi.api.dialect`): `base: "root"` keeps an
    absolute host path, `base: "mount"` a path inside the generic mount under `mount`, which
    the object then stands on. `ro` has no default here: each dialect gives its own."""
    ro = spec.get("ro", True)
    if not isinstance(ro, bool):
        raise BadRequest("ro: must be true or false")
    base = spec.get("base")
    if base is None:
        return {"path": host_path(spec.get("path"), "path"), "ro": ro}
    if base == "root":
        return {"path": host_path(spec.get("path"), "path"), "ro": ro, "base": "root"}
    if base != "mount":
        raise BadRequest(f"base: {base!r} is neither 'root' nor 'mount'")
    if not isinstance(spec.get("mount"), dict):
        raise BadRequest("mount: required when base is 'mount' (the mount the path lies in)")
    return {"path": path_in_mount(spec.get("path"), "path"), "ro": ro, "base": "mount",
            "mount": spec["mount"]}


def path_in_mount(value: object, field: str) -> str:
    """A path inside a mount, relative to its root (a leading `/` means that root too)."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field}: must be a non-empty string")
    host_path("/" + value.lstrip("/"), field)  # the same limits as a host path
    return value.lstrip("/") or "."
