"""State that survives the daemon: SIGTERM and SIGKILL restarts, containers that end while no
daemon runs, a killed helper, a crash between every kernel call and its record, a corrupt
record — against real servers on one run directory, the krbd simulator and real mounts.

After every restart the graph must be consistent with the system: everything the API shows
exists, everything imageapi made is shown, and once everything is deleted nothing is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import hostview
from tests.apiclient import Api
from tests.conftest import REPO, Ceph, Server, build_squashfs, purge, start_server
from tests.krbdsim.harness import add_image

# Ends at once on a stop request; `/quit-N` in its root makes it exit with status N.
WAITER = ("/bin/sh -c \"trap 'exit 0' TERM; while :; do for n in 0 3; do "
          "[ -e /quit-$n ] && exit $n; done; sleep 0.1; done\"")


@dataclass
class Daemon:
    """A server on one run directory, restarted as the test says."""

    run_dir: Path
    args: list[str]
    server: Server | None = None
    api: Api = field(init=False)

    def start(self, **env: str) -> Daemon:
        self.server = start_server(self.run_dir, *self.args, env=env or None)
        self.api = Api(self.server.url)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.server is not None
        self.api.close()
        self.server.proc.send_signal(sig)
        self.server.proc.wait(30)

    def restart(self, sig: int = signal.SIGKILL, **env: str) -> Daemon:
        self.kill(sig)
        return self.start(**env)

    def log(self) -> str:
        assert self.server is not None
        return self.server.log_text()


def helpers(run_dir: Path | None = None) -> set[int]:
    """The helper processes: all of them, or the one listening in `run_dir`."""
    found = {p for p in hostview.descendants(1) if hostview.comm(p) == "imageapi-helper"}
    if run_dir is None:
        return found
    path = str(run_dir / "helper.sock")
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path:
            inodes.add(f"socket:[{fields[6]}]")
    mine = set()
    for pid in found:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    mine.add(pid)
            except OSError:
                pass
    return mine


def is_zygote(pid: int) -> bool:
    """The helper's own forks (a spare being made) run its command line until they exec."""
    try:
        return b"imageapi.runtime.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="module")
def images(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("restart-images")
    build_squashfs(image_tree, out / "local.sqsh")
    return out


@pytest.fixture
def daemon(sim: Any, cgroup_root: Path, images: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    run_dir = tmp_path_factory.mktemp("restart") / "run"
    d = Daemon(run_dir, ["--rbd-sysfs", str(sim.sysfs), "--dev-dir", str(sim.devdir),
                         "--device-timeout", "5", "--stop-timeout", "2",
                         "--cgroup-root", str(cgroup_root)])
    try:
        yield d
        # Whatever the test did, the last daemon takes everything down through the API.
        if d.server is None or d.server.proc.poll() is not None:
            d.start()
        assert d.server is not None
        purged = purge(d.server.url)
    finally:
        if d.server is not None and d.server.proc.poll() is None:
            code = d.server.stop()
            assert code == 0, d.log()
    assert not purged, f"objects left at the end: {purged}"
    check_nothing_left(d, sim, images)
    deadline = time.monotonic() + 10
    while helpers(run_dir):
        assert time.monotonic() < deadline, "a helper outlived its last container"
        time.sleep(0.05)


def check_nothing_left(d: Daemon, sim: Any, images: Path) -> None:
    mounts = str(d.run_dir / "mounts")
    assert [m for m in hostview.mounts() if m[0].startswith(mounts)] == []
    assert hostview.tree(d.run_dir / "mounts") == set()
    assert [dev for dev, f in hostview.loop_devices().items() if f.startswith(str(images))] == []
    assert sim.mapped() == []


def rbd_spec(cluster: Any, image: str = "systemd.sqsh", pool: str = "rbd") -> dict[str, Any]:
    return {"monitors": list(cluster.monitors), "pool": pool, "image": image,
            "options": {"ro": True, "name": cluster.key_name, "secret": cluster.secret}}


def kraken_container(cluster: Any, name: str = "kraken") -> dict[str, Any]:
    """What Kraken sends: one nested POST, the rbd defined inline, running at once."""
    return {"name": name, "command": WAITER, "state": "running",
            "mount": {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "rbd": {
                "fs_type": "squashfs", "mount_options": ["ro"], "rbd": rbd_spec(cluster)}}]}}}


def everything(api: Api) -> dict[str, Any]:
    return {path: api.get(path) for path in ("/attach/rbd", "/attach/loopback", "/mount",
                                             "/container")}


