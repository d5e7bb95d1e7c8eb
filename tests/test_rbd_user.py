"""The user-space rbd driver against a live Ceph cluster (tests/cephcluster.py): a real
imageapi-server with `--rbd-driver user`, images imported with `rbd import`, mapped by a
restricted cephx user, mounted, overlaid and booted — and what that did to the cluster.

Every test leaves nothing behind: no object in the daemon, FUSE mount, loop device, FUSE
server process, client session on the monitor or watch on the OSD.
"""

from __future__ import annotations

import base64
import hashlib
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imageapi.rbdfuse import bindings
from tests import cephcluster, hostview
from tests.apiclient import Api
from tests.conftest import Ceph, Server, purge, start_server

BOOT_TIMEOUT = 90.0
HALT_TIMEOUT = 30.0
# What a container reads from the image (the test image's /etc/os-release) and writes.
READER = ("/bin/sh -c \"cat /etc/os-release; echo written > /written; "
          "trap 'exit 0' TERM; while :; do sleep 0.1; done\"")


def fuse_servers() -> set[int]:
    return hostview.running("imageapi-rbd")


def fuse_mounts() -> set[str]:
    return {m[0] for m in hostview.mounts() if m[1] == "fuse.imageapi-rbd"}


@pytest.fixture(scope="module")
def stop_timeout() -> float:
    return HALT_TIMEOUT


@pytest.fixture(scope="module")
def user_server(ceph: Ceph, cgroup_root: Path, stop_timeout: float,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    run_dir = tmp_path_factory.mktemp("imageapi-user") / "run"
    srv = start_server(run_dir, "--rbd-driver", "user", "--stop-timeout", str(stop_timeout),
                       "--cgroup-root", str(cgroup_root))
    yield srv
    purged = purge(srv.url)
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log_text()}"
    assert not purged, f"objects left in the daemon at the end: {purged}"
    assert hostview.tree(run_dir / "rbd") == set(), "FUSE server directories left"


@pytest.fixture(scope="module")
def uapi(user_server: Server) -> Iterator[Api]:
    client = Api(user_server.url)
    yield client
    client.close()


@dataclass(frozen=True)
class Traces:
    objects: tuple[str, ...]
    host: hostview.Snapshot
    servers: frozenset[int]
    fuse: frozenset[str]
    sessions: int
    watchers: int


class UserStack:
    def __init__(self, api: Api, server: Server, ceph: Ceph, scope: Path) -> None:
        self.api, self.server, self.ceph, self.scope = api, server, ceph, scope

    def traces(self) -> Traces:
        return Traces(
            objects=tuple(repr(self.api.get(p)) for p in ("/attach/rbd", "/mount",
                                                          "/container")),
            host=hostview.Snapshot.take(self.scope),
            servers=frozenset(fuse_servers()),
            fuse=frozenset(fuse_mounts()),
            sessions=len(self.ceph.cluster.sessions(self.ceph.user)),
            watchers=len(self.ceph.cluster.watchers()),
        )

    def settled(self, before: Traces, patience: float = 10.0) -> list[str]:
        """What differs from `before`, once the cluster has had a moment to close sessions."""
        deadline = time.monotonic() + patience
        while True:
            after = self.traces()
            problems = before.host.diff(after.host)
            if after.objects != before.objects:
                problems.append(f"objects left in the daemon: {after.objects}")
            if after.servers - before.servers:
                problems.append(f"FUSE servers left running: {sorted(after.servers)}")
            if after.fuse - before.fuse:
                problems.append(f"FUSE mounts left: {sorted(after.fuse)}")
            if after.sessions > before.sessions:
                problems.append(f"{after.sessions} client session(s) of client."
                                f"{self.ceph.user} left on the monitor")
            if after.watchers > before.watchers:
                problems.append(f"watches left on the OSD: {self.ceph.cluster.watchers()}")
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.2)


