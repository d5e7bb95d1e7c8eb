"""Local images: image files attached as loop devices (`/attach/loopback`, `/mount/loopback`)
and host directories bind-mounted (`/mount/bind`), through the API of a real server, down to
booted containers; plus the kernel layer (`imageapi.kernel.loop`) on its own.

The `stack` fixture checks after every test that no mount, loop device (bound to a file under
the test's temporary directory) or object is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageapi.kernel import loop as kloop
from tests import hostview
from tests.apiclient import ref
from tests.conftest import Stack, need_privileges


def mounted(path: str) -> str | None:
    """The fstype mounted exactly at `path`, if any."""
    for mountpoint, fstype, _source in hostview.mounts():
        if mountpoint == path:
            return fstype
    return None


def mount_options(path: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                return set(fields[5].split(","))
    raise AssertionError(f"{path} is not mounted")


def loops_of(image: Path) -> list[str]:
    """Loop devices bound to `image` (compared by inode, as the server does)."""
    want = image.stat()
    found = []
    for dev, backing in hostview.loop_devices().items():
        with contextlib.suppress(OSError):
            st = os.stat(backing)
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                found.append(dev)
    return sorted(found)


def sysfs(device_file: str, attr: str) -> str:
    return (Path("/sys/block") / Path(device_file).name / attr).read_text().strip()


def direct_io_possible(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def wait_state(stack: Stack, cid: int, states: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = stack.api.get(f"/container/{cid}")
        if view["state"] in states:
            return view
        assert time.monotonic() < deadline, f"container {cid} still {view['state']}"
        time.sleep(0.05)


@pytest.fixture
def image(squashfs_image: Path, tmp_path: Path) -> Path:
    """A private copy of the test image: loop devices bound to it are this test's alone."""
    copy = tmp_path / "image.sqsh"
    shutil.copyfile(squashfs_image, copy)
    return copy


def squashfs_mount(**source: Any) -> dict[str, Any]:
    return {"fs_type": "squashfs", "mount_options": ["ro"], **source}


HI = "/bin/sh -c 'echo hi > /out'"


# -- image files ---------------------------------------------------------------------------------


def test_image_file_by_id_mounted_overlaid_and_booted(stack: Stack, image: Path) -> None:
    api = stack.api
    lb = api.post("/attach/loopback", {"path": str(image)})
    assert lb["path"] == str(image) and lb["ro"] is True and lb["refs"] == 1
    device = lb["device_file"]
    assert device.startswith("/dev/loop") and Path(device).is_block_device()
    assert loops_of(image) == [Path(device).name]
    assert sysfs(device, "ro") == "1"
    # No autoclear: an attachment is an object of the durable record, like an rbd mapping,
    # and must outlive a daemon restart even while nothing mounts it.
    assert sysfs(device, "loop/autoclear") == "0"
    assert sysfs(device, "loop/dio") == ("1" if direct_io_possible(image) else "0")
    time.sleep(0.3)
    assert loops_of(image) == [Path(device).name]
    assert api.get("/attach/loopback") == [lb]
    assert api.get(f"/attach/loopback/{lb['id']}") == lb

    mnt = api.post("/mount/loopback", squashfs_mount(loopback_id=lb["id"]))
    assert mnt["loopback_id"] == lb["id"] and "loopback" not in mnt
    root = Path(mnt["mountpoint"])
    assert mounted(str(root)) == "squashfs"
    assert (root / "etc/os-release").read_text().startswith('NAME="imageapi test image"')
    assert api.get(f"/attach/loopback/{lb['id']}")["refs"] == 2

    ovl = api.post("/mount/overlay", {"lower": [{"kind": "loopback", "mount_id": mnt["id"]}]})
    assert [ref(x) for x in ovl["lower"]] == [{"kind": "loopback", "mount_id": mnt["id"]}]
    listed = {(m["kind"], m["mount_id"]) for m in api.get("/mount")}
    assert listed == {("loopback", mnt["id"]), ("overlay", ovl["id"])}
    # The legacy bare-integer lower knows the kind of a loopback mount too.
    legacy = api.post("/mount/overlay", {"lower": [mnt["id"]]})
    assert [ref(x) for x in legacy["lower"]] == [{"kind": "loopback", "mount_id": mnt["id"]}]
    api.delete(f"/mount/overlay/{legacy['id']}")

    c = api.post("/container", {"mount": {"kind": "overlay", "mount_id": ovl["id"]},
                                "command": HI, "state": "running"})  # fmt: skip
    assert wait_state(stack, c["id"], {"exited", "dead"})["state"] == "exited"
    assert (Path(ovl["upperdir"]) / "out").read_text() == "hi\n"

    # In use: refused, nothing changes.
    refused = api.delete(f"/attach/loopback/{lb['id']}", expect=409)
    assert f"loopback mount {mnt['id']}" in refused["message"]
    api.delete(f"/mount/loopback/{mnt['id']}", expect=409)
    assert loops_of(image) == [Path(device).name]

    api.delete(f"/container/{c['id']}")
    api.delete(f"/mount/overlay/{ovl['id']}")
    gone = api.delete(f"/mount/loopback/{mnt['id']}")
    assert gone["id"] == mnt["id"] and mounted(str(root)) is None and not root.exists()
    assert loops_of(image) == [Path(device).name], "the attachment survives its mount"
    gone = api.delete(f"/attach/loopback/{lb['id']}")
    assert gone == {**lb, "refs": 0}
    assert loops_of(image) == []
    api.get(f"/attach/loopback/{lb['id']}", expect=404)


