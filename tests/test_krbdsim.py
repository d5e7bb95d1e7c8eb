"""Tests of the krbd simulator alone (no daemon).

Each sysfs write is one os.open + one os.write, as a client does. Privileged tests need root,
/dev/fuse, losetup and mksquashfs; without them they skip, except under CI=true where they fail.
After every privileged test no loop device and no mount may be left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.krbdsim import kparse
from tests.krbdsim.harness import (
    ClusterInfo,
    RunningSimulator,
    add_image,
    make_cluster,
    make_secret,
    running_simulator,
)
from tests.krbdsim.mounts import is_mounted

CEPH_NOSNAP = str(2**64 - 2)


# --------------------------------------------------------------------------- fixtures


def _missing_privilege() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    for tool in ("losetup", "mksquashfs", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.fixture
def privileged() -> None:
    why = _missing_privilege()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; privileged tests may not skip in CI")
        pytest.skip(why)


def _host_state(scope: Path) -> tuple[set[str], set[str]]:
    """`losetup -a` and mountinfo lines that mention `scope`: other processes on the host may
    use loop devices and mounts at the same time, and only ours are this test's business."""
    key = str(scope.resolve())
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    return (
        {line for line in loops.splitlines() if key in line},
        {line for line in mounts.splitlines() if key in line},
    )


@pytest.fixture
def no_leaks(privileged: None, tmp_path: Path) -> Iterator[None]:
    before = _host_state(tmp_path)
    yield
    # A loop detached lazily (autoclear) goes when its last user lets go: allow a moment.
    deadline = time.monotonic() + 5
    after = _host_state(tmp_path)
    while after != before and time.monotonic() < deadline:
        time.sleep(0.1)
        after = _host_state(tmp_path)
    assert after[0] == before[0], f"loop devices left: {after[0] - before[0]}"
    assert after[1] == before[1], f"mounts left: {after[1] - before[1]}"


@pytest.fixture(scope="module")
def squashfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("mksquashfs") is None:
        pytest.skip("needs mksquashfs")
    src = tmp_path_factory.mktemp("squashfs-src")
    (src / "hello.txt").write_text("hello from krbdsim\n")
    image = tmp_path_factory.mktemp("squashfs") / "image.sqfs"
    subprocess.run(
        ["mksquashfs", str(src), str(image), "-noappend", "-quiet", "-no-progress"],
        check=True,
        capture_output=True,
    )
    return image


@pytest.fixture
def cluster(tmp_path: Path, squashfs: Path) -> ClusterInfo:
    info = make_cluster(tmp_path / "cluster")
    add_image(info, "rbd", "img", squashfs)
    return info


@pytest.fixture
def sim(no_leaks: None, tmp_path: Path, cluster: ClusterInfo) -> Iterator[RunningSimulator]:
    with running_simulator(tmp_path, cluster) as running:
        yield running


def add_cmd(
    c: ClusterInfo,
    *,
    mons: str | None = None,
    opts: list[str] | None = None,
    name: str | None = "default",
    secret: str | None = "default",
    pool: str = "rbd",
    image: str = "img",
    snap: str | None = None,
) -> str:
    """An add string; by default exactly what `rbd map rbd/img` would send."""
    options = []
    if name is not None:
        options.append(f"name={c.key_name if name == 'default' else name}")
    if secret is not None:
        options.append(f"secret={c.secret if secret == 'default' else secret}")
    options += opts or []
    words = [mons or c.mon_addrs, ",".join(options), pool, image]
    return " ".join([*words, snap] if snap else words)


def write_err(sim: RunningSimulator, attr: str, text: str) -> int:
    with pytest.raises(OSError) as info:
        sim.write(attr, text)
    return info.value.errno or 0


def loop_of(sim: RunningSimulator, dev_id: str) -> str:
    """The loop device whose dev_t the simulated device shows."""
    major = sim.read(f"devices/{dev_id}/major").strip()
    minor = sim.read(f"devices/{dev_id}/minor").strip()
    return Path(f"/sys/dev/block/{major}:{minor}").resolve().name


def loop_attached(name: str, scope: Path | None = None) -> bool:
    """Is /dev/<name> bound (to a file under `scope`, when given)? With a scope, a device
    another process bound right after ours was freed does not count."""
    try:
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except FileNotFoundError:
        return False
    return scope is None or backing.startswith(str(scope))


