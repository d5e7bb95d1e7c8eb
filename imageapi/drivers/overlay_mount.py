"""An overlayfs mount over one or more lower mounts, with a private read-write upper layer.

The upper and work directories are created fresh for each overlay and removed with it, so an
overlay is a non-destructive, throw-away read-write view of its (read-only) lowers.

Layers go to the kernel one `lowerdir+` at a time through the new mount API (fsopen/fsconfig;
overlayfs takes `lowerdir+` from Linux 6.8), so only overlayfs limits their number (500).
Without it they go in mount(2)'s option string, which the kernel cuts at one page: a request
that does not fit is refused (400) rather than mounted with the tail of its layers and its
upperdir silently gone. Either way, the layers mountinfo shows are checked against those asked.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageapi.drivers.base import Need, Node, Spec, State
from imageapi.drivers.generic import generic_need
from imageapi.drivers.mountpoints import MountpointDriver, mount_error, remove_dir
from imageapi.errors import ApiError, BadRequest, SystemFault, describe_oserror
from imageapi.kernel import mount as kmount

log = logging.getLogger(__name__)

# Test-only: IMAGEAPI_TEST_MOUNT_API=legacy makes every overlay use mount(2)'s option string,
# so tests exercise the fallback on a kernel that has the new API. Read once, at import.
FORCE_LEGACY = os.environ.get("IMAGEAPI_TEST_MOUNT_API") == "legacy"


class _NoLayerApi(Exception):
    """The kernel cannot take this overlay's layers one by one: use the option string."""


def _mount_by_layers(lowers: list[str], upper: str, work: str, target: str) -> None:
    if max(len(os.fsencode(p)) for p in (*lowers, upper, work)) > kmount.FSCONFIG_VALUE_MAX:
        raise _NoLayerApi  # too long for an fsconfig value; the option string has no such limit
    try:
        fs = kmount.fsopen("overlay")
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise _NoLayerApi from exc
        raise
    try:
        kmount.fsconfig(fs, kmount.FSCONFIG_SET_STRING, "source", "overlay")
        for i, lower in enumerate(lowers):
            try:
                kmount.fsconfig(fs, kmount.FSCONFIG_SET_STRING, "lowerdir+", lower)
            except OSError as exc:
                # Before 6.8 overlayfs does not know `lowerdir+`: EINVAL. Any other EINVAL of
                # the first layer comes back from the option string, so falling back is safe.
                if i == 0 and exc.errno == errno.EINVAL:
                    raise _NoLayerApi from exc
                raise
        kmount.fsconfig(fs, kmount.FSCONFIG_SET_STRING, "upperdir", upper)
        kmount.fsconfig(fs, kmount.FSCONFIG_SET_STRING, "workdir", work)
        kmount.fsconfig(fs, kmount.FSCONFIG_CMD_CREATE, path=target)
        mnt = kmount.fsmount(fs)
        try:
            kmount.move_mount(mnt, "", kmount.AT_FDCWD, target, kmount.MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mnt)  # attached now (or dropped); an open fd would keep it busy
    except OSError as exc:
        if exc.errno == errno.ENOSYS:  # e.g. fsmount filtered by seccomp: nothing is mounted
            raise _NoLayerApi from exc
        raise
    finally:
        os.close(fs)


def _escape(path: str) -> str:
    # overlayfs splits its option string at ',' and lowerdir at ':', honouring backslashes.
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _unescape_split(value: str) -> list[str]:
    """An option-string value split at unescaped ':' and unescaped, as overlayfs reads it."""
    parts, current, chars = [], [], iter(value)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def legacy_options(lowers: list[str], upper: str, work: str) -> str:
    """mount(2)'s overlay data for these layers; a 400 if the kernel would cut it."""
    data = (
        f"lowerdir={':'.join(_escape(p) for p in lowers)},"
        f"upperdir={_escape(upper)},workdir={_escape(work)}"
    )
    size = len(os.fsencode(data))
    if size > kmount.MOUNT_DATA_MAX:
        raise BadRequest(
            f"lower: {len(lowers)} layers are too many for mount(2) here: their overlay options "
            f"take {size} bytes and the kernel reads at most {kmount.MOUNT_DATA_MAX} (one page "
            f"of {kmount.MOUNT_DATA_MAX + 1} bytes, less its NUL); fewer layers fit, and a "
            "kernel with overlayfs's lowerdir+ (Linux 6.8) takes them one by one"
        )
    return data