def test_image_file_inline_in_one_container_request(stack: Stack, image: Path) -> None:
    api = stack.api
    c = api.post("/container", {
        "mount": {"kind": "overlay", "overlay": {"lower": [
            {"kind": "loopback", "loopback": squashfs_mount(loopback={"path": str(image)})},
        ]}},
        "command": HI, "state": "running",
    })  # fmt: skip
    ovl = c["mount"]["overlay"]
    inner = ovl["lower"][0]["loopback"]
    lb = inner["loopback"]
    assert inner["loopback_id"] == lb["id"] and lb["refs"] == 1 and lb["ro"] is True
    assert lb["id"] < inner["id"] < ovl["id"] < c["id"]
    assert loops_of(image) == [Path(lb["device_file"]).name]
    assert wait_state(stack, c["id"], {"exited", "dead"})["state"] == "exited"
    assert (Path(ovl["upperdir"]) / "out").read_text() == "hi\n"
    # Inline children belong to their owner.
    refused = api.delete(f"/attach/loopback/{lb['id']}", expect=409)
    assert "defined inside" in refused["message"]

    api.delete(f"/container/{c['id']}")
    assert api.get("/attach/loopback") == [] and api.get("/mount") == []
    assert loops_of(image) == []
    assert mounted(inner["mountpoint"]) is None


def test_generic_mount_of_an_image_file(stack: Stack, image: Path) -> None:
    api = stack.api
    made = api.post(
        "/mount", {"kind": "loopback", "loopback": squashfs_mount(loopback={"path": str(image)})}
    )
    view = made["loopback"]
    assert made["kind"] == "loopback" and made["mount_id"] == view["id"]
    assert view["loopback"]["id"] == view["loopback_id"]
    assert api.get("/mount") == [made]
    assert api.get("/mount/loopback") == [view]
    api.request("DELETE", "/mount", 200, json={"kind": "loopback", "mount_id": view["id"]})
    assert api.get("/attach/loopback") == [] and loops_of(image) == []


