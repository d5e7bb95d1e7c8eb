"""The HTTP layer: GET /container throughput against two floors, and reads during slow deletes.

    sudo .venv/bin/python bench/api.py [--rounds N] [--seconds S] [--deletes K]

Needs root (containers), busybox-static, squashfs-tools and wrk (`apt-get install -y wrk`).

1. Throughput. `wrk -c16 -t2` on `GET /imageapi/v1/container` (an empty list) of four servers,
   each a subprocess served by the same uvicorn setup as the daemon (`imageapi.cli`'s listeners,
   connection guard and logging):
   - imageapi: the real daemon (`python -m imageapi`, `--no-state`);
   - connexion-sync: a minimal connexion 3 AsyncApp, one operation returning [] from a plain
     function (connexion runs it in its thread pool);
   - connexion-async: the same with a coroutine;
   - starlette: a bare Starlette route returning [].
   Rounds are interleaved (imageapi, connexion-sync, connexion-async, starlette, again ...), so
   drifts of the machine hit all alike; printed are the medians and imageapi's ratio to each.
2. Reads during slow deletes. The daemon (`--stop-timeout 3`) runs K containers that ignore
   SIGTERM, on one overlay of a busybox image; K DELETEs are sent at once (more than the
   thread pool's 40), so each waits out the stop timeout. Meanwhile GETs are timed; printed
   are their latencies against the same GETs on the idle daemon, and how many deletes had
   ended when the last GET answered (0: no read waited behind them).

Everything made (servers, containers, mounts, loop devices, the temporary directory) is
removed at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from common import free_port, log

REPO = Path(__file__).resolve().parent.parent
BASE = "/imageapi/v1"
APPS = ("imageapi", "connexion-sync", "connexion-async", "starlette")
DEAF = "/bin/sh -c \"trap '' TERM; while :; do sleep 1; done\""
MINIMAL_SPEC = """
swagger: "2.0"
info: {title: minimal, version: "1"}
basePath: /imageapi/v1
paths:
  /container:
    get:
      operationId: list_containers
      responses:
        "200":
          description: the containers
          schema: {type: array, items: {type: object}}
"""




# -- the floors, served as the daemon serves ------------------------------------------------


def _minimal_app(kind: str, work: Path) -> Any:
    if kind == "starlette":
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def containers(_request: Any) -> JSONResponse:
            return JSONResponse([])

        return Starlette(routes=[Route(BASE + "/container", containers)])
    import connexion
    from connexion.resolver import Resolver

    def list_sync() -> tuple[list[Any], int]:
        return [], 200

    async def list_async() -> tuple[list[Any], int]:
        return [], 200

    handler = list_sync if kind == "connexion-sync" else list_async
    (work / "minimal.yaml").write_text(MINIMAL_SPEC)
    app = connexion.AsyncApp(__name__, specification_dir=str(work))
    app.add_api("minimal.yaml", resolver=Resolver(function_resolver=lambda _op: handler))
    return app


def serve_floor(kind: str, port: int, work: Path) -> None:
    """Serve one floor app through imageapi.cli's listeners (in this process, until SIGTERM)."""
    sys.path.insert(0, str(REPO))
    from imageapi import cli

    cli.configure_logging()
    args = cli.parse_args(["--scheme", "http", "--host", "127.0.0.1", "--port", str(port)])
    listeners = cli.open_listeners(args)
    servers = cli.make_servers(_minimal_app(kind, work), listeners)
    try:
        asyncio.run(cli.serve_all(servers, listeners))
    finally:
        cli.close_all(listeners)


class Served:
    def __init__(self, name: str, cmd: list[str], port: int, work: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = work / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + BASE + "/container", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, work: Path, *daemon_args: str) -> Served:
    port = free_port()
    if name == "imageapi":
        run_dir = work / f"run-{port}"
        cmd = [sys.executable, "-m", "imageapi", "--scheme", "http", "--host", "127.0.0.1",
               "--port", str(port), "--run-dir", str(run_dir), "--no-state",
               "--cgroup-root", str(work / "no-cgroups"), *daemon_args]
        return Served(name, cmd, port, work)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", name, "--port", str(port),
           "--work", str(work)]
    return Served(name, cmd, port, work)


# -- 1. throughput ---------------------------------------------------------------------------


def wrk(url: str, seconds: int) -> float:
    done = subprocess.run(["wrk", "-c16", "-t2", f"-d{seconds}s", url], capture_output=True,
                          text=True, check=True)
    found = re.search(r"Requests/sec:\s+([0-9.]+)", done.stdout)
    if not found or "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise RuntimeError(f"wrk: {done.stdout}")
    return float(found.group(1))


def throughput(work: Path, rounds: int, seconds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in APPS}
    servers = {}
    try:
        for name in APPS:
            servers[name] = start(name, work)
        for name in APPS:  # warm up
            wrk(servers[name].url + BASE + "/container", 1)
        for r in range(rounds):
            for name in APPS:
                rate = wrk(servers[name].url + BASE + "/container", seconds)
                results[name].append(rate)
                log(f"round {r + 1}/{rounds}: {name:16} {rate:8.0f} req/s")
    finally:
        for server in servers.values():
            server.stop()
    return results