@pytest.fixture
def ustack(uapi: Api, user_server: Server, ceph: Ceph,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserStack]:
    """The running stack; fails the test if it leaves anything behind, here or in the
    cluster."""
    s = UserStack(uapi, user_server, ceph, tmp_path_factory.getbasetemp())
    before = s.traces()
    assert before.sessions == 0 and before.watchers == 0, "the cluster is not idle"
    yield s
    problems = s.settled(before)
    assert not problems, "\n".join(problems)


def image_digest(ceph: Ceph, spec: str) -> str:
    data = ceph.cluster.run("rbd", "export", "--no-progress", spec, "-", timeout=120).stdout
    return hashlib.sha256(data).hexdigest()


def wait_for_log(path: str, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = Path(path).read_text(errors="replace")
        if text in log:
            return log
        assert time.monotonic() < deadline, f"{text!r} not in {path}:\n{log[-2000:]}"
        time.sleep(0.05)


def check_block_device(view: dict[str, Any], ro: bool) -> None:
    path = view["device_file"]
    assert stat.S_ISBLK(os.stat(path).st_mode), path
    name = Path(path).name
    assert view["device_id"] == int(name.removeprefix("loop"))
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == ("1" if ro else "0")
    backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    assert backing.endswith("/fs/image"), backing
    assert Path(backing).parent.as_posix() in fuse_mounts()


def check_secret_kept(stack: UserStack, secret: str) -> None:
    """The key is in no argv, no environment and no file of the daemon or its servers."""
    for pid in fuse_servers() | {stack.server.proc.pid}:
        for what in ("cmdline", "environ"):
            assert secret.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, what)
    for path in stack.server.run_dir.rglob("*"):
        if path.is_file() and "fs" not in path.relative_to(stack.server.run_dir).parts:
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in stack.server.log_text()


# -- the done-when scenarios -------------------------------------------------------------------


@pytest.mark.parametrize("snapshot", [None, "v1"], ids=["ro-head", "snapshot"])
def test_a_restricted_user_attaches_mounts_overlays_and_boots_without_writing(
    ustack: UserStack, snapshot: str | None
) -> None:
    api, ceph = ustack.api, ustack.ceph
    head_before = image_digest(ceph, "rbd/base")
    # (rbd export, as admin, updated the access time: made old again after it.)
    ceph.age_access_time("base")
    pool_before = ceph.cluster.pool_state()
    rbd = api.post("/attach/rbd", ceph.rbd_spec(snapshot=snapshot))
    assert rbd["options"] == {"ro": True, "name": ceph.user}  # the secret is never shown
    check_block_device(rbd, ro=True)
    check_secret_kept(ustack, ceph.secret)
    # A read-only open takes no watch on the header.
    assert ceph.cluster.watchers() == []
    assert len(ceph.cluster.sessions(ceph.user)) == 1
    mnt = api.post("/mount/rbd", {"rbd_id": rbd["id"], "fs_type": "squashfs",
                                  "mount_options": ["ro"]})
    assert Path(mnt["mountpoint"], "etc/os-release").read_text().startswith(
        'NAME="imageapi test image"')
    ovl = api.post("/mount/overlay", {"lower": [{"kind": "rbd", "mount_id": mnt["id"]}]})
    c = api.post("/container", {"name": "reader", "command": READER, "state": "running",
                                "mount": {"kind": "overlay", "mount_id": ovl["id"]}})
    wait_for_log(c["logfile"], "imageapi test image")
    deadline = time.monotonic() + 10
    while not Path(ovl["upperdir"], "written").exists():
        assert time.monotonic() < deadline, "the container did not write into its overlay"
        time.sleep(0.05)
    api.delete("/container/byname/reader")
    api.delete(f"/mount/overlay/{ovl['id']}")
    api.delete(f"/mount/rbd/{mnt['id']}")
    gone = api.delete(f"/attach/rbd/{rbd['id']}")
    assert gone["device_file"] == rbd["device_file"]
    # Nothing was written: not the image's content, not any of its objects (an access-time
    # update would show in the header's omap, a watch in its version).
    assert ceph.cluster.pool_state() == pool_before
    assert image_digest(ceph, "rbd/base") == head_before