def test_read_only_attachments_share_a_file(stack: Stack, image: Path) -> None:
    api = stack.api
    first = api.post("/attach/loopback", {"path": str(image)})
    # The same file by another path (a hard link) is the same file.
    link = image.with_name("link.sqsh")
    os.link(image, link)
    second = api.post("/attach/loopback", {"path": str(link), "ro": True})
    assert first["device_file"] != second["device_file"]
    assert len(loops_of(image)) == 2
    mounts = [api.post("/mount/loopback", squashfs_mount(loopback_id=lb["id"]))
              for lb in (first, second)]  # fmt: skip
    for m in mounts:
        assert (Path(m["mountpoint"]) / "etc/hostname").read_text() == "testimage\n"
    refused = api.post("/attach/loopback", {"path": str(link), "ro": False}, expect=409)
    assert "already attached read-only" in refused["message"]
    for m in mounts:
        api.delete(f"/mount/loopback/{m['id']}")
    for lb in (first, second):
        api.delete(f"/attach/loopback/{lb['id']}")
    assert loops_of(image) == []


def test_read_write_attachment_is_exclusive(stack: Stack, image: Path) -> None:
    api = stack.api
    rw = api.post("/attach/loopback", {"path": str(image), "ro": False})
    assert rw["ro"] is False and sysfs(rw["device_file"], "ro") == "0"
    for body in ({"path": str(image), "ro": False}, {"path": str(image)}):
        refused = api.post("/attach/loopback", body, expect=409)
        assert f"already attached read-write by loopback {rw['id']}" in refused["message"]
    refused = api.post("/mount/loopback", squashfs_mount(loopback={"path": str(image)}),
                       expect=409)  # fmt: skip
    assert "read-write" in refused["message"]
    assert loops_of(image) == [Path(rw["device_file"]).name]
    assert api.get("/mount") == []
    api.delete(f"/attach/loopback/{rw['id']}")
    assert loops_of(image) == []
    ro = api.post("/attach/loopback", {"path": str(image)})
    api.delete(f"/attach/loopback/{ro['id']}")


def losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def test_file_attached_outside_imageapi(stack: Stack, image: Path) -> None:
    api = stack.api
    outside = losetup("--find", "--show", str(image))  # read-write
    try:
        for body in ({"path": str(image)}, {"path": str(image), "ro": False}):
            refused = api.post("/attach/loopback", body, expect=409)
            assert f"read-write as {outside} (outside imageapi)" in refused["message"]
    finally:
        losetup("--detach", outside)
    outside = losetup("--find", "--show", "--read-only", str(image))
    try:
        refused = api.post("/attach/loopback", {"path": str(image), "ro": False}, expect=409)
        assert f"read-only as {outside} (outside imageapi)" in refused["message"]
        shared = api.post("/attach/loopback", {"path": str(image)})  # ro beside ro: fine
        api.delete(f"/attach/loopback/{shared['id']}")
    finally:
        losetup("--detach", outside)
    assert loops_of(image) == []


def test_detach_refused_while_mounted_outside(stack: Stack, image: Path, tmp_path: Path) -> None:
    api = stack.api
    lb = api.post("/attach/loopback", {"path": str(image)})
    where = tmp_path / "outside"
    where.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "ro", lb["device_file"], str(where)],
                   check=True)  # fmt: skip
    try:
        refused = api.delete(f"/attach/loopback/{lb['id']}", expect=409)
        assert refused["message"].startswith("EBUSY: ")
        assert api.get(f"/attach/loopback/{lb['id']}") == lb
    finally:
        subprocess.run(["umount", str(where)], check=True)
    api.delete(f"/attach/loopback/{lb['id']}")
    assert loops_of(image) == []


@pytest.fixture
def odd_paths(tmp_path: Path) -> Iterator[dict[str, str]]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not an image\n")
    yield {
        "missing": str(tmp_path / "missing.sqsh"),
        "under-a-file": str(tmp_path / "file" / "x.sqsh"),
        "relative": "image.sqsh",
        "dot-relative": "./image.sqsh",
        "directory": str(tmp_path / "dir"),
        "device": "/dev/null",
        "block-device": str(
            next(p for p in sorted(Path("/dev").glob("loop[0-9]*")) if p.is_block_device())
        ),
        "fifo": str(fifo),
        "socket": str(sock_path),
        "nul-byte": str(tmp_path / "a\0b"),
    }
    sock.close()


