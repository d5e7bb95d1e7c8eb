"""Container start-up latency: imageapi beside a bare floor and systemd-nspawn, on one image.

    sudo .venv/bin/python bench/startup.py [--runs N] [--warmup W] [--only floor,nspawn,imageapi]

What is measured, per run: the time from just before the launch (spawning the command, or sending
`POST /container`) to the moment the container's entrypoint has run — it writes a line into a FIFO
at the root of the container's filesystem (`/ready`), which the benchmark reads on the host.
Process exit and clean-up are done after the clock stops and are not counted.

The methods, all on the same busybox squashfs image with a private overlay over it:

- floor:    `unshare --fork --pid --mount --uts --ipc chroot ROOT ENTRYPOINT...` — the namespaces
            and nothing else; no container runtime can be faster than this.
- nspawn:   `systemd-nspawn --register=no --keep-unit -q -D ROOT ENTRYPOINT...` — the peer.
- imageapi: `POST /imageapi/v1/container {"mount": <the overlay>, "command": ..., "state":
            "running"}` to a real imageapi-server, over a keep-alive HTTP connection.

The baselines' ROOT is the image mounted with `mount -o loop,ro` plus an overlay (tmpfs upper).
imageapi can only mount images from RBD in this release, so its overlay stands on an rbd mount
served by the krbd simulator (tests/krbdsim; it backs the rbd device with a loop device too).

The benchmark moves itself (and so everything it starts) into a cgroup of its own,
`imageapi-bench.PID/bench`, in cgroup2 and, on a hybrid host, in systemd's name=systemd v1
hierarchy too: systemd-nspawn --keep-unit leaves `payload` and `supervisor` cgroups below its own,
which then go with ours. imageapi-server gets `--cgroup-root imageapi-bench.PID/imageapi`.

Runs are interleaved (floor nspawn imageapi, floor nspawn imageapi, ...) after a few warm-up
rounds, so slow drifts of the machine hit every method alike. Everything the benchmark makes —
mounts, loop devices, cgroups, temporary directories, the server, the simulator — is removed at
the end, also on an error, Ctrl-C or SIGTERM. Needs root, busybox-static, squashfs-tools and
systemd-container (`systemd-nspawn`). Uses only the standard library and httpx (and the krbd
simulator from tests/).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import free_port, log

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.krbdsim.harness import add_image, make_cluster, running_simulator  # noqa: E402

ENTRYPOINT = "/bin/busybox sh -c 'echo up > /ready'"
METHODS = ("floor", "nspawn", "imageapi")
READY = b"up\n"
LAUNCH_TIMEOUT = 30.0  # seconds from launch to the entrypoint's line, before a run fails
EXIT_TIMEOUT = 30.0


class BenchError(RuntimeError):
    pass



def run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


# -- host set-up, each piece undone by the ExitStack --------------------------------------------


def build_image(work: Path) -> Path:
    """A busybox system image (the layout of tests/conftest.py's image_tree) as squashfs."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise BenchError("no /bin/busybox: apt-get install busybox-static")
    tree = work / "tree"
    for d in ("bin", "etc", "dev", "proc", "sys", "tmp", "run", "var", "usr/bin", "sbin"):
        (tree / d).mkdir(parents=True)
    (tree / "etc/os-release").write_text('NAME="imageapi bench image"\nID=imageapi-bench\n')
    (tree / "etc/hostname").write_text("benchimage\n")
    shutil.copy2(busybox, tree / "bin/busybox")
    (tree / "bin/sh").symlink_to("busybox")
    image = work / "busybox.sqsh"
    run("mksquashfs", str(tree), str(image), "-noappend", "-quiet", "-all-root")
    return image


def mount(stack: contextlib.ExitStack, where: Path, *args: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", *args, str(where))
    stack.callback(unmount, where)
    return where


def unmount(where: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)  # EBUSY just after a container in it exited
    log(f"warning: {where} busy; detaching it lazily")
    subprocess.run(["umount", "--lazy", str(where)], check=False)


def overlay_root(stack: contextlib.ExitStack, image: Path, work: Path) -> Path:
    """The baselines' ROOT: the image (loop, read-only) under an overlay with a tmpfs upper.
    mount(8) sets up the loop device with autoclear, so unmounting frees it."""
    lower = mount(stack, work / "lower", "-t", "squashfs", "-o", "loop,ro", str(image))
    rw = mount(stack, work / "rw", "-t", "tmpfs", "-o", "mode=0755", "tmpfs")
    (rw / "upper").mkdir()
    (rw / "work").mkdir()
    opts = f"lowerdir={lower},upperdir={rw / 'upper'},workdir={rw / 'work'}"
    return mount(stack, work / "root", "-t", "overlay", "-o", opts, "overlay")


def cgroup_hierarchies() -> dict[str, tuple[Path, str]]:
    """The hierarchies container managers make cgroups in, as {key: (mountpoint, our cgroup)}:
    "" for cgroup2 and "name=systemd" for systemd's v1 hierarchy on a hybrid host."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, options = right.split()[:3]
            point = Path(left.split()[4])
            if fstype == "cgroup2":
                mounts.setdefault("", point)
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                mounts.setdefault("name=systemd", point)
    found = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            key = "" if hid == "0" else controllers
            if key in mounts:
                found[key] = (mounts[key], path)
    if "" not in found:
        raise BenchError("no cgroup2 hierarchy mounted on this host")
    return found


def remove_cgroup(path: Path) -> None:
    """Remove a cgroup tree, killing whatever still runs in it (only what we started)."""
    if not path.exists():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove_cgroup(child)
    with contextlib.suppress(OSError):
        if (path / "cgroup.procs").read_text().strip():
            if (path / "cgroup.kill").exists():
                (path / "cgroup.kill").write_text("1")
            else:
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    for _ in range(100):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.05)
    log(f"warning: could not remove cgroup {path}")


def enter_cgroups(stack: contextlib.ExitStack) -> Path:
    """Move this process (and so every child: the baselines, the server, the simulator) into
    `imageapi-bench.PID/bench` below its own cgroup, in cgroup2 and, on a hybrid host, in the
    name=systemd hierarchy: systemd-nspawn --keep-unit makes `payload` and `supervisor` cgroups
    below its own and does not remove them, so they land in ours and go with it. Returns the
    (not yet made) cgroup root for imageapi-server, `imageapi-bench.PID/imageapi`."""
    pid = str(os.getpid())
    tops = {}
    for key, (mount, own) in cgroup_hierarchies().items():
        home = mount / own.lstrip("/")
        top = tops[key] = home / f"imageapi-bench.{pid}"
        top.mkdir()
        stack.callback(remove_cgroup, top)
        (top / "bench").mkdir()
        (top / "bench/cgroup.procs").write_text(pid)
        stack.callback((home / "cgroup.procs").write_text, pid)  # back home before removal
    return tops[""] / "imageapi"



def server_flags() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "imageapi", "--help"], cwd=REPO, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return done.stdout


def start_server(
    stack: contextlib.ExitStack, work: Path, sim: Any, cgroup_root: Path
) -> str:
    """An imageapi-server in its own session (a ^C at the terminal reaches only us, and we stop
    it after its objects are deleted), logging at WARNING so logging does not slow it."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    port = free_port()
    cmd = [
        sys.executable, "-m", "imageapi", "--scheme", "http", "--host", "127.0.0.1",
        "--port", str(port), "--run-dir", str(run_dir), "--rbd-sysfs", str(sim.sysfs),
        "--dev-dir", str(sim.devdir), "--device-timeout", "5",
    ]  # fmt: skip
    if "--cgroup-root" in server_flags():
        cmd += ["--cgroup-root", str(cgroup_root)]
    else:
        log(f"note: this imageapi-server has no --cgroup-root; {cgroup_root} is not used")
    server_log = work / "server.log"
    with open(server_log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "IMAGEAPI_LOGLEVEL": "WARNING"}, start_new_session=True,
        )  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                log("warning: imageapi-server ignored SIGTERM; killed")
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            log(f"warning: imageapi-server exited with {proc.returncode}; its log:\n"
                + server_log.read_text(errors="replace")[-3000:])

    stack.callback(stop)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"imageapi-server exited with {proc.returncode}:\n"
                             + server_log.read_text(errors="replace")[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return f"http://127.0.0.1:{port}/imageapi/v1"
        except OSError:
            time.sleep(0.05)
    raise BenchError("imageapi-server did not listen within 30 s")


# -- the methods -------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    root: Path
    launch: Callable[[], Any]  # starts the container; returns a handle
    finish: Callable[[Any], None]  # waits for it to end and cleans up; raises if it failed
    times: list[float] = field(default_factory=list)


def command_method(name: str, root: Path, argv: list[str]) -> Method:
    def launch() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def finish(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None:  # the launch itself failed
            return
        try:
            _, err = proc.communicate(timeout=EXIT_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise BenchError(f"{name}: {shlex.join(argv)} exited with {proc.returncode}: "
                             + err.decode(errors="replace").strip())

    return Method(name, root, launch, finish)


def imageapi_method(
    stack: contextlib.ExitStack, http: httpx.Client, cluster: Any, image_name: str
) -> Method:
    spec = {
        "kind": "overlay",
        "overlay": {"lower": [{"kind": "rbd", "rbd": {
            "fs_type": "squashfs", "mount_options": ["ro"],
            "rbd": {"monitors": list(cluster.monitors), "pool": "rbd", "image": image_name,
                    "options": {"ro": True, "name": cluster.key_name,
                                "secret": cluster.secret}},
        }}]},
    }  # fmt: skip
    answer = http.post("/mount", json=spec)
    if answer.status_code != 201:
        raise BenchError(f"POST /mount: {answer.status_code} {answer.text}")
    mount_id = answer.json()["mount_id"]
    root = Path(answer.json()["overlay"]["mountpoint"])

    def unmount_stack() -> None:
        # A run interrupted between sending POST /container and reading the answer leaves a
        # container we hold no id of: delete every container first (the server is ours).
        for container in http.get("/container").json():
            http.delete(f"/container/{container['id']}")
        done = http.request("DELETE", "/mount", json={"kind": "overlay", "mount_id": mount_id})
        if done.status_code != 200:
            log(f"warning: DELETE /mount overlay {mount_id}: {done.status_code} {done.text}")

    stack.callback(unmount_stack)
    body = {"mount": {"kind": "overlay", "mount_id": mount_id}, "command": ENTRYPOINT,
            "state": "running"}  # fmt: skip

    def launch() -> int:
        answer = http.post("/container", json=body)
        if answer.status_code != 201:
            raise BenchError(f"POST /container: {answer.status_code} {answer.text}\n(if this "
                             "build has no container runtime yet, run with --only floor,nspawn)")
        return answer.json()["id"]

    def finish(cid: int | None) -> None:
        if cid is None:
            return
        try:
            deadline = time.monotonic() + EXIT_TIMEOUT
            while True:
                state = http.get(f"/container/{cid}").json().get("state")
                if state in ("exited", "dead"):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"container {cid} still {state!r} after {EXIT_TIMEOUT} s")
                time.sleep(0.005)
            if state == "dead":
                raise BenchError(f"container {cid} died (its entrypoint failed); see its log")
        finally:
            done = http.delete(f"/container/{cid}")
            if done.status_code != 200:
                log(f"warning: DELETE /container/{cid}: {done.status_code} {done.text}")

    return Method("imageapi", root, launch, finish)


# -- one measured run --------------------------------------------------------------------------


def measure(method: Method) -> float:
    """Seconds from launch to the entrypoint's line in ROOT/ready."""
    fifo = method.root / "ready"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o622)
    got: dict[str, Any] = {}
    opening = threading.Event()

    def reader() -> None:
        try:
            opening.set()
            fd = os.open(fifo, os.O_RDONLY)  # blocks until the entrypoint opens it
            try:
                data = os.read(fd, 64)
                got["t1"] = time.perf_counter()
                got["data"] = data
            finally:
                os.close(fd)
        except OSError as e:
            got["error"] = e

    thread = threading.Thread(target=reader, name="ready-reader", daemon=True)
    thread.start()
    opening.wait()
    handle = None
    unblock = None
    try:
        t0 = time.perf_counter()
        handle = method.launch()
        thread.join(LAUNCH_TIMEOUT)
        if thread.is_alive():
            raise BenchError(f"{method.name}: the entrypoint did not run within "
                             f"{LAUNCH_TIMEOUT} s")
        if "error" in got:
            raise BenchError(f"{method.name}: reading {fifo}: {got['error']}")
        if got.get("data") != READY:
            raise BenchError(f"{method.name}: the entrypoint wrote {got.get('data')!r}")
        return got["t1"] - t0
    finally:
        if thread.is_alive():
            # Failed or interrupted: hold both ends open, so neither our reader nor an
            # entrypoint still blocked in open(2) on the FIFO waits any longer.
            unblock = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            method.finish(handle)
        finally:
            if unblock is not None:
                os.close(unblock)  # the last writer gone: the reader sees end of file
                thread.join(5)
            fifo.unlink(missing_ok=True)


# -- report ------------------------------------------------------------------------------------


def report(methods: list[Method]) -> None:
    ms = {m.name: [t * 1000 for t in m.times] for m in methods}
    print()
    print(f"{'method':<10} {'runs':>5} {'min ms':>9} {'median ms':>10} {'max ms':>9}")
    for name, values in ms.items():
        print(f"{name:<10} {len(values):>5} {min(values):>9.2f} "
              f"{statistics.median(values):>10.2f} {max(values):>9.2f}")
    med = {name: statistics.median(values) for name, values in ms.items()}
    print()
    if "imageapi" in med:
        for base in ("floor", "nspawn"):
            if base in med:
                print(f"imageapi/{base} (medians): {med['imageapi'] / med[base]:.2f}")
        if "nspawn" in med:
            verdict = "yes" if med["imageapi"] < med["nspawn"] else "no"
            print(f"imageapi beats nspawn: {verdict} "
                  f"({med['imageapi']:.2f} ms vs {med['nspawn']:.2f} ms)")
    if "floor" in med and "nspawn" in med:
        print(f"nspawn/floor (medians): {med['nspawn'] / med['floor']:.2f}")


def bench(args: argparse.Namespace, stack: contextlib.ExitStack, work: Path) -> list[Method]:
    image = build_image(work)
    cgroup_root = enter_cgroups(stack)
    methods: list[Method] = []
    if {"floor", "nspawn"} & set(args.only):
        root = overlay_root(stack, image, work / "baseline")
        entry = shlex.split(ENTRYPOINT)
        if "floor" in args.only:
            methods.append(command_method("floor", root, [
                "unshare", "--fork", "--pid", "--mount", "--uts", "--ipc",
                "chroot", str(root), *entry,
            ]))  # fmt: skip
        if "nspawn" in args.only:
            if shutil.which("systemd-nspawn") is None:
                raise BenchError("no systemd-nspawn: apt-get install systemd-container")
            methods.append(command_method("nspawn", root, [
                "systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(root), *entry,
            ]))  # fmt: skip
    if "imageapi" in args.only:
        cluster = make_cluster(work / "cluster", pools={"rbd": 1})
        add_image(cluster, "rbd", "busybox.sqsh", image)
        sim = stack.enter_context(running_simulator(work / "krbd", cluster))
        url = start_server(stack, work / "imageapi", sim, cgroup_root)
        http = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        methods.append(imageapi_method(stack, http, cluster, "busybox.sqsh"))
    methods.sort(key=lambda m: METHODS.index(m.name))

    log(f"{args.warmup} warm-up rounds, then {args.runs} rounds of "
        + " ".join(m.name for m in methods))
    for i in range(args.warmup + args.runs):
        for method in methods:
            seconds = measure(method)
            if i >= args.warmup:
                method.times.append(seconds)
    return methods


def mounts_under(path: Path) -> list[str]:
    """Mountpoints below `path`, deepest first."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(f"{path}/")), key=len, reverse=True)


def remove_dir(path: Path) -> None:
    """The last step: sweep up what an earlier step could not undo (say the server died and
    left its mounts), then remove the temporary directory."""
    for point in mounts_under(path):
        log(f"warning: {point} was still mounted; unmounting it")
        unmount(Path(point))
    for loop in leftover_loops(path):
        log(f"warning: /dev/{loop} was still attached; detaching it")
        subprocess.run(["losetup", "-d", f"/dev/{loop}"], check=False)
    left = mounts_under(path)
    if left:
        log(f"warning: not removing {path}: still mounted: {left}")
        return
    shutil.rmtree(path, ignore_errors=True)


def leftover_loops(work: Path) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().startswith(f"{work}/"):
                found.append(backing.parent.parent.name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="counted runs per method (30)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted rounds first (3)")
    parser.add_argument(
        "--only", default=",".join(METHODS),
        help="comma-separated subset of " + ",".join(METHODS) + " (default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(args.only) - set(METHODS)
    if unknown or not args.only:
        parser.error(f"--only: unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    if os.geteuid() != 0:
        parser.error("needs root (mounts, namespaces): sudo .venv/bin/python bench/startup.py")

    # SIGTERM unwinds like ^C, so the ExitStack tears everything down either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.setswitchinterval(0.0005)  # the reader thread stamps t1 promptly
    work = Path(tempfile.mkdtemp(prefix="imageapi-bench."))
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(remove_dir, work)
            methods = bench(args, stack, work)
    except KeyboardInterrupt:
        log("interrupted; everything was torn down")
        return 130
    except (BenchError, httpx.HTTPError) as e:
        log(f"error: {type(e).__name__}: {e}")
        return 1
    finally:
        loops = leftover_loops(work)
        if loops:
            log(f"warning: loop devices left over the bench image: {loops}")
    report(methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