def test_krakens_nested_post_boots_from_ceph(ustack: UserStack) -> None:
    api, ceph = ustack.api, ustack.ceph
    c = api.post("/container", {
        "name": "kraken", "command": READER, "state": "running",
        "mount": {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "rbd": {
            "fs_type": "squashfs", "mount_options": ["ro"], "rbd": ceph.rbd_spec()}}]}},
    })
    assert c["state"] == "running"
    wait_for_log(c["logfile"], "imageapi test image")
    lower = c["mount"]["overlay"]["lower"][0]["rbd"]
    check_block_device(lower["rbd"], ro=True)
    done = subprocess.run(["nsenter", "-t", str(c["pid"]), "-a", "cat", "/etc/hostname"],
                          capture_output=True, text=True, timeout=10)
    assert done.stdout.strip() == "testimage"
    api.delete("/container/byname/kraken")
    assert api.get("/attach/rbd") == []


def test_a_namespace_image(ustack: UserStack) -> None:
    api, ceph = ustack.api, ustack.ceph
    m = api.post("/mount/rbd", {"fs_type": "squashfs", "mount_options": ["ro"],
                                "rbd": ceph.rbd_spec(namespace="team1")})
    assert Path(m["mountpoint"], "etc/hostname").read_text() == "testimage\n"
    assert m["rbd"]["options"]["namespace"] == "team1"
    api.delete(f"/mount/rbd/{m['id']}")


def test_a_read_write_mapping_writes_through_librbd(ustack: UserStack) -> None:
    api, ceph = ustack.api, ustack.ceph
    ceph.cluster.run("rbd", "create", "--size", "16M", "rbd/scratch")
    try:
        spec = ceph.rbd_spec(image="scratch")
        spec["options"].pop("ro")
        spec["options"]["rw"] = True
        rbd = api.post("/attach/rbd", spec)
        check_block_device(rbd, ro=False)
        assert Path(f"/sys/block/loop{rbd['device_id']}/loop/dio").read_text().strip() == "1"
        # A read-write open watches the image's header.
        assert len(ceph.cluster.watchers()) == 1
        payload = os.urandom(1 << 20)
        fd = os.open(rbd["device_file"], os.O_WRONLY)
        try:
            os.pwrite(fd, payload, 3 << 20)
            os.fsync(fd)  # a flush: librbd has it
        finally:
            os.close(fd)
        exported = ceph.cluster.run("rbd", "export", "--no-progress", "rbd/scratch",
                                    "-").stdout
        assert exported[3 << 20:4 << 20] == payload
        # Discard reaches librbd too: the range reads back as zeroes.
        subprocess.run(["blkdiscard", "-o", str(3 << 20), "-l", str(1 << 20),
                        rbd["device_file"]], check=True, timeout=30)
        exported = ceph.cluster.run("rbd", "export", "--no-progress", "rbd/scratch",
                                    "-").stdout
        assert exported[3 << 20:4 << 20] == b"\0" * (1 << 20)
        api.delete(f"/attach/rbd/{rbd['id']}")
    finally:
        ceph.cluster.run("rbd", "rm", "--no-progress", "rbd/scratch")


def test_exclusive_takes_the_lock_and_detach_releases_it(ustack: UserStack) -> None:
    api, ceph = ustack.api, ustack.ceph
    ceph.cluster.run("rbd", "create", "--size", "8M", "rbd/locked")
    try:
        spec = ceph.rbd_spec(image="locked", exclusive=True)
        spec["options"].pop("ro")
        rbd = api.post("/attach/rbd", spec)
        status = ceph.cluster.text("rbd", "lock", "ls", "rbd/locked")
        assert "exclusive lock" in status.lower() or "auto" in status, status
        api.delete(f"/attach/rbd/{rbd['id']}")
        assert ceph.cluster.text("rbd", "lock", "ls", "rbd/locked").strip() == ""
    finally:
        ceph.cluster.run("rbd", "rm", "--no-progress", "rbd/locked")


# -- errors --------------------------------------------------------------------------------------