BAD_FILE_PATHS = {
    # A relative path is refused by the schema already (pattern "^/").
    "missing": "ENOENT", "under-a-file": "ENOTDIR", "relative": "does not match",
    "dot-relative": "does not match", "directory": "a directory", "device": "a character device",
    "block-device": "a block device", "fifo": "a fifo", "socket": "a socket",
    "nul-byte": "path",
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILE_PATHS))
def test_bad_image_paths_are_refused(stack: Stack, odd_paths: dict[str, str], case: str) -> None:
    api = stack.api
    path = odd_paths[case]
    says = BAD_FILE_PATHS[case]
    for where, body in (
        ("/attach/loopback", {"path": path}),
        ("/attach/loopback", {"path": path, "ro": False}),
        ("/mount/loopback", squashfs_mount(loopback={"path": path})),
        ("/mount", {"kind": "overlay", "overlay": {"lower": [
            {"kind": "bind", "bind": {"path": str(Path(odd_paths["directory"]))}},
            {"kind": "loopback", "loopback": squashfs_mount(loopback={"path": path})},
        ]}}),
    ):  # fmt: skip
        answer = api.request("POST", where, json=body)
        assert answer.status_code == 400, f"{where} {body}: {answer.text}"
        message = answer.json()["message"]
        assert "path" in message and says in message, message
    assert api.get("/attach/loopback") == [] and api.get("/mount") == []


@pytest.mark.parametrize(
    "body",
    [{}, {"path": ""}, {"path": 7}, {"path": "/x", "ro": "yes"}, {"path": "/x", "rw": True},
     {"path": "/x", "offset": 4096}],
)  # fmt: skip
def test_bad_loopback_bodies(stack: Stack, body: dict[str, Any]) -> None:
    answer = stack.api.request("POST", "/attach/loopback", 400, json=body)
    assert answer.json()["message"].startswith("body")


def test_loop_device_ids_and_kinds_do_not_mix(stack: Stack, image: Path) -> None:
    api = stack.api
    lb = api.post("/attach/loopback", {"path": str(image)})
    api.get(f"/attach/rbd/{lb['id']}", expect=404)
    wrong = api.post("/mount/rbd", {"fs_type": "squashfs", "rbd_id": lb["id"]}, expect=400)
    assert "is a loopback, not an rbd" in wrong["message"]
    refused = api.post("/mount/loopback", {"fs_type": "ext4", "loopback_id": lb["id"]},
                       expect=400)  # fmt: skip
    assert "cannot mount" in refused["message"]
    api.delete(f"/attach/loopback/{lb['id']}")


# -- host directories ----------------------------------------------------------------------------


def test_directory_bound_as_overlay_lower_and_booted(stack: Stack, image_tree: Path) -> None:
    api = stack.api
    bind = api.post("/mount/bind", {"path": str(image_tree)})
    assert bind["path"] == str(image_tree) and bind["ro"] is True and bind["refs"] == 1
    root = Path(bind["mountpoint"])
    assert root.parent == stack.server.run_dir / "mounts" and root.name.startswith("mount_")
    assert (root / "etc/os-release").read_text() == (image_tree / "etc/os-release").read_text()
    assert "ro" in mount_options(str(root))
    with pytest.raises(OSError) as err:
        (root / "etc/nope").write_text("x")
    assert err.value.errno == errno.EROFS

    ovl = api.post("/mount/overlay", {"lower": [{"kind": "bind", "mount_id": bind["id"]}]})
    c = api.post("/container", {"mount": {"kind": "overlay", "mount_id": ovl["id"]},
                                "command": HI, "state": "running"})  # fmt: skip
    assert wait_state(stack, c["id"], {"exited", "dead"})["state"] == "exited"
    assert (Path(ovl["upperdir"]) / "out").read_text() == "hi\n"
    assert not (image_tree / "out").exists()
    api.delete(f"/mount/bind/{bind['id']}", expect=409)

    api.delete(f"/container/{c['id']}")
    api.delete(f"/mount/overlay/{ovl['id']}")
    assert api.delete(f"/mount/bind/{bind['id']}") == {**bind, "refs": 0}
    assert mounted(str(root)) is None and not root.exists()
    assert (image_tree / "etc/os-release").exists()