def mount_ro(node: Path, where: Path) -> None:
    where.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "squashfs", "-o", "ro", str(node), str(where)],
        check=True,
        capture_output=True,
    )


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True, capture_output=True)


# --------------------------------------------------------------------------- mapping


def test_map_shows_attributes_and_a_real_block_node(
    sim: RunningSimulator, cluster: ClusterInfo, squashfs: Path
) -> None:
    command = add_cmd(cluster)
    assert sim.write("add_single_major", command) == len(command)
    assert sim.mapped() == ["0"]

    def attr(name: str) -> str:
        return sim.read(f"devices/0/{name}")

    assert attr("pool") == "rbd\n"
    assert attr("pool_id") == "1\n"
    assert attr("pool_ns") == "\n"
    assert attr("name") == "img\n"
    assert len(attr("image_id").strip()) == 12
    assert attr("current_snap") == "-\n"
    assert attr("snap_id") == CEPH_NOSNAP + "\n"
    assert attr("size") == f"{squashfs.stat().st_size}\n"
    assert attr("features") == "0x000000000000003d\n"
    assert attr("client_id").startswith("client") and attr("client_id")[6:-1].isdigit()
    assert attr("cluster_fsid") == cluster.fsid + "\n"
    assert attr("config_info") == command + "\n"
    assert attr("parent") == "(no parent image)\n"

    node = sim.devdir / "rbd0"
    st = node.stat()
    assert stat.S_ISBLK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert f"{os.major(st.st_rdev)}\n" == attr("major")
    assert f"{os.minor(st.st_rdev)}\n" == attr("minor")
    loop = loop_of(sim, "0")
    assert loop.startswith("loop")
    assert os.stat(f"/dev/{loop}").st_rdev == st.st_rdev
    assert Path(f"/sys/block/{loop}/ro").read_text().strip() == "0"
    with open(node, "rb") as f:
        assert f.read(4) == b"hsqs"

    assert sim.write("remove_single_major", "0") == 1
    assert sim.mapped() == []
    assert not node.exists()
    assert not loop_attached(loop, cluster.path)