def other_key() -> str:
    """A well-formed cephx key that is nobody's."""
    import struct
    blob = struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)
    return base64.b64encode(blob).decode()


@pytest.mark.parametrize(("change", "expect"), [
    ({"options": {"secret": "WRONG"}}, "EACCES: the cluster refused the key of client"),
    ({"options": {"name": "nobody"}}, "EACCES: the cluster refused the key of client"),
    ({"pool": "nosuchpool"}, "ENOENT: image nosuchpool/base not found in the cluster"),
    ({"image": "nosuchimage"}, "ENOENT: image rbd/nosuchimage not found in the cluster"),
    ({"snapshot": "nosuchsnap"}, "ENOENT: image rbd/base@nosuchsnap not found in the cluster"),
], ids=["wrong-secret", "unknown-user", "unknown-pool", "unknown-image", "unknown-snapshot"])
def test_a_refused_map_is_a_clear_400_within_the_timeout(
    ustack: UserStack, change: dict[str, Any], expect: str
) -> None:
    spec = ustack.ceph.rbd_spec(mount_timeout=5)
    for key, value in change.items():
        if key == "options":
            spec["options"].update({k: other_key() if v == "WRONG" else v
                                    for k, v in value.items()})
        else:
            spec[key] = value
    began = time.monotonic()
    error = ustack.api.post("/attach/rbd", spec, expect=400)
    took = time.monotonic() - began
    assert expect in error["message"], error
    assert ustack.ceph.secret not in error["message"]
    assert took < 5, f"{took:.1f} s"


@pytest.mark.parametrize(("option", "why"), [
    ({"ip": "127.0.0.1"}, "librados chooses the client's address"),
    ({"lock_on_read": True}, "exclusive lock for writes only"),
    ({"alloc_size": 1000}, "power of two"),
], ids=["ip", "lock_on_read", "alloc_size"])
def test_options_the_user_driver_cannot_honour_are_refused(
    ustack: UserStack, option: dict[str, Any], why: str
) -> None:
    error = ustack.api.post("/attach/rbd", ustack.ceph.rbd_spec(**option), expect=400)
    assert why in error["message"], error


def test_options_that_map_to_librados_are_honoured(ustack: UserStack) -> None:
    api, ceph = ustack.api, ustack.ceph
    rbd = api.post("/attach/rbd", ceph.rbd_spec(
        fsid=ceph.cluster.fsid, crc=True, tcp_nodelay=True, cephx_sign_messages=True,
        osdkeepalive=5, osd_idle_ttl=60, queue_depth=16, share=True, mount_timeout=7))
    api.delete(f"/attach/rbd/{rbd['id']}")
    assert "options.share ignored" in ustack.server.log_text()
    error = api.post("/attach/rbd", ceph.rbd_spec(fsid="00000000-0000-4000-8000-000000000000"),
                     expect=400)
    assert "fsid" in error["message"] and ceph.cluster.fsid in error["message"], error


def test_a_stopped_monitor_answers_within_mount_timeout(
    uapi: Api, user_server: Server, ceph: Ceph, tmp_path: Path
) -> None:
    """A cluster of its own, its monitor stopped: the map fails in mount_timeout seconds
    (librados' connect would wait 300 s) and leaves nothing behind."""
    with cephcluster.running_cluster(tmp_path / "dead") as dead:
        secret = dead.add_user("imageapi", "mon", "profile rbd", "osd", "profile rbd pool=rbd")
        dead.stop_daemon("mon.a")
        stack = UserStack(uapi, user_server, ceph, tmp_path.parent)
        before = stack.traces()
        spec = {"monitors": dead.monitors, "pool": "rbd", "image": "base",
                "options": {"ro": True, "name": "imageapi", "secret": secret,
                            "mount_timeout": 3}}
        began = time.monotonic()
        error = uapi.post("/attach/rbd", spec, expect=500)
        took = time.monotonic() - began
        assert error["message"].startswith("ETIMEDOUT"), error
        assert "connecting to the monitors" in error["message"], error
        assert 2.5 < took < 10, f"{took:.1f} s"
        assert not stack.settled(before)