def check_consistent(d: Daemon, sim: Any, images: Path, cgroup_root: Path) -> dict[str, Any]:
    """Everything the API shows exists; everything imageapi made is shown."""
    seen = everything(d.api)
    assert {str(r["device_id"]) for r in seen["/attach/rbd"]} == set(sim.mapped())
    ours = {f"/dev/{dev}" for dev, f in hostview.loop_devices().items()
            if f.startswith(str(images))}
    assert {a["device_file"] for a in seen["/attach/loopback"]} == ours
    mount_dir = str(d.run_dir / "mounts")
    shown = {m[m["kind"]]["mountpoint"] for m in seen["/mount"]}
    mounted = {m[0] for m in hostview.mounts() if m[0].startswith(mount_dir + "/")}
    assert shown == mounted
    dirs = set(shown)
    for m in seen["/mount"]:
        if m["kind"] == "overlay":
            dirs |= {m["overlay"]["upperdir"], m["overlay"]["workdir"]}
    assert {str(d.run_dir / "mounts" / p) for p in hostview.tree(d.run_dir / "mounts")
            if "/" not in p} == dirs
    running = {c["pid"] for c in seen["/container"] if c["state"] in ("running", "stopping")}
    for c in seen["/container"]:
        if c["state"] in ("running", "stopping"):
            root = os.readlink(f"/proc/{c['pid']}/root")
            assert root == "/", root  # it pivoted; its mount table holds its image
    inits = {p for h in helpers(d.run_dir) for p in hostview.descendants(h)
             if _ppid(p) == h and not is_zygote(p) and not hostview.comm(p).startswith(
                 "imageapi-") and not _zombie(p)}
    assert inits == running, {p: (hostview.comm(p), _ppid(p), Path(f"/proc/{p}/cmdline")
                                  .read_bytes()[:80]) for p in inits ^ running}
    cgroups = {p.name for p in cgroup_root.iterdir() if p.is_dir()} if cgroup_root.exists() \
        else set()
    assert cgroups == {f"container-{c['id']}" for c in seen["/container"]
                       if c["systemd"] and c["state"] in ("running", "stopping")}
    return seen


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def wait_state(api: Api, path: str, states: set[str], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = api.get(path)
        if view["state"] in states:
            return view
        assert time.monotonic() < deadline, f"{path} still {view['state']}, wanted {states}"
        time.sleep(0.05)


def build_world(d: Daemon, cluster: Any, images: Path) -> dict[str, Any]:
    api = d.api
    kraken = api.post("/container", kraken_container(cluster))
    rbd = api.post("/attach/rbd", rbd_spec(cluster, image="base", pool="images"))
    mnt = api.post("/mount/rbd", {"rbd_id": rbd["id"], "fs_type": "squashfs",
                                  "mount_options": ["ro"]})
    ovl = api.post("/mount/overlay", {"lower": [{"kind": "rbd", "mount_id": mnt["id"]}]})
    later = api.post("/container", {"name": "later", "command": WAITER,
                                    "mount": {"kind": "overlay", "mount_id": ovl["id"]}})
    bare = api.post("/attach/loopback", {"path": str(images / "local.sqsh")})
    return {"kraken": kraken, "later": later, "bare": bare, "overlay": ovl, "mount": mnt,
            "rbd": rbd}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_brings_everything_back(daemon: Daemon, sig: int, cluster: Any, sim: Any,
                                        images: Path, cgroup_root: Path) -> None:
    daemon.start()
    world = build_world(daemon, cluster, images)
    before = check_consistent(daemon, sim, images, cgroup_root)
    helper = helpers(daemon.run_dir)
    assert len(helper) == 1
    daemon.restart(sig)
    assert helpers(daemon.run_dir) == helper, "a second helper was started"
    assert "reconnected to the container helper" in daemon.log()
    after = check_consistent(daemon, sim, images, cgroup_root)
    for path in before:
        assert after[path] == before[path], path
    # Recovery is idempotent: once more changes nothing.
    daemon.restart(signal.SIGKILL)
    assert check_consistent(daemon, sim, images, cgroup_root) == before
    assert "0 dropped, 0 destroy(s) finished, 0 step(s) rolled back, 0 leftover(s)" \
        in daemon.log()
    api = daemon.api
    # Its console still reaches its log.
    pid = world["kraken"]["pid"]
    subprocess.run(["nsenter", "-t", str(pid), "-a", "/bin/sh", "-c",
                    "echo console-after-restart > /dev/console"], check=True, timeout=10)
    log = Path(world["kraken"]["logfile"])
    deadline = time.monotonic() + 10
    while "console-after-restart" not in log.read_text():
        assert time.monotonic() < deadline, "the console is no longer relayed"
        time.sleep(0.05)
    assert "re-adopted" in log.read_text()
    # Stop by name, start, delete: all work on what came back.
    assert api.get("/container/byname/kraken/exited")["state"] in ("stopping", "exited")
    assert wait_state(api, "/container/byname/kraken", {"exited", "dead"})["state"] == "exited"
    started = api.get("/container/byname/later/running")
    assert started["state"] == "running" and started["pid"] > 0
    # Ids go on from where they were: never reused.
    fresh = api.post("/attach/loopback", {"path": str(images / "local.sqsh")})
    assert fresh["id"] > max(o["id"] for o in world.values())
    for name in ("kraken", "later"):
        api.delete(f"/container/byname/{name}")
    for path in (f"/mount/overlay/{world['overlay']['id']}", f"/mount/rbd/{world['mount']['id']}",
                 f"/attach/rbd/{world['rbd']['id']}", f"/attach/loopback/{world['bare']['id']}",
                 f"/attach/loopback/{fresh['id']}"):
        api.delete(path)
    check_consistent(daemon, sim, images, cgroup_root)


def test_containers_that_end_while_no_daemon_runs(daemon: Daemon, cluster: Any, sim: Any,
                                                  images: Path, cgroup_root: Path) -> None:
    daemon.start()
    api = daemon.api
    base = api.post("/mount", {"kind": "rbd", "rbd": {
        "fs_type": "squashfs", "mount_options": ["ro"], "rbd": rbd_spec(cluster)}})
    made = {}
    for code in (0, 3):
        made[code] = api.post("/container", {
            "name": f"ends-{code}", "command": WAITER, "state": "running",
            "mount": {"kind": "overlay", "overlay": {"lower": [
                {"kind": "rbd", "mount_id": base["mount_id"]}]}}})
    daemon.kill(signal.SIGTERM)
    for code, c in made.items():
        Path(c["mount"]["overlay"]["mountpoint"], f"quit-{code}").touch()
    for c in made.values():
        deadline = time.monotonic() + 10
        while hostview.comm(c["pid"]):
            assert time.monotonic() < deadline, "the container did not end"
            time.sleep(0.05)
    daemon.start()
    assert api is not daemon.api
    assert daemon.api.get("/container/byname/ends-0")["state"] == "exited"
    assert daemon.api.get("/container/byname/ends-3")["state"] == "dead"
    log = Path(made[3]["logfile"]).read_text()
    assert "the container had ended meanwhile" in log and "exited with status 3" in log
    check_consistent(daemon, sim, images, cgroup_root)
    for code in (0, 3):
        daemon.api.delete(f"/container/byname/ends-{code}")
    daemon.api.delete(f"/mount/rbd/{base['mount_id']}")


def test_a_killed_helper_is_replaced_and_its_containers_still_watched(
    daemon: Daemon, cluster: Any, sim: Any, images: Path, cgroup_root: Path
) -> None:
    daemon.start()
    api = daemon.api
    old = api.post("/container", kraken_container(cluster, "old"))
    (helper,) = helpers(daemon.run_dir)
    os.kill(helper, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "started a new container helper" not in daemon.log():
        assert time.monotonic() < deadline, "the daemon did not replace its dead helper"
        time.sleep(0.05)
    assert "the container helper exited" in daemon.log()
    # A new helper serves new containers.
    rbd = api.post("/attach/rbd", rbd_spec(cluster, image="base", pool="images"))
    lower = {"kind": "rbd", "rbd": {"fs_type": "squashfs", "mount_options": ["ro"],
                                    "rbd_id": rbd["id"]}}
    new = api.post("/container", {"name": "new", "command": WAITER, "state": "running",
                                  "mount": {"kind": "overlay", "overlay": {"lower": [lower]}}})
    assert new["state"] == "running"
    assert hostview.comm(helper) == "", "the dead helper was not reaped"
    assert len(helpers(daemon.run_dir)) == 1
    # The old container's end is still noticed (its pidfd), its status unknown.
    os.kill(old["pid"], signal.SIGKILL)
    ended = wait_state(api, "/container/byname/old", {"exited", "dead"})
    assert ended["state"] == "dead"
    assert "could not be known" in Path(old["logfile"]).read_text()
    for name in ("old", "new"):
        api.delete(f"/container/byname/{name}")
    api.delete(f"/attach/rbd/{rbd['id']}")


def test_ids_are_never_reused(daemon: Daemon, images: Path) -> None:
    daemon.start()
    seen = []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        a = daemon.api.post("/attach/loopback", {"path": str(images / "local.sqsh")})
        daemon.api.delete(f"/attach/loopback/{a['id']}")
        seen.append(a["id"])
        daemon.restart(sig)
    assert seen == sorted(set(seen)), seen


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_lost_record_is_reported_and_the_system_cleaned(
    daemon: Daemon, damage: str, cluster: Any, sim: Any, images: Path, cgroup_root: Path
) -> None:
    daemon.start()
    build_world(daemon, cluster, images)
    daemon.kill(signal.SIGKILL)
    db = daemon.run_dir / "state.db"
    if damage == "corrupt":
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        db.write_bytes(b"this is not a database " * 100)
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    daemon.start()
    log = daemon.log()
    if damage == "corrupt":
        assert "the durable record could not be used" in log
        kept = [p.name for p in daemon.run_dir.iterdir() if p.name.startswith("state.db.corrupt")]
        assert kept, "the corrupt record was not kept aside"
        for name in kept:
            (daemon.run_dir / name).unlink()
    # It starts with what the system shows, cleaning what it made: the containers the
    # helper runs, the mounts under its mount dir and the devices under them, and the loop
    # devices it tagged as its own.
    assert everything(daemon.api) == {"/attach/rbd": [], "/attach/loopback": [], "/mount": [],
                                      "/container": []}
    assert "which nothing records" in log
    check_consistent(daemon, sim, images, cgroup_root)


def test_a_second_daemon_on_the_same_run_dir_is_refused(daemon: Daemon) -> None:
    daemon.start()
    with pytest.raises(RuntimeError, match="another imageapi daemon uses this run directory"):
        start_server(daemon.run_dir, *daemon.args)
    assert daemon.api.get("/container") == []


def trace_boundaries(daemon: Daemon, cluster: Any, tmp: Path) -> tuple[list[str], list[str]]:
    """The intent/outcome boundaries of Kraken's nested create and of its delete, in order."""
    trace = tmp / "boundaries"
    daemon.start(IMAGEAPI_TEST_TRACE_INTENTS=str(trace))
    daemon.api.post("/container", kraken_container(cluster))
    created = trace.read_text().splitlines()
    daemon.api.delete("/container/byname/kraken")
    deleted = trace.read_text().splitlines()[len(created):]
    daemon.kill(signal.SIGTERM)
    return [line.split()[1] for line in created], [line.split()[1] for line in deleted]


def crash_during(daemon: Daemon, method: str, path: str, body: Any = None) -> None:
    assert daemon.server is not None
    try:
        r = httpx.request(method, f"{daemon.server.url}/imageapi/v1{path}", json=body,
                          timeout=60)
        raise AssertionError(f"the daemon answered {r.status_code} instead of dying: {r.text}")
    except httpx.TransportError:
        pass
    assert daemon.server.proc.wait(30) == -signal.SIGKILL
    daemon.api.close()


def settle_and_clean(daemon: Daemon, sim: Any, images: Path, cgroup_root: Path,
                     where: str) -> None:
    daemon.start()
    try:
        check_consistent(daemon, sim, images, cgroup_root)
    except AssertionError as exc:
        raise AssertionError(f"after a crash at {where}: {exc}\n{daemon.log()}") from exc
    assert daemon.server is not None
    purge(daemon.server.url)
    assert everything(daemon.api) == {"/attach/rbd": [], "/attach/loopback": [], "/mount": [],
                                      "/container": []}, where
    check_consistent(daemon, sim, images, cgroup_root)
    check_nothing_left(daemon, sim, images)
    daemon.kill(signal.SIGTERM)


def test_a_crash_at_every_step_of_a_nested_create_and_delete(
    daemon: Daemon, cluster: Any, sim: Any, images: Path, cgroup_root: Path,
    tmp_path: Path,
) -> None:
    create, delete = trace_boundaries(daemon, cluster, tmp_path)
    effects = {b.split(":")[0] for b in create + delete}
    assert {"rbd-map", "mkdir", "mount", "spawn", "stop", "unmount", "rmdir",
            "rbd-unmap"} <= effects, effects
    for i, where in enumerate(create, 1):
        daemon.start(IMAGEAPI_TEST_CRASH_AT=str(i))
        crash_during(daemon, "POST", "/container", kraken_container(cluster))
        settle_and_clean(daemon, sim, images, cgroup_root, f"create step {i} ({where})")
    for i, where in enumerate(delete, 1):
        daemon.start()
        daemon.api.post("/container", kraken_container(cluster))
        daemon.restart(signal.SIGTERM, IMAGEAPI_TEST_CRASH_AT=str(i))
        crash_during(daemon, "DELETE", "/container/byname/kraken")
        settle_and_clean(daemon, sim, images, cgroup_root, f"delete step {i} ({where})")
    daemon.start()


def test_a_booted_systemd_survives_a_restart_and_halts_cleanly(
    daemon: Daemon, cluster: Any, systemd_squashfs: Path, sim: Any, images: Path,
    cgroup_root: Path,
) -> None:
    add_image(cluster, "rbd", "debian-restart", systemd_squashfs)
    daemon.args[daemon.args.index("--stop-timeout") + 1] = "30"  # systemd's halt, not SIGKILL
    daemon.start()
    c = daemon.api.post("/container", {
        "name": "node", "systemd": True, "command": "/usr/lib/systemd/systemd",
        "state": "running",
        "mount": {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "rbd": {
            "fs_type": "squashfs", "mount_options": ["ro"],
            "rbd": rbd_spec(cluster, image="debian-restart")}}]}}})

    def system_state() -> str:
        return subprocess.run(["nsenter", "-t", str(c["pid"]), "-a", "systemctl",
                               "is-system-running"], capture_output=True, text=True,
                              timeout=30).stdout.strip()

    deadline = time.monotonic() + 90
    while system_state() != "running":
        assert time.monotonic() < deadline, f"systemd did not boot: {system_state()}"
        time.sleep(0.5)
    daemon.restart(signal.SIGKILL)
    check_consistent(daemon, sim, images, cgroup_root)
    assert daemon.api.get("/container/byname/node")["pid"] == c["pid"]
    assert system_state() == "running"
    daemon.api.get("/container/byname/node/exited")
    final = wait_state(daemon.api, "/container/byname/node", {"exited", "dead"}, 60)
    log = Path(c["logfile"]).read_text()
    assert final["state"] == "exited", log[-3000:]
    assert "stop timeout" not in log, "systemd had to be killed: it did not halt in time"
    assert not (cgroup_root / f"container-{c['id']}").exists()
    daemon.api.delete("/container/byname/node")


