"""Fixtures: a real squashfs image, a krbd simulator, a real imageapi-server process.

Privileged tests need root, /dev/fuse and loop devices. Outside CI they skip without them;
with CI=true every skip is turned into a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import cephcluster, hostview
from tests.apiclient import Api
from tests.cephcluster import CephCluster
from tests.images import systemd_image
from tests.krbdsim.harness import add_image, make_cluster, running_simulator

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


# -- skips are failures in CI ------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which is a failure here: {report.longrepr}"


def need_privileges() -> None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        missing.append("/dev/loop-control")
    for tool in ("mksquashfs", "losetup"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if missing:
        pytest.skip("needs " + ", ".join(missing))


# -- images and the simulated cluster ----------------------------------------------------------


def build_squashfs(tree: Path, out: Path) -> Path:
    subprocess.run(
        ["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-all-root"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return out


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny system-image tree: enough to recognise it, and busybox for later containers."""
    need_privileges()
    root = tmp_path_factory.mktemp("image") / "root"
    for d in ("bin", "etc", "dev", "proc", "sys", "tmp", "run", "var", "usr/bin", "sbin"):
        (root / d).mkdir(parents=True)
    (root / "etc/os-release").write_text('NAME="imageapi test image"\nID=imageapi-test\n')
    (root / "etc/hostname").write_text("testimage\n")
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox (Debian's busybox-static)")
    shutil.copy2(busybox, root / "bin/busybox")
    for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split():
        if applet != "busybox" and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/not-executable").write_text("#!/bin/sh\necho never\n")
    return root


@pytest.fixture(scope="session")
def squashfs_image(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_squashfs(image_tree, tmp_path_factory.mktemp("sqsh") / "systemd.sqsh")


@pytest.fixture(scope="session")
def systemd_squashfs() -> Path:
    """A squashfs of a minimal Debian bookworm that boots systemd (tests/images.py): built with
    debootstrap on the first run on a machine (minutes, needs the Debian mirror), then cached in
    /var/cache/imageapi-tests/ (env IMAGEAPI_TEST_CACHE). A failed build is an error."""
    need_privileges()
    if shutil.which("debootstrap") is None and shutil.which("apt-get") is None:
        pytest.skip("needs debootstrap (apt-get install debootstrap)")
    return systemd_image()


@pytest.fixture(scope="session")
def cluster(squashfs_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    info = make_cluster(tmp_path_factory.mktemp("cluster"), pools={"rbd": 1, "images": 7})
    add_image(info, "rbd", "systemd.sqsh", squashfs_image)
    add_image(info, "rbd", "systemd.sqsh", squashfs_image, snap="v1")
    add_image(info, "images", "base", squashfs_image)
    add_image(info, "images", "base", squashfs_image, namespace="team1")
    return info


@pytest.fixture(scope="module")
def sim(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_simulator(tmp_path_factory.mktemp("krbd"), cluster) as simulator:
        yield simulator
        assert simulator.mapped() == [], "rbd devices still mapped when the module ended"


# -- a live Ceph cluster (tests/cephcluster.py) ----------------------------------------------

# The restricted user the user-space driver's tests map with, as a node would.
CEPH_USER = "imageapi"
CEPH_USER_CAPS = ("mon", "profile rbd", "osd", "profile rbd pool=rbd")


@dataclass
class Ceph:
    """A running cluster with pool `rbd` holding the test images (`base`, its snapshot `v1`,
    `base` in namespace `team1`), and the restricted user `client.imageapi`."""

    cluster: CephCluster
    user: str
    secret: str

    @property
    def monitors(self) -> list[str]:
        return self.cluster.monitors

    def rbd_spec(self, image: str = "base", pool: str = "rbd", snapshot: str | None = None,
                 **options: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "monitors": self.monitors, "pool": pool, "image": image,
            "options": {"ro": True, "name": self.user, "secret": self.secret, **options},
        }
        if snapshot:
            spec["snapshot"] = snapshot
        return spec

    def age_access_time(self, image: str, pool: str = "rbd") -> None:
        """Set the image's access time (its header's omap) to the epoch: librbd, unless told
        not to, updates it at the next read of whoever opens the image, read-only or not."""
        info = json.loads(self.cluster.text("rbd", "info", f"{pool}/{image}", "--format", "json"))
        with tempfile.NamedTemporaryFile() as f:
            f.write(bytes(8))  # utime_t {sec, nsec}: 0
            f.flush()
            self.cluster.run("rados", "-p", pool, "setomapval", f"rbd_header.{info['id']}",
                             "access_timestamp", "--input-file", f.name)

    def import_image(self, source: Path, image: str, pool: str = "rbd",
                     namespace: str = "") -> None:
        spec = f"{pool}/{namespace}/{image}" if namespace else f"{pool}/{image}"
        if self.cluster.run("rbd", "info", spec, check=False).returncode != 0:
            self.cluster.run("rbd", "import", "--no-progress", str(source), spec, timeout=300)


def need_ceph() -> None:
    need_privileges()
    missing = cephcluster.missing_tools()
    if missing:
        pytest.skip("needs " + ", ".join(missing) + " (apt-get install "
                    + " ".join(cephcluster.PACKAGES) + ")")


@pytest.fixture(scope="session")
def ceph(squashfs_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """One cluster for the session, stopped (and its directory removed) at the end."""
    need_ceph()
    path = tmp_path_factory.mktemp("ceph")
    with cephcluster.running_cluster(path) as cluster:
        secret = cluster.add_user(CEPH_USER, *CEPH_USER_CAPS)
        c = Ceph(cluster, CEPH_USER, secret)
        c.import_image(squashfs_image, "base")
        cluster.run("rbd", "snap", "create", "rbd/base@v1")
        cluster.run("rbd", "namespace", "create", "rbd/team1")
        c.import_image(squashfs_image, "base", namespace="team1")
        yield c


# -- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    run_dir: Path
    log: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    run_dir: Path, *extra: str, env: dict[str, str] | None = None, wrapper: Sequence[str] = ()
) -> Server:
    """A real server process; `wrapper` runs it under another command (e.g. setpriv)."""
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}-server.log"
    cmd = [
        *wrapper, sys.executable, "-m", "imageapi", "--scheme", "http", "--host", "127.0.0.1",
        "--port", str(port), "--run-dir", str(run_dir), *extra,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "IMAGEAPI_LOGLEVEL": "DEBUG", **(env or {})},
        )
    server = Server(proc, f"http://127.0.0.1:{port}", run_dir, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
        try:
            # An answer, not just a bound port: the service (and its helper) exists by then.
            if httpx.get(f"{server.url}/imageapi/v1/swagger.json", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not listen within 30 s:\n{server.log_text()}")


STOP_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def cgroup_root() -> Iterator[Path]:
    """A cgroup2 directory (not yet made) for one server's containers; the host's cgroup
    tree must be exactly as before once that server has stopped."""
    need_privileges()
    mount = hostview.cgroup2_mount()
    if mount is None:
        pytest.skip("needs a cgroup2 hierarchy")
    before = hostview.cgroup_tree(mount)
    root = mount / f"imageapi-test-{os.getpid()}-{time.monotonic_ns()}"
    yield root
    assert not root.exists(), f"cgroups left behind: {sorted(hostview.tree(root))}"
    assert hostview.cgroup_tree(mount) - before == set(), "new cgroups on the host"


@pytest.fixture(scope="module")
def stop_timeout() -> float:
    """The server's --stop-timeout; a module may override this fixture."""
    return STOP_TIMEOUT


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    """More flags for the module's server; a module may override this fixture."""
    return []


@pytest.fixture(scope="module")
def server(
    sim: Any, cgroup_root: Path, stop_timeout: float, server_args: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    run_dir = tmp_path_factory.mktemp("imageapi") / "run"
    with checked_server(
        run_dir, "--rbd-sysfs", str(sim.sysfs), "--dev-dir", str(sim.devdir),
        "--device-timeout", "5", "--stop-timeout", str(stop_timeout),
        "--cgroup-root", str(cgroup_root), *server_args,
    ) as srv:
        yield srv


@contextlib.contextmanager
def checked_server(run_dir: Path, *args: str, env: dict[str, str] | None = None
                   ) -> Iterator[Server]:
    """A server that, when the block ends, must hold nothing and have left nothing running."""
    srv = start_server(run_dir, *args, env=env)
    helpers = hostview.descendants(srv.proc.pid)
    yield srv
    # The helper keeps one spare init forked ahead of time; it is not a leftover.
    leftover = {
        pid for pid in hostview.descendants(srv.proc.pid) - helpers
        if hostview.comm(pid) != "imageapi-spare"
    }
    # The daemon leaves containers and mounts alone when it stops (as it must), so anything a
    # failed test left is removed here, through the API — and still reported as a failure.
    purged = purge(srv.url)
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log_text()}"
    assert not purged, f"objects left in the daemon at the end: {purged}"
    assert not leftover, f"processes left running under the server: {sorted(leftover)}"
    assert hostview.tree(run_dir / "mounts") == set(), "mount dir not empty at the end"


def purge(url: str) -> list[str]:
    """Delete every object the daemon holds, users before what they stand on."""
    api = Api(url)
    gone: list[str] = []
    try:
        for _ in range(10):  # inline children go with their owners; collect again
            batch = [f"/container/{c['id']}" for c in api.get("/container")]
            # By id (0.2): a mount of a local device has no v1 path.
            everything = [(m["id"], f"/mount?id={m['id']}") for m in api.get("/mount")]
            everything += [(a["id"], f"/attach?id={a['id']}") for a in api.get("/attach")]
            batch += [path for _id, path in sorted(everything, reverse=True)]
            if not batch:
                break
            for path in batch:
                if api.request("DELETE", path).status_code == 200:
                    gone.append(path)
    finally:
        api.close()
    return gone


@pytest.fixture(scope="module")
def api(server: Server) -> Iterator[Api]:
    client = Api(server.url)
    yield client
    client.close()


# -- leak checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Everything a request could change: the registry, the kernel, the simulator, the run dir."""

    objects: tuple[Any, ...]
    host: hostview.Snapshot
    mapped: tuple[str, ...]
    run_files: frozenset[str]


class Stack:
    def __init__(self, api: Api, sim: Any, server: Server, cluster: Any, scope: Path) -> None:
        self.api, self.sim, self.server, self.cluster = api, sim, server, cluster
        self.scope = scope

    def world(self) -> World:
        objects = (
            self.api.get("/attach"),
            self.api.get("/mount"),
            self.api.get("/container"),
        )
        return World(
            objects=tuple(repr(o) for o in objects),
            host=hostview.Snapshot.take(self.scope),
            mapped=tuple(self.sim.mapped()),
            run_files=frozenset(hostview.tree(self.server.run_dir / "mounts")),
        )

    def rbd_spec(self, image: str = "systemd.sqsh", pool: str = "rbd", **options: Any) -> dict:
        return {
            "monitors": list(self.cluster.monitors),
            "pool": pool,
            "image": image,
            "options": {"ro": True, "name": self.cluster.key_name,
                        "secret": self.cluster.secret, **options},
        }


@pytest.fixture
def stack(
    api: Api, sim: Any, server: Server, cluster: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The running stack; fails the test if it leaves anything behind."""
    s = Stack(api, sim, server, cluster, tmp_path_factory.getbasetemp())
    before = s.world()
    yield s
    after = s.world()
    problems = before.host.diff(after.host)
    if after.objects != before.objects:
        problems.append(f"objects left in the registry: {after.objects} (before: {before.objects})")
    if after.mapped != before.mapped:
        problems.append(f"rbd devices left mapped: {after.mapped} (before: {before.mapped})")
    if after.run_files != before.run_files:
        problems.append(f"run dir changed: {sorted(after.run_files ^ before.run_files)}")
    assert not problems, "\n".join(problems)