def test_directory_inline_in_one_container_request(stack: Stack, image_tree: Path) -> None:
    api = stack.api
    c = api.post("/container", {
        "mount": {"kind": "overlay", "overlay": {"lower": [
            {"kind": "bind", "bind": {"path": str(image_tree)}}]}},
        "command": HI, "state": "running",
    })  # fmt: skip
    ovl = c["mount"]["overlay"]
    assert ovl["lower"][0]["kind"] == "bind" and ovl["lower"][0]["bind"]["ro"] is True
    assert wait_state(stack, c["id"], {"exited", "dead"})["state"] == "exited"
    assert (Path(ovl["upperdir"]) / "out").read_text() == "hi\n"
    api.delete(f"/container/{c['id']}")
    assert api.get("/mount") == []


def test_read_write_bind(stack: Stack, tmp_path: Path) -> None:
    api = stack.api
    source = tmp_path / "data"
    source.mkdir()
    made = api.post("/mount", {"kind": "bind", "bind": {"path": str(source), "ro": False}})
    bind = made["bind"]
    assert bind["ro"] is False and "rw" in mount_options(bind["mountpoint"])
    Path(bind["mountpoint"], "written").write_text("through the bind\n")
    assert (source / "written").read_text() == "through the bind\n"
    api.request("DELETE", "/mount", 200, json={"kind": "bind", "mount_id": bind["id"]})
    assert (source / "written").exists()


def test_bind_keeps_the_source_mounts_flags(stack: Stack, tmp_path: Path) -> None:
    """A read-only remount of a bind replaces its per-mount flags; nosuid etc. must stay."""
    api = stack.api
    source = tmp_path / "strict"
    source.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,nodev,noexec", "strict", str(source)],
                   check=True)  # fmt: skip
    try:
        bind = api.post("/mount/bind", {"path": str(source)})
        assert {"ro", "nosuid", "nodev", "noexec"} <= mount_options(bind["mountpoint"])
        api.delete(f"/mount/bind/{bind['id']}")
    finally:
        subprocess.run(["umount", str(source)], check=True)


def test_bad_directories_are_refused(stack: Stack, odd_paths: dict[str, str], image: Path) -> None:
    api = stack.api
    mount_dir = stack.server.run_dir / "mounts"
    lb_mount = api.post("/mount/loopback", squashfs_mount(loopback={"path": str(image)}))
    link = Path(odd_paths["directory"]) / "to-mounts"
    link.symlink_to(mount_dir)
    try:
        cases = {
            odd_paths["missing"]: "ENOENT",
            # Relative paths are 0.2's, with `base: mount`: the schema allows them.
            odd_paths["relative"]: "not an absolute path",
            odd_paths["under-a-file"]: "ENOTDIR",
            str(image): "not a directory",
            odd_paths["device"]: "not a directory",
            odd_paths["nul-byte"]: "path",
            str(mount_dir): "inside imageapi's mount directory",
            lb_mount["mountpoint"]: "inside imageapi's mount directory",
            str(link): "inside imageapi's mount directory",
            "/": "contains imageapi's mount directory",
            str(stack.server.run_dir): "contains imageapi's mount directory",
        }
        for path, says in cases.items():
            for where, body in (
                ("/mount/bind", {"path": path}),
                ("/mount", {"kind": "bind", "bind": {"path": path}}),
            ):
                answer = api.request("POST", where, json=body)
                assert answer.status_code == 400, f"{where} {path!r}: {answer.text}"
                message = answer.json()["message"]
                assert "path" in message and says in message, message
        assert api.get("/mount/bind") == []
    finally:
        link.unlink()
        api.delete(f"/mount/loopback/{lb_mount['id']}")


