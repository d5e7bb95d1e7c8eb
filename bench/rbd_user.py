"""The user-space rbd driver against librbd itself, on a live cluster, in one run.

    sudo .venv/bin/python bench/rbd_user.py [--runs N] [--boot-runs N] [--size-mib M]

Two measurements, their rounds interleaved so that drifts of the (shared) machine hit both
sides alike:

- Sequential read throughput: `rbd export --no-progress IMAGE -` to /dev/null (librbd's own
  reader: 4 MiB objects, ten in flight) against reading the whole attached device — attached
  read-only through `POST /attach/rbd` with `--rbd-driver user` — from start to end in 4 MiB
  read() calls. Each round attaches afresh, so no page cache of a previous round helps. The
  aim: at least half of librbd's own throughput.
- Boot: `POST /container` (Kraken's one nested request: overlay over squashfs over the image,
  `systemd: true`, `state: running`) until `systemctl is-system-running` says `running`, for
  the Debian systemd image of the tests (tests/images.py) from Ceph and from a local file
  (`loopback`).

It starts its own cluster (tests/cephcluster.py), server and cgroup, and removes all of it at
the end, also on an error or Ctrl-C. Needs root and what scripts/test.sh installs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import free_port, log

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import cephcluster  # noqa: E402
from tests.images import systemd_image  # noqa: E402

API = "/imageapi/v1"
CHUNK = 4 << 20
BOOT_TIMEOUT = 120.0
AIM = 0.5




def cgroup2() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            return Path(left.split()[4])
    raise SystemExit("needs a cgroup2 hierarchy")


class Server:
    def __init__(self, work: Path, cgroup_root: Path) -> None:
        self.port = free_port()
        self.log = open(work / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imageapi", "--scheme", "http", "--host", "127.0.0.1",
             "--port", str(self.port), "--run-dir", str(work / "run"), "--rbd-driver", "user",
             "--cgroup-root", str(cgroup_root), "--stop-timeout", "30"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}{API}", timeout=180)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/swagger.json").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: see {work / 'server.log'}")
            time.sleep(0.05)

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        r = self.http.request(method, path, json=body)
        if r.status_code != expect:
            raise SystemExit(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def purge(self) -> None:
        for c in self.call("GET", "/container"):
            self.http.delete(f"/container/{c['id']}")
        for m in sorted(self.call("GET", "/mount"), key=lambda m: -m["mount_id"]):
            self.http.delete(f"/mount/{m['kind']}/{m['mount_id']}")
        for kind in ("rbd", "loopback"):
            for a in self.call("GET", f"/attach/{kind}"):
                self.http.delete(f"/attach/{kind}/{a['id']}")

    def stop(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.purge()
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


def rbd_spec(cluster: cephcluster.CephCluster, image: str) -> dict[str, Any]:
    return {"monitors": cluster.monitors, "pool": "rbd", "image": image,
            "options": {"ro": True, "name": "admin", "secret": cluster.admin_key}}


def export_seconds(cluster: cephcluster.CephCluster, image: str) -> float:
    began = time.monotonic()
    done = subprocess.run(["rbd", "export", "--no-progress", f"rbd/{image}", "-"],
                          env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    took = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"rbd export: {done.stderr.decode()}")
    return took


def fuse_server_memory(server: Server, field: str = "VmHWM") -> int:
    """Resident memory (VmHWM: the peak; VmRSS: now), kB, of the server's one FUSE server."""
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Name", "").strip() == "imageapi-rbd" and \
                fields.get("PPid", "").strip() == str(server.proc.pid):
            return int(fields[field].split()[0])
    return 0


def device_seconds(server: Server, cluster: cephcluster.CephCluster, image: str,
                   size: int, memory: list[int], idle: list[int] | None = None
                   ) -> tuple[float, float]:
    """(attach seconds, read seconds) of one fresh read-only attachment."""
    began = time.monotonic()
    rbd = server.call("POST", "/attach/rbd", rbd_spec(cluster, image), expect=201)
    attached = time.monotonic()
    buf = bytearray(CHUNK)
    total = 0
    with open(rbd["device_file"], "rb", buffering=0) as dev:
        while n := dev.readinto(buf):
            total += n
    done = time.monotonic()
    memory.append(fuse_server_memory(server))
    if idle is not None:
        time.sleep(3)
        idle.append(fuse_server_memory(server, "VmRSS"))
    server.call("DELETE", f"/attach/rbd/{rbd['id']}")
    if total != size:
        raise SystemExit(f"read {total} bytes of {rbd['device_file']}, not {size}")
    return attached - began, done - attached


