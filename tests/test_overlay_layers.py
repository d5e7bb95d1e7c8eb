"""Overlays with many lower layers (issue 10, case 2), against a real server and the kernel.

mount(2) reads one page of option text and silently cuts the rest: with 45-character mount
dirs, 67 lowers fill the page exactly, so 68 or more used to mount as 67 layers and no
upperdir — a read-only "writable" overlay. Every test runs twice: on a server that passes the
layers one `lowerdir+` each (new mount API), and on one forced to mount(2)'s option string
(IMAGEAPI_TEST_MOUNT_API=legacy), which must refuse what does not fit with a 400.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageapi.drivers import overlay_mount
from imageapi.errors import BadRequest
from imageapi.kernel import mount as km
from tests import hostview
from tests.apiclient import Api, ref
from tests.conftest import Server, Stack, checked_server, need_privileges

# mount_XXXXXXXX under a 45-character dir is 60 characters: "lowerdir=" and 67 of them with
# their colons make 4095 bytes, the page less its NUL, so the cut falls between layers.
MOUNT_DIR_LEN = 45
PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_LOWERS = 100


@pytest.fixture(scope="module", params=["lowerdir+", "legacy"])
def mount_api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(
    sim: Any, cgroup_root: Path, mount_api: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server whose mount dir is MOUNT_DIR_LEN characters long, on the given mount API."""
    base = tmp_path_factory.mktemp("o")
    pad = MOUNT_DIR_LEN - len(f"{base}//mounts")
    assert pad >= 1, f"base temp dir {base} too long for a {MOUNT_DIR_LEN}-character mount dir"
    run_dir = base / ("r" * pad)
    assert len(str(run_dir / "mounts")) == MOUNT_DIR_LEN
    with checked_server(
        run_dir, "--rbd-sysfs", str(sim.sysfs), "--dev-dir", str(sim.devdir),
        "--cgroup-root", str(cgroup_root),
        env={"IMAGEAPI_TEST_MOUNT_API": "legacy" if mount_api == "legacy" else ""},
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def layer_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Host directories, each with a file of its own and a `who` naming it."""
    root = tmp_path_factory.mktemp("layers")
    dirs = []
    for i in range(MAX_LOWERS):
        d = root / f"L{i:03d}"
        d.mkdir()
        (d / f"layer-{i}").write_text(f"{i}\n")
        (d / "who").write_text(f"{i}\n")
        dirs.append(d)
    return dirs


def _octal(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def kernel_overlay(mountpoint: str) -> dict[str, Any] | None:
    """The topmost overlay on `mountpoint` as /proc/self/mountinfo shows it."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            if _octal(fields[4]) != mountpoint:
                continue
            fstype, source, options = right.split(" ")
            lowers: list[str] = []
            upper = None
            for item in options.split(","):  # the kernel escapes commas inside values
                key, _, value = item.partition("=")
                if key == "lowerdir+":
                    lowers.append(_octal(value))
                elif key == "lowerdir":
                    lowers += _octal(value).split(":")  # our test paths have no ':'
                elif key == "upperdir":
                    upper = _octal(value)
            found = {"fstype": fstype, "source": source, "mount": fields[5].split(","),
                     "lowers": lowers, "upper": upper}  # fmt: skip
    return found


def legacy_size(count: int) -> int:
    """Bytes of mount(2) data for `count` lowers: every layer dir is MOUNT_DIR_LEN + 15
    characters (work_XXXXXXXX one less)."""
    path = MOUNT_DIR_LEN + len("/mount_XXXXXXXX")
    return (len("lowerdir=") + count * path + count - 1 + len(",upperdir=") + path
            + len(",workdir=") + path - 1)  # fmt: skip


def names(mount_dir: Path) -> set[str]:
    """The mount_/upper_/work_ dirs in the server's mount dir."""
    return {p.name for p in mount_dir.iterdir()}


def bind_all(api: Api, dirs: list[Path]) -> list[dict[str, Any]]:
    return [api.post("/mount/bind", {"path": str(d)}) for d in dirs]


def unbind_all(api: Api, binds: list[dict[str, Any]]) -> None:
    """Remove the binds, and first any overlay a failed test left on them (this module's
    server holds no other overlays), so a failure is reported once, not as leaks too."""
    for ovl in api.get("/mount/overlay"):
        api.request("DELETE", f"/mount/overlay/{ovl['id']}")
    for bind in reversed(binds):
        api.delete(f"/mount/bind/{bind['id']}")


@pytest.mark.parametrize("count", [3, 64, 65, 67, 68, 80, MAX_LOWERS])
def test_overlay_mounts_every_layer_or_refuses(
    stack: Stack, mount_api: str, layer_dirs: list[Path], count: int
) -> None:
    api = stack.api
    mount_dir = stack.server.run_dir / "mounts"
    before = names(mount_dir)
    binds = bind_all(api, layer_dirs[:count])
    try:
        body = {"lower": [{"kind": "bind", "mount_id": b["id"]} for b in binds]}
        if mount_api == "legacy" and legacy_size(count) > PAGE - 1:
            refused = api.request("POST", "/mount/overlay", 400, json=body).json()
            message = refused["message"]
            assert message.startswith(f"lower: {count} layers are too many for mount(2)")
            assert f"take {legacy_size(count)} bytes" in message, message
            assert f"at most {PAGE - 1} (one page of {PAGE} bytes" in message, message
            # Nothing was made: no overlay, no mount_/upper_/work_ dir, no mount.
            assert api.get("/mount/overlay") == []
            assert names(mount_dir) - before == {
                Path(b["mountpoint"]).name for b in binds
            }
            assert not [m for m in hostview.mounts() if m[1] == "overlay"
                        and m[0].startswith(str(mount_dir))]  # fmt: skip
            return
        ovl = api.post("/mount/overlay", body)
        try:
            assert [ref(x) for x in ovl["lower"]] == [{"kind": "bind", "mount_id": b["id"]}
                                                     for b in binds]
            top, upper = Path(ovl["mountpoint"]), Path(ovl["upperdir"])
            seen = kernel_overlay(str(top))
            assert seen is not None, f"no mount on {top}"
            assert (seen["fstype"], seen["source"]) == ("overlay", "overlay")
            assert seen["lowers"] == [b["mountpoint"] for b in binds]
            assert seen["upper"] == str(upper) and "rw" in seen["mount"]
            # Every layer shows through; for a name in all of them, lower[0] (the top) wins.
            for i in range(count):
                assert (top / f"layer-{i}").read_text() == f"{i}\n", f"layer {i} missing"
            assert (top / "who").read_text() == "0\n"
            (top / "written-here").write_text("upper\n")
            assert (upper / "written-here").read_text() == "upper\n"
            assert not [d for d in layer_dirs if (d / "written-here").exists()]
        finally:
            api.delete(f"/mount/overlay/{ovl['id']}")
        assert kernel_overlay(str(top)) is None
        assert not top.exists() and not upper.exists() and not Path(ovl["workdir"]).exists()
    finally:
        unbind_all(api, binds)


def test_overlapping_layers_are_still_a_400(
    stack: Stack, mount_api: str, layer_dirs: list[Path]
) -> None:
    """Two bind mounts of one directory overlap: overlayfs says ELOOP on either path."""
    api = stack.api
    before = names(stack.server.run_dir / "mounts")
    binds = bind_all(api, [layer_dirs[0], layer_dirs[0]])
    try:
        body = {"lower": [{"kind": "bind", "mount_id": b["id"]} for b in binds]}
        refused = api.request("POST", "/mount/overlay", 400, json=body).json()
        assert refused["message"].startswith(
            "ELOOP: cannot mount the overlay: its lower layers overlap"
        ), refused
        assert api.get("/mount/overlay") == []
        assert names(stack.server.run_dir / "mounts") - before == {
            Path(b["mountpoint"]).name for b in binds
        }
    finally:
        unbind_all(api, binds)


# -- the kernel's limits themselves, without a server ------------------------------------------


@pytest.fixture
def overlay_dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    need_privileges()
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "target")}
    for d in dirs.values():
        d.mkdir()
    yield dirs
    for _ in range(3):  # a failed test may leave a mount or two stacked
        try:
            km.umount(str(dirs["target"]), km.UMOUNT_NOFOLLOW)
        except OSError as exc:
            assert exc.errno == errno.EINVAL, exc
    assert not [m for m in km.mountinfo() if m.mountpoint.startswith(str(tmp_path))]