def mount_overlay(lowers: list[str], upper: str, work: str, target: str) -> bool:
    """Mount the overlay on `target`; True if it went through mount(2)'s option string."""
    if not FORCE_LEGACY:
        try:
            _mount_by_layers(lowers, upper, work, target)
            return False
        except _NoLayerApi:
            pass
    kmount.mount("overlay", target, "overlay", 0, legacy_options(lowers, upper, work))
    return True


def shown_layers(target: str, legacy: bool) -> tuple[list[str], str | None, str | None]:
    """(lower layers, upperdir, workdir) of the overlay mountinfo shows on `target`."""
    where = os.path.realpath(target)  # mountinfo shows /run for /var/run, and so on
    entries = [e for e in kmount.mountinfo() if e.mountpoint == where and e.fstype == "overlay"]
    if not entries:
        return [], None, None
    lowers: list[str] = []
    upper = work = None
    # lowerdir+ values are shown as given; the option string's values as we escaped them.
    for key, value in kmount.super_options(entries[-1].options):  # the topmost mount
        if key == "lowerdir+":
            lowers.append(value)
        elif key == "lowerdir":
            lowers.extend(_unescape_split(value) if legacy else [value])
        elif key == "upperdir":
            upper = "".join(_unescape_split(value)) if legacy else value
        elif key == "workdir":
            work = "".join(_unescape_split(value)) if legacy else value
    return lowers, upper, work


def layer_differences(
    shown: tuple[list[str], str | None, str | None], lowers: list[str], upper: str, work: str
) -> list[str]:
    """What the kernel shows otherwise than asked, in words; empty when all is as asked."""
    got_lowers, got_upper, got_work = shown
    problems = []
    if len(got_lowers) != len(lowers):
        problems.append(f"{len(got_lowers)} lower layers of the {len(lowers)} asked for")
    else:
        for i, (got, asked) in enumerate(zip(got_lowers, lowers, strict=True)):
            if got != asked:
                problems.append(f"lower layer {i} as {got} (asked: {asked})")
                break
    for name, got, asked in (("upperdir", got_upper, upper), ("workdir", got_work, work)):
        if got is None:
            problems.append(f"no {name}")
        elif got != asked:
            problems.append(f"{name} {got} (asked: {asked})")
    return problems


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
        lowers = [dep.record["mountpoint"] for _need, dep in node.needs]
        made: list[Path] = []
        try:
            for prefix in ("mount_", "upper_", "work_"):
                made.append(self.fresh(node.id, prefix))
            target, upper, work = made
            with self.step(node.id, "mount", path=str(target), source="overlay",
                           fstype="overlay"):
                legacy = mount_overlay(lowers, str(upper), str(work), str(target))
        except (OSError, ApiError) as exc:
            for path in reversed(made):
                remove_dir(path, tree=True)
            if isinstance(exc, ApiError):
                raise
            if exc.errno == errno.ELOOP:
                # overlayfs refuses layers that overlap: the request named one filesystem twice
                # (the same mount, or two mounts of one image). The client's doing: a 400.
                raise BadRequest(
                    describe_oserror(exc, "cannot mount the overlay: its lower layers overlap")
                ) from exc
            raise mount_error(exc, "cannot mount the overlay") from exc
        problems = layer_differences(
            shown_layers(str(target), legacy), lowers, str(upper), str(work)
        )
        if problems:
            try:
                kmount.umount(str(target), kmount.UMOUNT_NOFOLLOW)  # nothing can use it yet
            except OSError as exc:
                log.error("cannot unmount the wrong overlay %s: %s", target, exc)
            for path in reversed(made):
                remove_dir(path, tree=True)
            raise SystemFault(
                f"the kernel did not mount the overlay asked for: it shows {', '.join(problems)}"
            )
        return {"mountpoint": str(target), "upperdir": str(upper), "workdir": str(work)}

    private_dirs = ("upperdir", "workdir")

    def fstype_of(self, node: Node) -> str | None:
        return "overlay"

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        lower = []
        for _need, dep in node.needs:
            item: dict[str, Any] = {"kind": dep.kind, "mount_id": dep.id}
            if node.owns(dep):
                item[dep.kind] = embed(dep)
            lower.append(item)
        return {"id": node.id, "lower": lower, **node.record}
