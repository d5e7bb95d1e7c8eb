"""What may be attached and mounted from a block device.

An attach mount (`/mount/loopback`, `/mount/rbd`) mounts a filesystem that lives on the attached
block device, with options from that filesystem's allow-list — never a filesystem that ignores
the device and reaches the host (overlay of host directories, proc, sysfs, the host's /dev,
...), never an option that names a path or a device. A loopback attachment (`/attach/loopback`)
is of an image file: a regular file with data on a filesystem that stores data, never a kernel
interface that looks like a regular file (/proc/self/mem, a sysfs attribute, a cgroup file).

Each refusal is a 400 naming the field and what is allowed, and changes nothing: the `stack`
fixture compares the registry, the mount table and loop devices before and after, and the
host directories an overlay would have written to are checked by hand.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imageapi.drivers.base import Node
from imageapi.drivers.loopback_attach import LoopbackAttach
from imageapi.errors import BadRequest
from imageapi.kernel.loop import Loop, LoopDevice
from tests import hostview
from tests.conftest import Stack

# fs_type -> what it would have given the client, had it been mounted.
HOSTILE_FS_TYPES = {
    "proc": "the host's processes (/proc/1/root, kernel tunables)",
    "sysfs": "the host's devices and kernel objects",
    "devtmpfs": "the host's /dev, every disk in it",
    "debugfs": "kernel internals",
    "securityfs": "LSM policy",
    "bpf": "pinned bpf objects",
    "cgroup2": "the host's cgroup tree",
    "tmpfs": "a filesystem in the host's memory, beside the device",
}


@pytest.fixture
def image(squashfs_image: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "image.sqsh"
    shutil.copyfile(squashfs_image, copy)
    return copy


@pytest.fixture
def attached(stack: Stack, image: Path) -> Any:
    lb = stack.api.post("/attach/loopback", {"path": str(image)})
    yield lb
    stack.api.delete(f"/attach/loopback/{lb['id']}")


@pytest.fixture(scope="module")
def ext4_image(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ext4 image made from the test tree (mkfs.ext4 -d), 16 MiB."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
    if mkfs is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    out = tmp_path_factory.mktemp("ext4") / "image.ext4"
    subprocess.run([mkfs, "-q", "-F", "-d", str(image_tree), str(out), "16M"], check=True)
    return out


def mountinfo_at(path: str) -> tuple[str, set[str], set[str]] | None:
    """(fstype, mount options, superblock options) of the mount at `path`, if any."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4] == path:
                fstype, _source, super_opts = right.split()[:3]
                return fstype, set(fields[5].split(",")), set(super_opts.split(","))
    return None


def refused(stack: Stack, path: str, body: dict[str, Any]) -> str:
    answer = stack.api.request("POST", path, 400, json=body).json()
    return answer["message"]


# -- filesystems that ignore the device ----------------------------------------------------------