def lowers_of_size(root: Path, upper: str, work: str, total: int) -> list[str]:
    """Lower dirs (made) under `root` whose mount(2) options are exactly `total` bytes."""
    prefix = len(f"{root}/")
    budget = total - len(overlay_mount.legacy_options([], upper, work)) + 1  # n-1 colons
    lowers = []
    while budget > prefix + 1 + 255:  # each costs its path and a colon; a name is <= 255
        lowers.append(f"{root}/{len(lowers):03d}" + "x" * 97)
        budget -= prefix + 101
    lowers.append(f"{root}/{len(lowers):03d}" + "y" * (budget - prefix - 4))
    for path in lowers:
        os.mkdir(path)
    return lowers


def test_mount_data_is_cut_at_one_page_and_the_cut_is_caught(
    overlay_dirs: dict[str, Path],
) -> None:
    upper, work, target = (str(overlay_dirs[k]) for k in ("upper", "work", "target"))
    lowers = lowers_of_size(overlay_dirs["lower"], upper, work, km.MOUNT_DATA_MAX)
    assert km.MOUNT_DATA_MAX == PAGE - 1

    # The longest text that fits arrives whole.
    data = overlay_mount.legacy_options(lowers, upper, work)
    assert len(data) == PAGE - 1
    km.mount("overlay", target, "overlay", 0, data)
    shown = overlay_mount.shown_layers(target, legacy=True)
    assert overlay_mount.layer_differences(shown, lowers, upper, work) == []
    km.umount(target)

    # One byte more is refused before the kernel sees it ...
    longer = [*lowers[:-1], lowers[-1] + "z"]
    os.mkdir(longer[-1])
    with pytest.raises(BadRequest) as refused:
        overlay_mount.legacy_options(longer, upper, work)
    assert f"take {PAGE} bytes" in refused.value.message
    # ... because the kernel would drop it silently: with the lowers last, the cut leaves the
    # previous name of the last layer, which exists, and the overlay mounts on the wrong one.
    data = f"upperdir={upper},workdir={work},lowerdir={':'.join(longer)}"
    assert len(data) == PAGE
    km.mount("overlay", target, "overlay", 0, data)
    shown = overlay_mount.shown_layers(target, legacy=True)
    assert overlay_mount.layer_differences(shown, longer, upper, work) == [
        f"lower layer {len(longer) - 1} as {lowers[-1]} (asked: {longer[-1]})"
    ]
    km.umount(target)