def boot_seconds(server: Server, lower: dict[str, Any]) -> float:
    began = time.monotonic()
    c = server.call("POST", "/container", {
        "name": "bench-node", "systemd": True, "command": "/usr/lib/systemd/systemd",
        "state": "running", "mount": {"kind": "overlay", "overlay": {"lower": [lower]}},
    }, expect=201)
    try:
        while True:
            state = subprocess.run(["nsenter", "-t", str(c["pid"]), "-a", "systemctl",
                                    "is-system-running"], capture_output=True, text=True,
                                   timeout=30).stdout.strip()
            if state == "running":
                took = time.monotonic() - began
                break
            if state == "degraded" or time.monotonic() - began > BOOT_TIMEOUT:
                raise SystemExit(f"systemd says {state!r}")
            time.sleep(0.05)
    finally:
        server.call("GET", f"/container/{c['id']}/exited")
        while server.call("GET", f"/container/{c['id']}")["state"] == "stopping":
            time.sleep(0.2)
        server.call("DELETE", f"/container/{c['id']}")
    return took


def bench(args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> None:
    log("starting a cluster")
    cluster = cephcluster.start(work / "ceph")
    stack.callback(cephcluster.stop, work / "ceph")
    size = args.size_mib << 20
    data = work / "seq.img"
    with open(data, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    cluster.run("rbd", "import", "--no-progress", str(data), "rbd/seq", timeout=600)
    data.unlink()
    systemd = systemd_image()
    cluster.run("rbd", "import", "--no-progress", str(systemd), "rbd/debian-systemd",
                timeout=600)
    cgroup_root = cgroup2() / f"imageapi-bench-rbd.{os.getpid()}"
    stack.callback(lambda: cgroup_root.exists() and cgroup_root.rmdir())
    server = Server(work, cgroup_root)
    stack.callback(server.stop)

    log(f"sequential reads of a {args.size_mib} MiB image, {args.runs} rounds")
    export_seconds(cluster, "seq")  # warm-up: the OSD's own caches, alike for both
    memory: list[int] = []
    idle: list[int] = []
    device_seconds(server, cluster, "seq", size, memory, idle)
    exports, reads, attaches = [], [], []
    for i in range(args.runs):
        exports.append(export_seconds(cluster, "seq"))
        attach, read = device_seconds(server, cluster, "seq", size, memory)
        attaches.append(attach)
        reads.append(read)
        log(f"  round {i + 1}: rbd export {size / exports[-1] / 1e6:7.0f} MB/s, "
            f"device {size / read / 1e6:7.0f} MB/s (ratio {exports[-1] / read:.2f}), "
            f"attach {attach * 1000:.0f} ms")
    ratios = [e / r for e, r in zip(exports, reads, strict=True)]

    log(f"systemd boots, {args.boot_runs} rounds each")
    ceph_lower = {"kind": "rbd", "rbd": {"fs_type": "squashfs", "mount_options": ["ro"],
                                         "rbd": rbd_spec(cluster, "debian-systemd")}}
    local_lower = {"kind": "loopback", "loopback": {"fs_type": "squashfs",
                                                    "mount_options": ["ro"],
                                                    "loopback": {"path": str(systemd)}}}
    boots: dict[str, list[float]] = {"ceph": [], "local": []}
    for i in range(args.boot_runs):
        for name, lower in (("ceph", ceph_lower), ("local", local_lower)):
            boots[name].append(boot_seconds(server, lower))
        log(f"  round {i + 1}: ceph {boots['ceph'][-1]:.2f} s, local {boots['local'][-1]:.2f} s")

    med = statistics.median
    print(f"sequential read, {args.size_mib} MiB, {args.runs} rounds (medians):")
    print(f"  rbd export (librbd)     {size / med(exports) / 1e6:8.0f} MB/s")
    print(f"  attached device (user) {size / med(reads) / 1e6:8.0f} MB/s")
    print(f"  ratio device/librbd     {med(ratios):8.2f}  (min {min(ratios):.2f}, max "
          f"{max(ratios):.2f}; aim >= {AIM}: {'met' if med(ratios) >= AIM else 'NOT met'})")
    print(f"  attach (POST /attach/rbd) {med(attaches) * 1000:6.0f} ms")
    print(f"  FUSE server memory      {med(memory) / 1024:8.0f} MiB at its peak, "
          f"{idle[0] / 1024:.0f} MiB 3 s after")
    print(f"systemd boot to running, {args.boot_runs} rounds (medians):")
    print(f"  from Ceph (user driver) {med(boots['ceph']):8.2f} s")
    print(f"  from a local file       {med(boots['local']):8.2f} s")
    print(f"  ratio ceph/local        {med(boots['ceph']) / med(boots['local']):8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="read rounds (7)")
    parser.add_argument("--boot-runs", type=int, default=3, help="boot rounds per source (3)")
    parser.add_argument("--size-mib", type=int, default=256, help="image size (256 MiB)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    work = Path(tempfile.mkdtemp(prefix="imageapi-bench-rbd-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        bench(args, work, stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