# -- a real OS from Ceph -------------------------------------------------------------------------


def inside(pid: int, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-a", *command], capture_output=True,
                          text=True, timeout=30)


def test_systemd_boots_from_ceph_to_running(ustack: UserStack, systemd_squashfs: Path) -> None:
    api, ceph = ustack.api, ustack.ceph
    ceph.import_image(systemd_squashfs, "debian-systemd")
    c = api.post("/container", {
        "name": "node", "systemd": True, "command": "/usr/lib/systemd/systemd",
        "state": "running",
        "mount": {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "rbd": {
            "fs_type": "squashfs", "mount_options": ["ro"],
            "rbd": ceph.rbd_spec(image="debian-systemd")}}]}},
    })
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = inside(c["pid"], "systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        failed = inside(c["pid"], "systemctl", "--failed", "--no-legend", "--plain").stdout
        assert state == "running", f"systemd says {state!r}; failed units:\n{failed}"
    finally:
        api.get(f"/container/{c['id']}/exited")
    deadline = time.monotonic() + HALT_TIMEOUT + 10
    while api.get(f"/container/{c['id']}")["state"] == "stopping":
        assert time.monotonic() < deadline, "systemd did not halt"
        time.sleep(0.2)
    assert api.get(f"/container/{c['id']}")["state"] == "exited"
    api.delete("/container/byname/node")


# -- choosing the driver, finding the bindings -------------------------------------------------


def test_auto_chooses_the_user_driver_without_krbd_and_says_so(
    user_server: Server, cgroup_root: Path, tmp_path: Path
) -> None:
    assert "rbd driver: user, librbd through FUSE" in user_server.log_text()
    srv = start_server(tmp_path / "run", "--rbd-sysfs", str(tmp_path / "no-rbd"),
                       "--cgroup-root", str(cgroup_root))
    try:
        log = srv.log_text()
        assert "rbd driver: user" in log and "auto: " in log and "does not exist" in log, log
    finally:
        assert srv.stop() == 0


def test_the_bindings_load_by_file_into_this_python() -> None:
    """Debian's rados/rbd, built for its /usr/bin/python3, load into whichever CPython 3.11
    runs the daemon (here a venv's, which does not see dist-packages), and only they do."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; from imageapi.rbdfuse import bindings; "
         "r, b = bindings.load(); print(r.__file__, b.__file__, "
         "'/usr/lib/python3/dist-packages' in sys.path)"],
        capture_output=True, text=True, timeout=60, check=True)
    rados_file, rbd_file, on_path = done.stdout.split()
    assert Path(rados_file).name.startswith("rados.") and Path(rbd_file).name.startswith("rbd.")
    assert on_path == "False"


def test_bindings_of_another_python_are_named_not_loaded(tmp_path: Path) -> None:
    assert not bindings._on_path("rados")  # a venv: the search by file is what answers
    (tmp_path / "rados.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    with pytest.raises(bindings.BindingsMissing, match="built for another Python"):
        bindings.locate((tmp_path,))
    with pytest.raises(bindings.BindingsMissing, match="apt-get install python3-rados"):
        bindings.locate((tmp_path / "empty",))


def test_a_killed_fuse_server_fails_its_mapping_and_detach_still_cleans_up(
    ustack: UserStack,
) -> None:
    api, ceph = ustack.api, ustack.ceph
    m = api.post("/mount/rbd", {"fs_type": "squashfs", "mount_options": ["ro"],
                                "rbd": ceph.rbd_spec()})
    (server,) = fuse_servers()
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server in hostview.running("imageapi-rbd"):
        assert time.monotonic() < deadline, "the FUSE server did not die"
        time.sleep(0.05)
    # Its mapping is gone with it: reads fail (nothing is cached of this file yet).
    fd = os.open(m["rbd"]["device_file"], os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        with pytest.raises(OSError):
            for offset in range(0, 8 << 20, 1 << 20):  # the squashfs is a few MiB
                os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    api.delete(f"/mount/rbd/{m['id']}")