def test_lowest_free_id_is_reused(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    for _ in range(3):
        sim.write("add_single_major", add_cmd(cluster))
    assert sim.mapped() == ["0", "1", "2"]
    sim.write("remove_single_major", "1")
    assert sim.mapped() == ["0", "2"]
    assert not (sim.devdir / "rbd1").exists()
    sim.write("add_single_major", add_cmd(cluster))
    assert sim.mapped() == ["0", "1", "2"]
    assert (sim.devdir / "rbd1").is_block_device()
    for dev_id in ("2", "0", "1"):
        sim.write("remove_single_major", dev_id)
    assert sim.mapped() == []


def test_plain_add_and_remove_refused_with_single_major(
    sim: RunningSimulator, cluster: ClusterInfo
) -> None:
    assert write_err(sim, "add", add_cmd(cluster)) == errno.EINVAL
    assert sim.mapped() == []
    sim.write("add_single_major", add_cmd(cluster))
    assert write_err(sim, "remove", "0") == errno.EINVAL
    assert sim.mapped() == ["0"]
    sim.write("remove_single_major", "0")


def test_without_single_major(no_leaks: None, tmp_path: Path, cluster: ClusterInfo) -> None:
    with running_simulator(tmp_path, cluster, single_major=False) as sim:
        names = os.listdir(sim.sysfs)
        assert "add_single_major" not in names and "remove_single_major" not in names
        with pytest.raises(FileNotFoundError):
            os.open(sim.sysfs / "add_single_major", os.O_WRONLY)
        sim.write("add", add_cmd(cluster))
        assert sim.mapped() == ["0"]
        sim.write("remove", "0")
        assert sim.mapped() == []


def test_snapshot_maps_read_only(
    sim: RunningSimulator, cluster: ClusterInfo, squashfs: Path
) -> None:
    add_image(cluster, "rbd", "img", squashfs, snap="snap1")
    sim.write("add_single_major", add_cmd(cluster, snap="snap1"))
    assert sim.read("devices/0/current_snap") == "snap1\n"
    assert sim.read("devices/0/snap_id").strip() != CEPH_NOSNAP
    loop = loop_of(sim, "0")
    assert Path(f"/sys/block/{loop}/ro").read_text().strip() == "1"
    assert Path(f"/sys/block/{loop}/loop/backing_file").read_text().strip().endswith("img@snap1")
    sim.write("remove_single_major", "0")


def test_ro_option_maps_read_only(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    sim.write("add_single_major", add_cmd(cluster, opts=["ro"]))
    sim.write("add_single_major", add_cmd(cluster, opts=["ro", "rw"]))  # the last one wins
    assert Path(f"/sys/block/{loop_of(sim, '0')}/ro").read_text().strip() == "1"
    assert Path(f"/sys/block/{loop_of(sim, '1')}/ro").read_text().strip() == "0"
    sim.write("remove_single_major", "0")
    sim.write("remove_single_major", "1")


def test_image_in_a_namespace(sim: RunningSimulator, cluster: ClusterInfo, squashfs: Path) -> None:
    add_image(cluster, "rbd", "img", squashfs, namespace="ns1")
    sim.write("add_single_major", add_cmd(cluster, opts=["_pool_ns=ns1"]))
    assert sim.read("devices/0/pool_ns") == "ns1\n"
    assert sim.read("devices/0/name") == "img\n"
    sim.write("remove_single_major", "0")


def test_same_image_twice_and_client_sharing(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    sim.write("add_single_major", add_cmd(cluster))
    sim.write("add_single_major", add_cmd(cluster))
    sim.write("add_single_major", add_cmd(cluster, opts=["noshare"]))
    assert sim.mapped() == ["0", "1", "2"]
    ids = [sim.read(f"devices/{i}/client_id") for i in ("0", "1", "2")]
    # Equal options share one libceph client; noshare always opens a new session.
    assert ids[0] == ids[1] != ids[2]
    for dev_id in ("0", "1", "2"):
        sim.write("remove_single_major", dev_id)
    # The shared client went with its last device: a new mapping gets a new global id.
    sim.write("add_single_major", add_cmd(cluster))
    assert sim.read("devices/0/client_id") not in ids
    sim.write("remove_single_major", "0")


def test_config_info_keeps_the_buffer_up_to_nul(
    sim: RunningSimulator, cluster: ClusterInfo
) -> None:
    command = add_cmd(cluster) + "\n"
    assert sim.write("add_single_major", command.encode() + b"\0 junk") == len(command) + 6
    assert sim.read("devices/0/config_info") == command + "\n"
    sim.write("remove_single_major", "0")


def test_write_is_cut_to_one_page(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    command = add_cmd(cluster).ljust(5000)
    assert sim.write("add_single_major", command) == 4096
    assert sim.mapped() == ["0"]
    sim.write("remove_single_major", "0")


def test_sysfs_modes_and_access(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    for name in ("add", "remove", "add_single_major", "remove_single_major"):
        assert stat.S_IMODE((sim.sysfs / name).stat().st_mode) == 0o200
        with pytest.raises(PermissionError):
            os.open(sim.sysfs / name, os.O_RDONLY)
    assert stat.S_IMODE((sim.sysfs / "supported_features").stat().st_mode) == 0o444
    assert sim.read("supported_features") == "0x1bf\n"
    sim.write("add_single_major", add_cmd(cluster))
    dev = sim.sysfs / "devices" / "0"
    assert stat.S_IMODE((dev / "config_info").stat().st_mode) == 0o400
    assert stat.S_IMODE((dev / "size").stat().st_mode) == 0o444
    with pytest.raises(PermissionError):
        os.open(dev / "size", os.O_WRONLY)
    assert sim.write("devices/0/refresh", "1") == 1
    assert not (sim.sysfs / "devices" / "1").exists()
    sim.write("remove_single_major", "0")
    assert not dev.exists()


# --------------------------------------------------------------------------- add errors

Setup = Callable[[ClusterInfo, Path], str]


def _image_with_features(bits: int, opts: list[str]) -> Setup:
    def setup(c: ClusterInfo, squashfs: Path) -> str:
        add_image(c, "rbd", "feat", squashfs, features=bits)
        return add_cmd(c, image="feat", opts=opts)

    return setup


def _keyring_without_the_key(c: ClusterInfo, squashfs: Path) -> str:
    return add_cmd(c, secret=None, opts=["key=client.admin"])


ADD_ERRORS: list[tuple[str, Setup, int]] = [
    ("unknown-option", lambda c, _: add_cmd(c, opts=["bogus"]), errno.EINVAL),
    ("unknown-option-with-value", lambda c, _: add_cmd(c, opts=["bogus=1"]), errno.EINVAL),
    (
        "mon_addr-is-cephfs-only",
        lambda c, _: add_cmd(c, opts=["mon_addr=192.0.2.10"]),
        errno.EINVAL,
    ),
    ("flag-given-a-value", lambda c, _: add_cmd(c, opts=["ro=1"]), errno.EINVAL),
    ("negated-flag-given-a-value", lambda c, _: add_cmd(c, opts=["noshare=1"]), errno.EINVAL),
    ("no-prefix-on-a-plain-flag", lambda c, _: add_cmd(c, opts=["noro"]), errno.EINVAL),
    ("number-option-without-value", lambda c, _: add_cmd(c, opts=["queue_depth"]), errno.EINVAL),
    ("string-option-without-value", lambda c, _: add_cmd(c, opts=["_pool_ns"]), errno.EINVAL),
    ("string-option-empty", lambda c, _: add_cmd(c, opts=["_pool_ns="]), errno.EINVAL),
    ("non-integer", lambda c, _: add_cmd(c, opts=["queue_depth=abc"]), errno.EINVAL),
    ("integer-with-junk", lambda c, _: add_cmd(c, opts=["queue_depth=12x"]), errno.EINVAL),
    ("negative-integer", lambda c, _: add_cmd(c, opts=["queue_depth=-1"]), errno.EINVAL),
    ("u32-overflow", lambda c, _: add_cmd(c, opts=["lock_timeout=4294967296"]), errno.EINVAL),
    ("queue-depth-zero", lambda c, _: add_cmd(c, opts=["queue_depth=0"]), errno.EINVAL),
    ("alloc-size-not-power-of-2", lambda c, _: add_cmd(c, opts=["alloc_size=1000"]), errno.EINVAL),
    ("osdkeepalive-zero", lambda c, _: add_cmd(c, opts=["osdkeepalive=0"]), errno.EINVAL),
    ("enum-value-unknown", lambda c, _: add_cmd(c, opts=["ms_mode=fast"]), errno.EINVAL),
    ("fsid-malformed", lambda c, _: add_cmd(c, opts=["fsid=1234"]), errno.EINVAL),
    ("ip-malformed", lambda c, _: add_cmd(c, opts=["ip=300.1.1.1"]), errno.EINVAL),
    ("crush-location-malformed", lambda c, _: add_cmd(c, opts=["crush_location=a"]), errno.EINVAL),
    (
        "crush-location-repeated",
        lambda c, _: add_cmd(c, opts=["crush_location=host:a|host:a"]),
        errno.EEXIST,
    ),
    ("secret-not-base64", lambda c, _: add_cmd(c, secret="not*base64"), errno.EINVAL),
    ("secret-partial-group", lambda c, _: add_cmd(c, secret="AQBzYt"), errno.EINVAL),
    ("secret-not-a-ceph-key", lambda c, _: add_cmd(c, secret="QUJD"), errno.EINVAL),
    ("only-monitors", lambda c, _: c.mon_addrs, errno.EINVAL),
    ("whitespace-only", lambda c, _: " \t\n", errno.EINVAL),
    ("no-image", lambda c, _: add_cmd(c).rsplit(" ", 1)[0], errno.EINVAL),
    ("too-many-tokens", lambda c, _: add_cmd(c, snap="snap1") + " extra", errno.EINVAL),
    ("snapshot-name-too-long", lambda c, _: add_cmd(c, snap="s" * 251), errno.ENAMETOOLONG),
    ("monitor-malformed", lambda c, _: add_cmd(c, mons="192.0.2"), errno.EINVAL),
    ("monitor-hostname", lambda c, _: add_cmd(c, mons="mon1.example"), errno.EINVAL),
    ("monitor-port-too-big", lambda c, _: add_cmd(c, mons="192.0.2.10:70000"), errno.EINVAL),
    ("monitor-list-trailing-comma", lambda c, _: add_cmd(c, mons="192.0.2.10,"), errno.EINVAL),
    ("unknown-pool", lambda c, _: add_cmd(c, pool="nopool"), errno.ENOENT),
    ("unknown-image", lambda c, _: add_cmd(c, image="nope"), errno.ENOENT),
    ("unknown-snapshot", lambda c, _: add_cmd(c, snap="nosnap"), errno.ENOENT),
    ("unknown-namespace", lambda c, _: add_cmd(c, opts=["_pool_ns=nons"]), errno.ENOENT),
    ("wrong-secret", lambda c, _: add_cmd(c, secret=make_secret()), errno.EPERM),
    ("unknown-name", lambda c, _: add_cmd(c, name="nobody"), errno.EPERM),
    ("no-name-means-guest", lambda c, _: add_cmd(c, name=None), errno.EPERM),
    ("no-secret-cephx-msgr1", lambda c, _: add_cmd(c, secret=None), errno.EINVAL),
    ("key-not-in-keyring", _keyring_without_the_key, errno.EPERM),
    ("not-a-cluster-monitor", lambda c, _: add_cmd(c, mons="198.51.100.7"), errno.ETIMEDOUT),
    ("monitor-wrong-port", lambda c, _: add_cmd(c, mons="192.0.2.10:6790"), errno.ETIMEDOUT),
    ("msgr2-on-the-msgr1-port", lambda c, _: add_cmd(c, opts=["ms_mode=crc"]), errno.ETIMEDOUT),
    ("fsid-mismatch", lambda c, _: add_cmd(c, opts=[f"fsid={uuid.uuid4()}"]), errno.ETIMEDOUT),
    ("exclusive-without-the-feature", _image_with_features(0x1, ["exclusive"]), errno.EINVAL),
    ("unsupported-feature-journaling", _image_with_features(0x7D, []), errno.ENXIO),
]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [pytest.param(setup, err, id=name) for name, setup, err in ADD_ERRORS],
)
def test_add_error(
    sim: RunningSimulator, cluster: ClusterInfo, squashfs: Path, setup: Setup, expected: int
) -> None:
    command = setup(cluster, squashfs)
    got = write_err(sim, "add_single_major", command)
    assert errno.errorcode.get(got, got) == errno.errorcode[expected]
    assert sim.mapped() == []
    assert os.listdir(sim.devdir) == []


def _keyring_with_the_key(c: ClusterInfo, squashfs: Path) -> str:
    c.update_config(keyring={"client.admin": c.secret})
    return add_cmd(c, secret=None, opts=["key=client.admin"])


def _namespace(c: ClusterInfo, squashfs: Path) -> str:
    add_image(c, "rbd", "img", squashfs, namespace="ns")
    return add_cmd(c, opts=["_pool_ns=ns"])


def _auth_none(c: ClusterInfo, squashfs: Path) -> str:
    c.update_config(auth="none")
    return add_cmd(c, name="anyone", secret=None)


# Every option not exercised elsewhere, each with a valid value.
EVERY_OTHER_OPTION = [
    "lock_timeout=30", "compression_hint=compressible", "mount_timeout=0", "osd_idle_ttl=60",
    "osdkeepalive=5", "osd_request_timeout=0", "read_from_replica=balance", "ms_mode=legacy",
    "crush_location=host:a|rack:b", "ip=192.0.2.99", "abort_on_full", "rxbounce",
    "nocephx_require_signatures", "nocephx_sign_messages", "share", "crc", "tcp_nodelay",
    "read_write",
]  # fmt: skip

ADD_ACCEPTED: list[tuple[str, Setup]] = [
    ("rbd-map-default", lambda c, _: add_cmd(c)),
    (
        "hex-and-octal-numbers",
        lambda c, _: add_cmd(c, opts=["queue_depth=0x80", "alloc_size=010000"]),
    ),
    ("negated-libceph-flags", lambda c, _: add_cmd(c, opts=["nocrc", "noshare", "notcp_nodelay"])),
    ("all-rbd-flags", lambda c, _: add_cmd(c, opts=["exclusive", "lock_on_read", "notrim"])),
    ("empty-option-items-skipped", lambda c, _: add_cmd(c, opts=["", "=x", "rw"])),
    ("msgr2-on-3300", lambda c, _: add_cmd(c, mons="192.0.2.11:3300", opts=["ms_mode=secure"])),
    ("one-good-monitor-is-enough", lambda c, _: add_cmd(c, mons="198.51.100.7,192.0.2.11:6789")),
    ("bracketed-ipv4-with-port", lambda c, _: add_cmd(c, mons="[192.0.2.10]:6789")),
    ("port-zero-means-default", lambda c, _: add_cmd(c, mons="192.0.2.10:0")),
    ("matching-fsid", lambda c, _: add_cmd(c, opts=[f"fsid={c.fsid}"])),
    ("explicit-head-snapshot", lambda c, _: add_cmd(c, snap="-")),
    ("tabs-and-newline", lambda c, _: add_cmd(c).replace(" ", "\t") + "\n"),
    ("key-from-keyring", _keyring_with_the_key),
    ("namespace", _namespace),
    ("cluster-without-cephx", _auth_none),
    ("every-other-option", lambda c, _: add_cmd(c, opts=EVERY_OTHER_OPTION)),
]


@pytest.mark.parametrize("setup", [pytest.param(s, id=n) for n, s in ADD_ACCEPTED])
def test_add_accepted(
    sim: RunningSimulator, cluster: ClusterInfo, squashfs: Path, setup: Setup
) -> None:
    command = setup(cluster, squashfs)
    assert sim.write("add_single_major", command) == len(command)
    assert sim.mapped() == ["0"]
    sim.write("remove_single_major", "0")
    assert sim.mapped() == []


# --------------------------------------------------------------------------- remove

REMOVE_ERRORS = [
    ("unknown-id", "7", errno.ENOENT),
    ("not-a-number", "abc", errno.EINVAL),
    ("negative", "-1", errno.EINVAL),
    ("plus-sign", "+0", errno.EINVAL),
    ("unknown-option", "0 now", errno.EINVAL),
    ("whitespace-only", " \n", errno.EINVAL),
]


@pytest.mark.parametrize(
    ("text", "expected"), [pytest.param(t, e, id=n) for n, t, e in REMOVE_ERRORS]
)
def test_remove_error(
    sim: RunningSimulator, cluster: ClusterInfo, text: str, expected: int
) -> None:
    sim.write("add_single_major", add_cmd(cluster))
    assert write_err(sim, "remove_single_major", text) == expected
    assert sim.mapped() == ["0"]
    sim.write("remove_single_major", "0")


def test_remove_busy_while_mounted(
    sim: RunningSimulator, cluster: ClusterInfo, tmp_path: Path
) -> None:
    sim.write("add_single_major", add_cmd(cluster))
    node = sim.devdir / "rbd0"
    mnt = tmp_path / "mnt"
    mount_ro(node, mnt)
    try:
        assert (mnt / "hello.txt").read_text() == "hello from krbdsim\n"
        assert write_err(sim, "remove_single_major", "0") == errno.EBUSY
        assert sim.mapped() == ["0"]
        assert node.is_block_device()
    finally:
        umount(mnt)
    sim.write("remove_single_major", "0")
    assert sim.mapped() == []


def test_force_remove_while_mounted(
    sim: RunningSimulator, cluster: ClusterInfo, tmp_path: Path
) -> None:
    sim.write("add_single_major", add_cmd(cluster))
    loop = loop_of(sim, "0")
    mnt = tmp_path / "mnt"
    mount_ro(sim.devdir / "rbd0", mnt)
    try:
        sim.write("remove_single_major", "0 force")
        assert sim.mapped() == []
        assert not (sim.devdir / "rbd0").exists()
    finally:
        umount(mnt)
    # The loop goes once the filesystem lets go of it.
    deadline = time.monotonic() + 5
    while loop_attached(loop, cluster.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loop_attached(loop, cluster.path)


def test_remove_busy_while_held_open(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    sim.write("add_single_major", add_cmd(cluster))
    fd = os.open(sim.devdir / "rbd0", os.O_RDONLY)
    try:
        assert write_err(sim, "remove_single_major", "0") == errno.EBUSY
    finally:
        os.close(fd)
    sim.write("remove_single_major", "0\n")
    assert sim.mapped() == []


def test_force_word_is_cut_at_five_characters(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    sim.write("add_single_major", add_cmd(cluster))
    fd = os.open(sim.devdir / "rbd0", os.O_RDONLY)
    try:
        sim.write("remove_single_major", "0 forced")  # read as "force", like the kernel
    finally:
        os.close(fd)
    assert sim.mapped() == []


def test_concurrent_adds_and_removes(sim: RunningSimulator, cluster: ClusterInfo) -> None:
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: sim.write("add_single_major", add_cmd(cluster)), range(6)))
    ids = [str(i) for i in range(6)]
    assert sim.mapped() == ids
    assert len({loop_of(sim, i) for i in ids}) == 6
    # rbd_get_client() runs under client_mutex: identical concurrent maps share one client.
    assert len({sim.read(f"devices/{i}/client_id") for i in ids}) == 1
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: sim.write("remove_single_major", i), ids))
    assert sim.mapped() == []
    assert os.listdir(sim.devdir) == []


# --------------------------------------------------------------------------- shutdown


def test_shutdown_reports_and_detaches_leaked_mappings(
    no_leaks: None, tmp_path: Path, cluster: ClusterInfo
) -> None:
    with running_simulator(tmp_path, cluster) as sim:
        sim.write("add_single_major", add_cmd(cluster))
        loop = loop_of(sim, "0")
    assert "still mapped at shutdown: 0 (rbd/img@-" in sim.stderr()
    assert not loop_attached(loop, cluster.path)
    assert not (sim.devdir / "rbd0").exists()


def test_sigint_stops_it_cleanly(no_leaks: None, tmp_path: Path, cluster: ClusterInfo) -> None:
    with running_simulator(tmp_path, cluster) as sim:
        sim.write("add_single_major", add_cmd(cluster))
        sim.process.send_signal(signal.SIGINT)
        assert sim.process.wait(20) == 0
        assert not is_mounted(sim.sysfs)
    assert "still mapped at shutdown: 0" in sim.stderr()


def test_harness_cleans_up_after_a_crash(
    no_leaks: None, tmp_path: Path, cluster: ClusterInfo
) -> None:
    with (
        pytest.raises(RuntimeError, match="left attached") as failure,
        running_simulator(tmp_path, cluster) as sim,
    ):
        sim.write("add_single_major", add_cmd(cluster))
        sim.process.kill()
        sim.process.wait()
    assert "still mounted" in str(failure.value)
    assert not is_mounted(sim.sysfs)
    assert not (sim.devdir / "rbd0").exists()


# --------------------------------------------------------------------------- parsers (no root)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("128", 128),
        ("+7", 7),
        ("0x10", 16),
        ("010", 8),
        ("5\n", 5),
        ("4294967295", 2**32 - 1),
    ],
)
def test_kstrtouint_accepts(text: str, value: int) -> None:
    assert kparse.kstrtouint(text) == value


@pytest.mark.parametrize("text", ["", "-1", "08", "0x", "1 ", "4294967296", "12abc", "1\n\n"])
def test_kstrtouint_refuses(text: str) -> None:
    with pytest.raises(kparse.KernelError):
        kparse.kstrtouint(text)


@pytest.mark.parametrize(
    ("text", "result"),
    [("0", (0, False)), ("  12\n", (12, False)), ("3 force", (3, True)), ("3force", (3, True)),
     ("3 forced", (3, True)), ("3\tforce\n", (3, True))],
)  # fmt: skip
def test_parse_remove(text: str, result: tuple[int, bool]) -> None:
    assert kparse.parse_remove(text) == result


def test_parse_ips() -> None:
    addrs = kparse.parse_ips("192.0.2.1,[2001:db8::1]:3300,::1,10.0.0.1:0", kparse.CEPH_MAX_MON)
    assert [str(a) for a in addrs] == [
        "192.0.2.1:6789", "[2001:db8::1]:3300", "[::1]:6789", "10.0.0.1:6789",
    ]  # fmt: skip
    with pytest.raises(kparse.KernelError):
        kparse.parse_ips(",".join(["192.0.2.1"] * 32), kparse.CEPH_MAX_MON)


def test_fsid_and_secret_decoding() -> None:
    fsid = uuid.uuid4()
    assert kparse.parse_fsid(str(fsid)) == fsid.bytes
    assert kparse.parse_fsid(fsid.hex) == fsid.bytes
    key = kparse.unarmor_key(make_secret())
    assert key.type == kparse.CEPH_CRYPTO_AES and len(key.secret) == 16