# -- 2. reads during slow deletes -----------------------------------------------------------


def build_image(work: Path) -> Path:
    tree = work / "tree"
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "run", "var"):
        (tree / d).mkdir(parents=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("needs busybox (apt-get install busybox-static)")
    shutil.copy2(busybox, tree / "bin/busybox")
    for applet in ("sh", "sleep", "true"):
        (tree / "bin" / applet).symlink_to("busybox")
    image = work / "busybox.sqsh"
    subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-quiet", "-all-root"],
                   check=True, stdout=subprocess.DEVNULL)
    return image


def timed_get(client: httpx.Client) -> float:
    began = time.perf_counter()
    assert client.get("/container").status_code == 200
    return time.perf_counter() - began


def reads_during_deletes(work: Path, deletes: int) -> dict[str, Any]:
    image = build_image(work)
    server = start("imageapi", work, "--stop-timeout", "3")
    client = httpx.Client(base_url=server.url + BASE, timeout=120)
    try:
        mount = {"kind": "attach", "attach": {"fs_type": "squashfs", "mount_options": ["ro"],
                 "attach": {"kind": "loopback", "loopback": {"path": str(image),
                                                             "base": "root"}}}}
        made = client.post("/mount", json={"kind": "overlay", "overlay": {"lower": [mount]}})
        assert made.status_code == 201, made.text
        overlay = made.json()["id"]
        ids = []
        for _ in range(deletes):
            c = client.post("/container", json={"command": DEAF, "state": "running",
                                                "mount": {"kind": "overlay", "id": overlay}})
            assert c.status_code == 201, c.text
            ids.append(c.json()["id"])
        time.sleep(0.5)  # every shell has its SIGTERM handler by now
        idle = [timed_get(client) for _ in range(50)]
        ended = threading.Event()
        finished: list[int] = []

        def delete(cid: int) -> None:
            with httpx.Client(base_url=server.url + BASE, timeout=120) as own:
                assert own.delete("/container", params={"id": cid}).status_code == 200
            finished.append(cid)
            if len(finished) == deletes:
                ended.set()

        with concurrent.futures.ThreadPoolExecutor(deletes) as pool:
            started = time.perf_counter()
            futures = [pool.submit(delete, cid) for cid in ids]
            while len(client.get("/container", params={"state": "stopping"}).json()) < deletes:
                time.sleep(0.01)
            busy = [timed_get(client) for _ in range(50)]
            ended_before = len(finished)
            for future in futures:
                future.result()
            took = time.perf_counter() - started
        client.delete("/mount", params={"id": overlay})
        return {"idle": idle, "busy": busy, "ended_before": ended_before, "deletes": deletes,
                "took": took}
    finally:
        client.close()
        server.stop()


# -- the report -------------------------------------------------------------------------------


def report(rates: dict[str, list[float]], reads: dict[str, Any] | None) -> None:
    med = {name: statistics.median(values) for name, values in rates.items()}
    print("GET /imageapi/v1/container (empty), wrk -c16 -t2, median req/s:")
    for name in APPS:
        print(f"  {name:16} {med[name]:8.0f}   (rounds: "
              f"{', '.join(f'{v:.0f}' for v in rates[name])})")
    for floor in APPS[1:]:
        print(f"  imageapi / {floor:16} {med['imageapi'] / med[floor]:.2f}x")
    if reads is None:
        return
    idle_ms = statistics.median(reads["idle"]) * 1e3
    busy_ms = statistics.median(reads["busy"]) * 1e3
    print(f"GET /container while {reads['deletes']} DELETEs wait out a 3 s stop timeout:")
    print(f"  idle daemon:   median {idle_ms:.2f} ms, max {max(reads['idle']) * 1e3:.2f} ms")
    print(f"  during deletes: median {busy_ms:.2f} ms, max {max(reads['busy']) * 1e3:.2f} ms "
          f"({busy_ms / idle_ms:.2f}x idle)")
    print(f"  deletes ended when the last GET answered: {reads['ended_before']}/"
          f"{reads['deletes']} (all {reads['deletes']} ended after {reads['took']:.1f} s)")


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="imageapi-bench-api-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=5, help="per wrk run")
    p.add_argument("--deletes", type=int, default=50)
    p.add_argument("--skip-deletes", action="store_true", help="throughput only (no root)")
    p.add_argument("--serve", choices=APPS[1:], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve_floor(args.serve, args.port, args.work)
        return 0
    if shutil.which("wrk") is None:
        log("needs wrk (apt-get install -y wrk)")
        return 2
    with workdir() as work:
        rates = throughput(work, args.rounds, args.seconds)
        reads = None if args.skip_deletes else reads_during_deletes(work, args.deletes)
    report(rates, reads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