def test_drain_stops_and_tears_down_everything(daemon: Daemon, cluster: Any, sim: Any,
                                               images: Path, cgroup_root: Path) -> None:
    daemon.start()
    build_world(daemon, cluster, images)
    daemon.kill(signal.SIGTERM)  # containers and their stacks stay: the node keeps running
    assert sim.mapped()
    drained = subprocess.run(
        [sys.executable, "-m", "imageapi", "--drain", "--run-dir", str(daemon.run_dir),
         *daemon.args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert drained.returncode == 0, drained.stderr
    assert "drain: nothing is left" in drained.stderr
    check_nothing_left(daemon, sim, images)
    deadline = time.monotonic() + 10
    while helpers(daemon.run_dir):
        assert time.monotonic() < deadline, "the helper outlived the drain"
        time.sleep(0.05)


# -- the user-space rbd driver, on a live Ceph cluster -----------------------------------------


@dataclass(frozen=True)
class CephAsCluster:
    """The live cluster, spelt as the helpers above expect of the simulated one."""

    monitors: tuple[str, ...]
    key_name: str
    secret: str


class FuseMappings:
    """The user-space driver's mappings of one run directory, as the helpers above ask the
    simulator for krbd's: each a loop device over a FUSE file, served by a live server."""

    def __init__(self, run_dir: Path, ceph: Ceph) -> None:
        self.root = run_dir / "rbd"
        self.ceph = ceph

    def mapped(self) -> list[str]:
        devices = sorted(dev.removeprefix("loop") for dev, f in hostview.loop_devices().items()
                         if f.startswith(str(self.root) + "/"))
        servers = {p for p in hostview.running("imageapi-rbd")
                   if str(self.root) in _cmdline(p)}
        fuse = [m for m in hostview.mounts() if m[0].startswith(str(self.root) + "/")]
        dirs = [p for p in hostview.tree(self.root) if "/" not in p]
        assert len(servers) == len(fuse) == len(dirs) == len(devices), (
            f"loop devices {devices}, FUSE servers {servers}, FUSE mounts {fuse}, dirs {dirs}")
        if not devices:  # nothing mapped: nothing of ours in the cluster either
            deadline = time.monotonic() + 10
            while self.ceph.cluster.sessions(self.ceph.user) or self.ceph.cluster.watchers():
                assert time.monotonic() < deadline, "client sessions or watches left"
                time.sleep(0.1)
        return devices


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def ceph_world(ceph: Ceph, squashfs_image: Path) -> CephAsCluster:
    ceph.import_image(squashfs_image, "systemd.sqsh")
    return CephAsCluster(tuple(ceph.monitors), ceph.user, ceph.secret)


@pytest.fixture
def udaemon(ceph: Ceph, ceph_world: CephAsCluster, cgroup_root: Path, images: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, FuseMappings]]:
    run_dir = tmp_path_factory.mktemp("restart-user") / "run"
    d = Daemon(run_dir, ["--rbd-driver", "user", "--stop-timeout", "2",
                         "--cgroup-root", str(cgroup_root)])
    maps = FuseMappings(run_dir, ceph)
    yield d, maps
    if d.server is None or d.server.proc.poll() is not None:
        d.start()
    purged = purge(d.server.url)  # type: ignore[union-attr]
    assert d.server is not None
    assert d.server.stop() == 0, d.log()
    assert not purged, f"objects left at the end: {purged}"
    check_nothing_left(d, maps, images)
    deadline = time.monotonic() + 10
    while helpers(run_dir):
        assert time.monotonic() < deadline, "a helper outlived its last container"
        time.sleep(0.05)


def drop_caches(path: str) -> None:
    """Forget the page cache of one file, so that the next read goes to its filesystem."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_restart_keeps_a_container_on_ceph_reading_and_its_mapping(
    udaemon: tuple[Daemon, FuseMappings], sig: int, ceph: Ceph, ceph_world: CephAsCluster,
    images: Path, cgroup_root: Path, image_tree: Path,
) -> None:
    daemon, maps = udaemon
    daemon.start()
    kraken = daemon.api.post("/container", kraken_container(ceph_world))
    bare = daemon.api.post("/attach/rbd", rbd_spec(ceph_world, image="base"))
    before = check_consistent(daemon, maps, images, cgroup_root)
    servers = {p for p in hostview.running("imageapi-rbd") if str(maps.root) in _cmdline(p)}
    assert len(servers) == 2
    daemon.restart(sig)
    assert check_consistent(daemon, maps, images, cgroup_root) == before
    assert {p for p in hostview.running("imageapi-rbd") if str(maps.root) in _cmdline(p)} \
        == servers
    assert "re-adopted" in daemon.log() or "recovery" in daemon.log()
    # The container still reads its image through librbd: with the page caches of the file
    # and of the image's FUSE file dropped, the read goes all the way to the cluster.
    lower = kraken["mount"]["overlay"]["lower"][0]["rbd"]
    drop_caches(f"{lower['mountpoint']}/bin/busybox")
    backing = Path(f"/sys/block/loop{lower['rbd']['device_id']}/loop/backing_file")
    drop_caches(backing.read_text().strip())
    done = subprocess.run(["nsenter", "-t", str(kraken["pid"]), "-a", "md5sum", "/bin/busybox"],
                          capture_output=True, text=True, timeout=30)
    want = subprocess.run(["md5sum", str(image_tree / "bin/busybox")], capture_output=True,
                          text=True, check=True).stdout.split()[0]
    assert done.stdout.split()[:1] == [want], done.stderr
    # The unmounted mapping was re-adopted too: readable, and detachable.
    with open(bare["device_file"], "rb") as dev:
        assert dev.read(4) == b"hsqs"  # the squashfs magic
    daemon.api.delete(f"/attach/rbd/{bare['id']}")
    daemon.api.delete("/container/byname/kraken")
    assert maps.mapped() == []


def test_a_crash_at_every_step_of_a_nested_create_and_delete_from_ceph(
    udaemon: tuple[Daemon, FuseMappings], ceph_world: CephAsCluster, images: Path,
    cgroup_root: Path, tmp_path: Path,
) -> None:
    daemon, maps = udaemon
    create, delete = trace_boundaries(daemon, ceph_world, tmp_path)
    effects = {b.split(":")[0] for b in create + delete}
    assert {"rbd-fuse-start", "rbd-loop-attach", "mount", "spawn", "unmount",
            "rbd-loop-detach", "rbd-fuse-stop"} <= effects, effects
    for i, where in enumerate(create, 1):
        daemon.start(IMAGEAPI_TEST_CRASH_AT=str(i))
        crash_during(daemon, "POST", "/container", kraken_container(ceph_world))
        settle_and_clean(daemon, maps, images, cgroup_root, f"create step {i} ({where})")
    for i, where in enumerate(delete, 1):
        daemon.start()
        daemon.api.post("/container", kraken_container(ceph_world))
        daemon.restart(signal.SIGTERM, IMAGEAPI_TEST_CRASH_AT=str(i))
        crash_during(daemon, "DELETE", "/container/byname/kraken")
        settle_and_clean(daemon, maps, images, cgroup_root, f"delete step {i} ({where})")
    daemon.start()


def test_drain_stops_the_fuse_servers_too(udaemon: tuple[Daemon, FuseMappings],
                                          ceph_world: CephAsCluster, images: Path) -> None:
    daemon, maps = udaemon
    daemon.start()
    daemon.api.post("/container", kraken_container(ceph_world))
    daemon.api.post("/attach/rbd", rbd_spec(ceph_world, image="base"))
    daemon.kill(signal.SIGTERM)
    assert len(maps.mapped()) == 2
    drained = subprocess.run(
        [sys.executable, "-m", "imageapi", "--drain", "--run-dir", str(daemon.run_dir),
         *daemon.args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert drained.returncode == 0, drained.stderr
    check_nothing_left(daemon, maps, images)


def test_a_lost_record_stops_the_fuse_servers_it_cannot_name(
    udaemon: tuple[Daemon, FuseMappings], ceph_world: CephAsCluster, images: Path,
    cgroup_root: Path,
) -> None:
    daemon, maps = udaemon
    daemon.start()
    daemon.api.post("/container", kraken_container(ceph_world))
    daemon.api.post("/attach/rbd", rbd_spec(ceph_world, image="base"))  # mounted by nothing
    daemon.kill(signal.SIGKILL)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{daemon.run_dir / 'state.db'}{suffix}").unlink(missing_ok=True)
    daemon.start()
    assert everything(daemon.api) == {"/attach/rbd": [], "/attach/loopback": [], "/mount": [],
                                      "/container": []}
    assert "FUSE server" in daemon.log()
    assert maps.mapped() == []
    check_consistent(daemon, maps, images, cgroup_root)


def test_a_daemon_restarted_with_the_other_driver_still_handles_user_mappings(
    udaemon: tuple[Daemon, FuseMappings], ceph_world: CephAsCluster, tmp_path: Path,
) -> None:
    daemon, maps = udaemon
    daemon.start()
    rbd = daemon.api.post("/attach/rbd", rbd_spec(ceph_world, image="base"))
    daemon.kill(signal.SIGTERM)
    user_args = list(daemon.args)
    daemon.args[daemon.args.index("user")] = "krbd"
    daemon.args += ["--rbd-sysfs", str(tmp_path / "no-krbd")]
    daemon.start()
    assert "rbd driver: krbd" in daemon.log()
    assert daemon.api.get(f"/attach/rbd/{rbd['id']}") == rbd
    assert maps.mapped() == [str(rbd["device_id"])]
    daemon.api.delete(f"/attach/rbd/{rbd['id']}")
    assert maps.mapped() == []
    daemon.kill(signal.SIGTERM)
    daemon.args[:] = user_args

def test_recovery_has_one_time_budget(daemon: Daemon, cluster: Any, sim: Any, images: Path,
                                      cgroup_root: Path) -> None:
    daemon.start()
    world = build_world(daemon, cluster, images)
    before = check_consistent(daemon, sim, images, cgroup_root)
    daemon.args += ["--recovery-budget", "0.000001"]
    daemon.restart(signal.SIGKILL)
    # Nothing could be checked in time: reported, and kept as recorded, not waited on.
    assert "could not be checked within" in daemon.log()
    assert everything(daemon.api) == before
    daemon.args = daemon.args[:-2]
    daemon.restart(signal.SIGTERM)
    assert check_consistent(daemon, sim, images, cgroup_root) == before
    api = daemon.api
    for name in ("kraken", "later"):
        api.delete(f"/container/byname/{name}")
    for key in ("overlay", "mount"):
        api.delete(f"/mount/{'overlay' if key == 'overlay' else 'rbd'}/{world[key]['id']}")
    api.delete(f"/attach/rbd/{world['rbd']['id']}")
    api.delete(f"/attach/loopback/{world['bare']['id']}")


def test_a_crash_at_every_step_of_a_start(daemon: Daemon, cluster: Any, sim: Any,
                                          images: Path, cgroup_root: Path,
                                          tmp_path: Path) -> None:
    """A committed container asked to run: if the daemon dies between the spawn and the
    commit, the helper's word (it runs) wins over the record's (created)."""
    trace = tmp_path / "start-boundaries"
    daemon.start(IMAGEAPI_TEST_TRACE_INTENTS=str(trace))
    body = {**kraken_container(cluster), "state": "created"}
    daemon.api.post("/container", body)
    mark = len(trace.read_text().splitlines())
    daemon.api.get("/container/byname/kraken/running")
    steps = [line.split()[1] for line in trace.read_text().splitlines()[mark:]]
    assert "spawn:after" in steps, steps
    daemon.api.delete("/container/byname/kraken")
    for i in range(1, len(steps) + 1):
        daemon.restart(signal.SIGTERM)
        daemon.api.post("/container", body)
        daemon.restart(signal.SIGTERM, IMAGEAPI_TEST_CRASH_AT=str(i))
        crash_during(daemon, "GET", "/container/byname/kraken/running")
        daemon.start()
        seen = check_consistent(daemon, sim, images, cgroup_root)
        (c,) = seen["/container"]
        assert c["state"] in ("created", "running"), c
        if steps[i - 1] == "spawn:after":
            assert c["state"] == "running", "the helper runs it: the record must say so"
        assert daemon.api.delete("/container/byname/kraken")["state"] in ("created", "exited")
        check_nothing_left(daemon, sim, images)


def test_a_run_dir_named_through_a_symlink(daemon: Daemon, cluster: Any, tmp_path: Path
                                           ) -> None:
    """/var/run is a symlink to /run: records, mountinfo and the sweeps must agree."""
    real = daemon.run_dir.parent / "real"
    real.mkdir()
    link = daemon.run_dir.parent / "link"
    link.symlink_to(real)
    daemon.run_dir = link / "run"
    daemon.start()
    mnt = daemon.api.post("/mount", {"kind": "rbd", "rbd": {
        "fs_type": "squashfs", "mount_options": ["ro"], "rbd": rbd_spec(cluster)}})
    ovl = daemon.api.post("/mount/overlay", {"lower": [{"kind": "rbd",
                                                        "mount_id": mnt["mount_id"]}]})
    Path(ovl["mountpoint"], "kept").write_text("written before the restart\n")
    assert ovl["mountpoint"].startswith(str(real))
    daemon.restart(signal.SIGKILL)
    again = daemon.api.get(f"/mount/overlay/{ovl['id']}")
    assert again == ovl
    assert Path(ovl["upperdir"], "kept").read_text() == "written before the restart\n"
    assert "gone from the system" not in daemon.log()
    daemon.api.delete(f"/mount/overlay/{ovl['id']}")
    daemon.api.delete(f"/mount/rbd/{mnt['mount_id']}")
    daemon.run_dir = real / "run"  # for the fixture's checks, which compare real paths


def test_0_2_kinds_survive_a_restart(daemon: Daemon, cluster: Any, sim: Any, images: Path,
                                     image_tree: Path, tmp_path: Path) -> None:
    """A `local` device and its mount, a loop device over a file inside a mount, a bind
    inside a mount and a container from 0.2's nested create, across a SIGKILL restart."""
    import shutil

    tree = shutil.copytree(image_tree, tmp_path / "tree", symlinks=True)
    (tree / "images").mkdir()
    shutil.copyfile(images / "local.sqsh", tree / "images/inner.sqsh")
    outer = build_squashfs(tree, images / "outer.sqsh")
    device = subprocess.run(["losetup", "-f", "--show", "-r", str(images / "local.sqsh")],
                            check=True, capture_output=True, text=True).stdout.strip()
    ro = {"fs_type": "squashfs", "mount_options": ["ro"]}
    try:
        daemon.start()
        api = daemon.api
        local = api.post("/attach", {"kind": "local", "local": {"path": device}})
        api.post("/mount", {"kind": "attach", "attach": {**ro, "attach": {"id": local["id"]}}})
        base = api.post("/mount", {"kind": "attach", "attach": {**ro, "attach": {
            "kind": "loopback", "loopback": {"path": str(outer), "base": "root"}}}})
        in_base = {"kind": "attach", "id": base["id"]}
        inner = api.post("/attach", {"kind": "loopback", "loopback": {
            "path": "images/inner.sqsh", "base": "mount", "mount": in_base}})
        api.post("/mount", {"kind": "bind", "bind": {"path": "etc", "base": "mount",
                                                     "mount": in_base}})
        api.post("/container", {"name": "k02", "command": WAITER, "state": "running",
                                "mount": {"kind": "overlay", "overlay": {"lower": [
                                    {"kind": "attach", "attach": {**ro, "attach": {
                                        "id": inner["id"]}}}]}}})
        views = ("/attach", "/mount", "/container")
        before = {path: api.get(path) for path in views}
        daemon.restart(signal.SIGKILL)
        api = daemon.api
        assert {path: api.get(path) for path in views} == before
        assert "0 dropped" in daemon.log()
        api.delete("/container", params={"name": "k02"})
        # Newest first: a user is newer than what it stands on (the inner file's loop device
        # stands on the outer image's mount); what an object owns goes with it.
        while objects := [(m["id"], "/mount") for m in api.get("/mount")] + [
                (a["id"], "/attach") for a in api.get("/attach")]:
            ident, path = max(objects)
            api.delete(path, params={"id": ident})
        assert hostview.loop_devices()[Path(device).name] == str(images / "local.sqsh")
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
        outer.unlink()