def test_overlay_of_host_directories_is_refused(
    stack: Stack, attached: Any, tmp_path: Path
) -> None:
    """overlay ignores the source: with host lowerdir/upperdir it would write into the host."""
    host = tmp_path / "host"
    lower, upper, work = (host / d for d in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    (lower / "host-file").write_text("the host's\n")
    body = {"fs_type": "overlay", "loopback_id": attached["id"],
            "mount_options": [f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"]}
    message = refused(stack, "/mount/loopback", body)
    assert message.startswith("fs_type: 'overlay' is not a filesystem"), message
    assert "squashfs" in message and "ext4" in message, "the message lists what is allowed"
    # Nothing was mounted, so nothing was written into the host's directories.
    assert sorted(str(p.relative_to(host)) for p in host.rglob("*")) == [
        "lower", "lower/host-file", "upper", "work"]
    assert not any(m[1] == "overlay" and m[0].startswith(str(stack.server.run_dir))
                   for m in hostview.mounts())
    assert stack.api.get("/mount") == []
    assert stack.api.get(f"/attach/loopback/{attached['id']}")["refs"] == 1


@pytest.mark.parametrize("fs_type", list(HOSTILE_FS_TYPES))
def test_filesystems_without_a_device_are_refused(
    stack: Stack, attached: Any, fs_type: str
) -> None:
    before = own_mounts(stack)
    message = refused(stack, "/mount/loopback", {"fs_type": fs_type, "loopback_id": attached["id"]})
    assert message.startswith(f"fs_type: '{fs_type}' is not a filesystem"), message
    assert "allowed: " in message and "squashfs" in message
    assert own_mounts(stack) == before
    assert stack.api.get("/mount") == []


@pytest.mark.parametrize("fs_type", ["proc", "devtmpfs"])
def test_inline_definitions_are_refused_before_anything_is_attached(
    stack: Stack, image: Path, fs_type: str
) -> None:
    """The loop device of an inline definition is never set up: no loop device, no mount."""
    body = {"fs_type": fs_type, "loopback": {"path": str(image)}}
    assert refused(stack, "/mount/loopback", body).startswith(f"fs_type: '{fs_type}'")
    assert stack.api.get("/attach/loopback") == []
    assert not any(backing == str(image) for backing in hostview.loop_devices().values())


def test_an_rbd_mount_is_held_to_the_same_rules(stack: Stack) -> None:
    body = {"fs_type": "sysfs", "rbd": stack.rbd_spec()}
    assert refused(stack, "/mount/rbd", body).startswith("fs_type: 'sysfs'")
    assert stack.sim.mapped() == []
    body = {"fs_type": "squashfs", "mount_options": ["ro", "errors=panic"], "rbd": stack.rbd_spec()}
    assert refused(stack, "/mount/rbd", body).startswith("mount_options[1]: 'errors=panic'")
    assert stack.sim.mapped() == []


def test_unknown_filesystems_are_refused_with_the_allowed_set(stack: Stack, attached: Any) -> None:
    message = refused(stack, "/mount/loopback",
                      {"fs_type": "nosuchfs", "loopback_id": attached["id"]})  # fmt: skip
    allowed = set(message.split("allowed: ", 1)[1].split(", "))
    assert {"squashfs", "erofs", "ext4", "xfs", "btrfs", "vfat", "iso9660"} <= allowed
    assert not allowed & {"overlay", "tmpfs", "proc", "fuseblk", "fuse"}


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fs_type", "options", "says"),
    [
        # Options that name a path or a device on the host.
        ("ext4", ["ro", "journal_path=/dev/loop-control"], "not an option allowed for ext4"),
        ("ext4", ["ro", "journal_dev=2049"], "not an option allowed for ext4"),
        ("ext4", ["ro", "usrjquota=aquota.user"], "not an option allowed for ext4"),
        ("xfs", ["ro", "logdev=/dev/loop-control"], "not an option allowed for xfs"),
        ("xfs", ["ro", "rtdev=/dev/loop-control"], "not an option allowed for xfs"),
        ("btrfs", ["ro", "device=/dev/loop-control"], "not an option allowed for btrfs"),
        ("erofs", ["device=/dev/loop-control"], "not an option allowed for erofs"),
        ("erofs", ["fsid=x"], "not an option allowed for erofs"),
        # A crafted image must not be able to panic the host.
        ("squashfs", ["ro", "errors=panic"], "errors= takes one of continue"),
        ("ext4", ["ro", "errors=panic"], "errors= takes one of continue, remount-ro"),
        # What squashfs does not know; a value where none belongs; a flag given a value.
        ("squashfs", ["ro", "nosuchopt"], "not an option allowed for squashfs"),
        ("squashfs", ["ro", "threads=/x"], "threads= takes"),
        ("ext4", ["ro", "data"], "data needs a value"),
        ("ext4", ["ro", "noload=1"], "noload takes no value"),
        ("squashfs", ["ro=1"], "the mount flag ro takes no value"),
    ],
)  # fmt: skip
def test_options_outside_the_allow_list_are_refused(
    stack: Stack, attached: Any, fs_type: str, options: list[str], says: str
) -> None:
    before = own_mounts(stack)
    body = {"fs_type": fs_type, "loopback_id": attached["id"], "mount_options": options}
    message = refused(stack, "/mount/loopback", body)
    index = len(options) - 1
    assert message.startswith(f"mount_options[{index}]: '{options[index]}': "), message
    assert says in message, message
    if "not an option allowed" in says:
        assert "allowed: " in message and "ro" in message.split("allowed: ", 1)[1]
    assert own_mounts(stack) == before
    assert stack.api.get("/mount") == []


# -- what is allowed still mounts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [["ro"], ["ro", "errors=continue"], ["ro", "nodev", "nosuid", "noatime"]]
)
def test_squashfs_mounts_with_allowed_options(
    stack: Stack, attached: Any, options: list[str]
) -> None:
    mnt = stack.api.post("/mount/loopback", {"fs_type": "squashfs", "loopback_id": attached["id"],
                                             "mount_options": options})  # fmt: skip
    try:
        assert mnt["mount_options"] == options
        fstype, mount_opts, _super = mountinfo_at(mnt["mountpoint"]) or ("", set(), set())
        assert fstype == "squashfs"
        assert {o for o in options if o in {"ro", "nodev", "nosuid", "noatime"}} <= mount_opts
        assert (Path(mnt["mountpoint"]) / "etc/hostname").read_text() == "testimage\n"
    finally:
        stack.api.delete(f"/mount/loopback/{mnt['id']}")


def test_ext4_mounts_read_only_with_allowed_options(stack: Stack, ext4_image: Path,
                                                    tmp_path: Path) -> None:
    image = tmp_path / "image.ext4"
    shutil.copyfile(ext4_image, image)
    options = ["ro", "noload", "errors=remount-ro", "nodelalloc", "noatime"]
    mnt = stack.api.post("/mount/loopback", {"fs_type": "ext4", "mount_options": options,
                                             "loopback": {"path": str(image)}})  # fmt: skip
    try:
        info = mountinfo_at(mnt["mountpoint"])
        assert info is not None and info[0] == "ext4"
        _fstype, mount_opts, super_opts = info
        assert {"ro", "noatime"} <= mount_opts
        # noload shows as norecovery: the kernel took every filesystem option.
        assert {"ro", "norecovery", "errors=remount-ro", "nodelalloc"} <= super_opts, super_opts
        assert (Path(mnt["mountpoint"]) / "etc/hostname").read_text() == "testimage\n"
    finally:
        stack.api.delete(f"/mount/loopback/{mnt['id']}")


# -- image files ---------------------------------------------------------------------------------


def kernel_interface_files() -> list[tuple[str, str]]:
    """(path, filesystem) of files that stat as regular yet are kernel interfaces."""
    files = [("/proc/self/mem", "proc"), ("/proc/self/ns/mnt", "nsfs"),
             ("/sys/kernel/address_bits", "sysfs")]  # fmt: skip
    if os.path.exists("/proc/kcore"):
        files.append(("/proc/kcore", "proc"))
    cgroup2 = hostview.cgroup2_mount()
    if cgroup2 is not None:
        files.append((str(cgroup2 / "cgroup.procs"), "cgroup2"))
    return files


def bound_to(path: str) -> list[str]:
    return [dev for dev, backing in hostview.loop_devices().items() if backing == path]


@pytest.mark.parametrize(("path", "fs"), kernel_interface_files())
@pytest.mark.parametrize("ro", [True, False])
def test_kernel_interface_files_are_not_images(
    stack: Stack, path: str, fs: str, ro: bool
) -> None:
    assert os.path.isfile(path)  # what the old check looked at
    before = hostview.loop_devices()
    message = refused(stack, "/attach/loopback", {"path": path, "ro": ro})
    assert message == f"path: {path} is a file of {fs}, a kernel interface, not an image file"
    assert hostview.loop_devices() == before and not bound_to(path)
    assert stack.api.get("/attach/loopback") == []


def test_kernel_interface_files_are_not_images_inline(stack: Stack) -> None:
    body = {"fs_type": "squashfs", "loopback": {"path": "/proc/self/mem"}}
    message = refused(stack, "/mount/loopback", body)
    assert message.startswith("path: /proc/self/mem is a file of proc"), message
    assert not bound_to("/proc/self/mem") and stack.api.get("/mount") == []


def test_an_empty_file_is_not_an_image(stack: Stack, tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    before = hostview.loop_devices()
    message = refused(stack, "/attach/loopback", {"path": str(empty)})
    assert message == f"path: {empty} is empty (0 bytes), not an image file"
    assert hostview.loop_devices() == before
    assert stack.api.get("/attach/loopback") == []


class RefusingLoop(Loop):
    """A loop driver that refuses every file as the kernel refuses one it cannot read through."""

    def attach(self, backing_fd: int, **how: Any) -> LoopDevice:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), "/dev/loop7")


def test_a_file_the_loop_driver_refuses_is_a_400(image: Path) -> None:
    """EINVAL from the loop setup of a file that passed every check is the file's fault."""
    driver = LoopbackAttach(RefusingLoop())
    node = Node(id=1, collection="attach", kind="loopback",
                spec=driver.normalize({"path": str(image)}), needs=[], record={})  # fmt: skip
    with pytest.raises(BadRequest) as refusal:
        driver.build(node)
    assert refusal.value.message.startswith(f"EINVAL: path: the loop driver cannot use {image}")
    assert not driver._users, "the refused attachment is forgotten"


def own_mounts(stack: Stack) -> set[tuple[str, str, str]]:
    """The host's mounts that this test's server or files could have made (other test runs
    on the machine mount and unmount meanwhile)."""
    scope = (str(stack.server.run_dir), str(stack.scope))
    return {m for m in hostview.mounts() if m[0].startswith(scope) or m[2].startswith(scope)}