# -- the kernel layer on its own -----------------------------------------------------------------


@pytest.fixture
def kernel_image(squashfs_image: Path, tmp_path: Path) -> Iterator[Path]:
    need_privileges()
    copy = tmp_path / "kernel.sqsh"
    shutil.copyfile(squashfs_image, copy)
    yield copy
    assert loops_of(copy) == [], "loop device left behind"


def attach(loop: kloop.Loop, image: Path, read_only: bool = True) -> kloop.LoopDevice:
    fd = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        return loop.attach(fd, read_only=read_only, name=str(image))
    finally:
        os.close(fd)


@pytest.mark.parametrize("configure", [None, False], ids=["LOOP_CONFIGURE", "LOOP_SET_FD"])
@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_kernel_attach_and_detach(kernel_image: Path, configure: bool | None,
                                  read_only: bool) -> None:  # fmt: skip
    loop = kloop.Loop(use_configure=configure)
    device = attach(loop, kernel_image, read_only)
    try:
        assert loop.use_configure is (configure is None)
        assert loops_of(kernel_image) == [device.name]
        assert device.read_only is read_only
        assert sysfs(device.path, "ro") == ("1" if read_only else "0")
        assert sysfs(device.path, "loop/autoclear") == "1"
        assert device.direct_io is (sysfs(device.path, "loop/dio") == "1")
        assert device.direct_io is direct_io_possible(kernel_image)
        st = kernel_image.stat()
        assert device.backing == (st.st_dev, st.st_ino)
        assert device.fd is not None
        info = loop.status(device.fd, device.path)
        assert (info.lo_device, info.lo_inode) == device.backing
        assert bytes(info.lo_file_name).rstrip(b"\0") == os.fsencode(kernel_image)[:63]
        assert [b for b in loop.bindings() if b.name == device.name] == [
            kloop.Binding(device.name, str(kernel_image), read_only, device.backing)
        ]
    finally:
        assert loop.detach(device) is True
    assert device.fd is None and loops_of(kernel_image) == []
    assert loop.detach(device) is True  # twice is harmless


def test_kernel_autoclear_needs_the_held_descriptor(kernel_image: Path) -> None:
    loop = kloop.Loop()
    device = attach(loop, kernel_image)
    assert device.fd is not None
    os.close(device.fd)  # what would happen if the daemon did not hold it
    device.fd = None
    deadline = time.monotonic() + 5
    while loops_of(kernel_image):
        assert time.monotonic() < deadline, "autoclear did not unbind the device"
        time.sleep(0.01)


def test_kernel_retries_when_the_free_device_is_taken(kernel_image: Path,
                                                      tmp_path: Path) -> None:  # fmt: skip
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 65536)
    taken = losetup("--find", "--show", str(other))
    number = int(taken.removeprefix("/dev/loop"))

    class Racy(kloop.Loop):
        """GET_FREE answers a device someone else bound meanwhile, once."""

        answered = False

        def get_free(self) -> int:
            if not self.answered:
                self.answered = True
                return number
            return super().get_free()

    try:
        loop = Racy()
        device = attach(loop, kernel_image)
        assert loop.answered and device.number != number
        assert loops_of(kernel_image) == [device.name]
        assert loop.detach(device)
    finally:
        losetup("--detach", taken)


def test_kernel_detach_refused_while_mounted(kernel_image: Path, tmp_path: Path) -> None:
    loop = kloop.Loop()
    device = attach(loop, kernel_image)
    where = tmp_path / "m"
    where.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "ro", device.path, str(where)], check=True)
    try:
        with pytest.raises(OSError) as err:
            loop.detach(device)
        assert err.value.errno == errno.EBUSY and err.value.filename == device.path
        assert device.fd is not None and loops_of(kernel_image) == [device.name]
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert loop.detach(device)
