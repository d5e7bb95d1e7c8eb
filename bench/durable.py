"""What the durable record costs: restart-to-READY with a full graph, and create/delete
throughput with the record against the same without it.

    sudo .venv/bin/python bench/durable.py [--runs N] [--ops K]

1. Restart to READY. A server holds 100 objects — one loopback attachment of a busybox
   squashfs and its mount, 20 overlays on that mount with a running container on each, and
   57 more read-only attachments of the same file — and is restarted with SIGTERM, N times;
   measured is the time from spawning the new server to its first answer (what READY=1
   announces: it comes after recovery, and the listeners accept only after it). The
   baseline, measured the same way in the same run, is a restart of a server holding nothing.
2. Throughput. K rounds of `POST /attach/loopback` + `DELETE` (each a kernel attach and
   detach, each recorded) against a server with the record and one with `--no-state`,
   interleaved in blocks so drifts of the machine hit both alike.

Printed: medians, and the ratios against their baselines. Everything made — mounts, loop
devices, containers, the servers, the temporary directory — is removed at the end.
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
BASE = "/imageapi/v1"
CONTAINERS = 20
OBJECTS = 100
WAITER = "/bin/sh -c \"trap 'exit 0' TERM; while :; do sleep 1; done\""




def build_image(work: Path) -> Path:
    tree = work / "tree"
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "run", "var"):
        (tree / d).mkdir(parents=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("needs busybox (Debian's busybox-static)")
    shutil.copy2(busybox, tree / "bin/busybox")
    (tree / "bin/sh").symlink_to("busybox")
    (tree / "bin/sleep").symlink_to("busybox")
    image = work / "busybox.sqsh"
    subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-noappend", "-all-root"],
                   check=True, stdout=subprocess.DEVNULL)
    return image


class Server:
    def __init__(self, run_dir: Path, *extra: str) -> None:
        self.run_dir = run_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> float:
        """Spawn it; return the seconds until it answered."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}{BASE}"
        out = open(self.run_dir.parent / f"{self.run_dir.name}.log", "ab")  # noqa: SIM115
        began = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imageapi", "--scheme", "http", "--host", "127.0.0.1",
             "--port", str(port), "--run-dir", str(self.run_dir), "--stop-timeout", "2",
             *self.extra], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/container", timeout=2).status_code == 200:
                    return time.perf_counter() - began
            time.sleep(0.002)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def purge(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            for _ in range(5):
                for ct in c.get("/container").json():
                    c.delete(f"/container/{ct['id']}")
                for m in sorted(c.get("/mount").json(), key=lambda m: -m["mount_id"]):
                    c.delete(f"/mount/{m['kind']}/{m['mount_id']}")
                for a in c.get("/attach/loopback").json():
                    c.delete(f"/attach/loopback/{a['id']}")


def fill(server: Server, image: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = c.post(path, json=body)
            if r.status_code != 201:
                raise SystemExit(f"POST {path}: {r.status_code} {r.text}")
            return r.json()

        lb = post("/attach/loopback", {"path": str(image)})
        mnt = post("/mount/loopback", {"loopback_id": lb["id"], "fs_type": "squashfs",
                                       "mount_options": ["ro"]})
        made = 2
        for _ in range(CONTAINERS):
            ovl = post("/mount/overlay", {"lower": [{"kind": "loopback", "mount_id": mnt["id"]}]})
            post("/container", {"mount": {"kind": "overlay", "mount_id": ovl["id"]},
                                "command": WAITER, "state": "running"})
            made += 2
        while made < OBJECTS:
            post("/attach/loopback", {"path": str(image)})
            made += 1


def restart_times(server: Server, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        server.stop()
        times.append(server.start())
    return times


def churn(server: Server, image: Path, ops: int) -> float:
    """Seconds for `ops` attach + detach rounds."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        began = time.perf_counter()
        for _ in range(ops):
            r = c.post("/attach/loopback", json={"path": str(image)})
            if r.status_code != 201:
                raise SystemExit(f"POST: {r.status_code} {r.text}")
            c.delete(f"/attach/loopback/{r.json()['id']}")
        return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="restarts per server (default 7)")
    p.add_argument("--ops", type=int, default=200, help="attach+detach rounds (default 200)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    # On tmpfs, like /var/run, the run directory of a node.
    work = Path(tempfile.mkdtemp(prefix="imageapi-bench-durable.", dir="/dev/shm"))
    servers: list[Server] = []
    try:
        image = build_image(work)
        full = Server(work / "full")
        empty = Server(work / "empty")
        durable = Server(work / "durable")
        volatile = Server(work / "volatile", "--no-state")
        servers = [full, empty, durable, volatile]
        for s in servers:
            s.start()
        log(f"filling a server with {OBJECTS} objects, {CONTAINERS} containers running ...")
        fill(full, image)
        log(f"restarting each server {args.runs} times ...")
        full_t, empty_t = [], []
        for _ in range(args.runs):
            full_t += restart_times(full, 1)
            empty_t += restart_times(empty, 1)
        with httpx.Client(base_url=full.url) as c:
            running = [ct for ct in c.get("/container").json() if ct["state"] == "running"]
        if len(running) != CONTAINERS:
            raise SystemExit(f"after the restarts {len(running)} containers run, not {CONTAINERS}")
        log(f"{args.ops} attach+detach rounds on each of two servers, interleaved ...")
        block = max(1, args.ops // 10)
        dur_t = vol_t = 0.0
        for _ in range(0, args.ops, block):
            dur_t += churn(durable, image, block)
            vol_t += churn(volatile, image, block)
        done = (args.ops // block) * block if args.ops % block == 0 else \
            ((args.ops + block - 1) // block) * block
        full_m, empty_m = statistics.median(full_t), statistics.median(empty_t)
        print(f"restart to READY, {OBJECTS} objects, {CONTAINERS} running: "
              f"median {full_m * 1000:.1f} ms (min {min(full_t) * 1000:.1f}, "
              f"max {max(full_t) * 1000:.1f})")
        print(f"restart to READY, empty graph (baseline):          "
              f"median {empty_m * 1000:.1f} ms")
        print(f"  ratio full/empty: {full_m / empty_m:.2f}")
        print(f"create+delete with the durable record:    {done / dur_t:.1f} rounds/s")
        print(f"create+delete without it (--no-state):    {done / vol_t:.1f} rounds/s")
        print(f"  ratio durable/volatile throughput: {vol_t / dur_t:.2f}")
        return 0
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                if s.proc is not None and s.proc.poll() is None:
                    s.purge()
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