def test_fsconfig_string_values_end_at_255_bytes(overlay_dirs: dict[str, Path]) -> None:
    fs = km.fsopen("overlay")
    try:
        missing = "/" + "x" * (km.FSCONFIG_VALUE_MAX - 1)
        with pytest.raises(OSError) as err:
            km.fsconfig(fs, km.FSCONFIG_SET_STRING, "lowerdir+", missing)
        assert (err.value.errno, err.value.filename) == (errno.ENOENT, missing)
        with pytest.raises(OSError) as err:
            km.fsconfig(fs, km.FSCONFIG_SET_STRING, "lowerdir+", missing + "x")
        assert err.value.errno == errno.EINVAL
    finally:
        os.close(fs)
    # An unknown key: the filesystem's own words reach the error.
    fs = km.fsopen("overlay")
    try:
        with pytest.raises(OSError) as err:
            km.fsconfig(fs, km.FSCONFIG_SET_STRING, "no-such-option", "1")
        assert err.value.errno == errno.EINVAL
        assert "overlay: Unknown parameter 'no-such-option'" in str(err.value.strerror)
    finally:
        os.close(fs)


@pytest.mark.parametrize(
    "without", ["nothing", "the new mount API", "lowerdir+ (overlayfs before 6.8)",
                "fsconfig room for a path over 255 bytes"],
)  # fmt: skip
def test_the_option_string_is_the_fallback(
    overlay_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, without: str
) -> None:
    monkeypatch.setattr(overlay_mount, "FORCE_LEGACY", False)
    upper, work, target = (str(overlay_dirs[k]) for k in ("upper", "work", "target"))
    layers = [overlay_dirs["lower"] / "a", overlay_dirs["lower"] / "b"]
    if without == "the new mount API":
        monkeypatch.setattr(km, "_SYSCALL_NUMBERS", {})  # as on an architecture we lack
    elif without.startswith("lowerdir+"):
        real = km.fsconfig

        def old_overlayfs(fs_fd: int, cmd: int, key: str | None = None, *args: Any,
                          **kwargs: Any) -> None:  # fmt: skip
            # The kernel's own EINVAL for a key overlayfs does not know.
            real(fs_fd, cmd, "lowerdir-unknown" if key == "lowerdir+" else key, *args, **kwargs)

        monkeypatch.setattr(km, "fsconfig", old_overlayfs)
    elif without.startswith("fsconfig room"):
        layers[1] = overlay_dirs["lower"] / ("b" * 255)
    for i, layer in enumerate(layers):
        layer.mkdir()
        (layer / f"layer-{i}").write_text(f"{i}\n")
    lowers = [str(p) for p in layers]
    legacy = overlay_mount.mount_overlay(lowers, upper, work, target)
    assert legacy is (without != "nothing")
    shown = overlay_mount.shown_layers(target, legacy)
    assert overlay_mount.layer_differences(shown, lowers, upper, work) == []
    assert [(Path(target) / f"layer-{i}").read_text() for i in range(2)] == ["0\n", "1\n"]
    km.umount(target)
