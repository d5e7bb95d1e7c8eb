"""Helpers for tests: build a simulated cluster and run the simulator as a subprocess.

Typical use::

    info = make_cluster(tmp_path / "cluster")
    add_image(info, "rbd", "img", b"...")
    with running_simulator(tmp_path, info) as sim:
        sim.write("add_single_major", info.add_command("rbd", "img"))
        assert sim.mapped() == ["0"]
        sim.write("remove_single_major", "0")
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .mounts import is_mounted

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MONITORS = ("192.0.2.10", "192.0.2.11")
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


def make_secret() -> str:
    """A cephx secret as `ceph auth get-key` prints it: an armored ceph_crypto_key holding
    type AES (1), the creation time and 16 random bytes."""
    blob = struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)
    return base64.b64encode(blob).decode()


@dataclass(frozen=True)
class ClusterInfo:
    path: Path
    fsid: str
    monitors: tuple[str, ...]
    key_name: str
    secret: str

    @property
    def mon_addrs(self) -> str:
        return ",".join(self.monitors)

    def add_command(
        self, pool: str, image: str, snap: str | None = None, options: Sequence[str] = ()
    ) -> str:
        """What `rbd map` would write to add_single_major for this cluster."""
        opts = ",".join([f"name={self.key_name}", f"secret={self.secret}", *options])
        words = [self.mon_addrs, opts, pool, image, *([snap] if snap else [])]
        return " ".join(words)

    def config(self) -> dict[str, object]:
        return json.loads((self.path / "cluster.json").read_text())

    def update_config(self, **changes: object) -> None:
        """Rewrite cluster.json with some keys changed (the simulator rereads it per add)."""
        raw = self.config()
        raw.update(changes)
        _write_json(self.path / "cluster.json", raw)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def make_cluster(
    path: Path | str, pools: Mapping[str, int] | None = None, key_name: str = "admin"
) -> ClusterInfo:
    """Write `<path>/cluster.json` (random fsid, random key for client.<key_name>, monitors
    192.0.2.10 and 192.0.2.11) and one directory per pool; `pools` defaults to {"rbd": 1}."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    pool_map = dict(pools) if pools is not None else {"rbd": 1}
    info = ClusterInfo(
        path=root,
        fsid=str(uuid.uuid4()),
        monitors=DEFAULT_MONITORS,
        key_name=key_name,
        secret=make_secret(),
    )
    _write_json(
        root / "cluster.json",
        {
            "fsid": info.fsid,
            "monitors": list(info.monitors),
            "keys": {key_name: info.secret},
            "pools": pool_map,
        },
    )
    for pool in pool_map:
        (root / pool).mkdir(exist_ok=True)
    return info


def add_image(
    cluster: ClusterInfo | Path | str,
    pool: str,
    image: str,
    source_file_or_bytes: bytes | Path | str,
    snap: str | None = None,
    namespace: str | None = None,
    features: int | None = None,
) -> Path:
    """Create an image (or, with `snap`, a snapshot of an existing image) from bytes or a copy
    of a file; `features` overrides the image's feature bits. Returns the file's path."""
    root = cluster.path if isinstance(cluster, ClusterInfo) else Path(cluster)
    where = root / pool
    if namespace:
        where = where / namespace
    where.mkdir(parents=True, exist_ok=True)
    if snap is not None and not (where / image).is_file():
        raise ValueError(f"snapshot of {pool}/{image}: create the image first")
    dest = where / (f"{image}@{snap}" if snap is not None else image)
    if isinstance(source_file_or_bytes, bytes):
        dest.write_bytes(source_file_or_bytes)
    else:
        shutil.copyfile(source_file_or_bytes, dest)
    if features is not None:
        raw = json.loads((root / "cluster.json").read_text())
        spec = f"{pool}/{namespace}/{image}" if namespace else f"{pool}/{image}"
        raw.setdefault("features", {})[spec] = features
        _write_json(root / "cluster.json", raw)
    return dest


def loops_backed_by(root: Path) -> dict[str, str]:
    """Attached loop devices whose backing file lies under `root`: {"/dev/loopN": file}."""
    prefix = str(root.resolve()) + "/"
    found = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name.startswith(prefix):
            found[f"/dev/{backing.parent.parent.name}"] = name
    return found


@dataclass
class RunningSimulator:
    sysfs: Path
    devdir: Path
    cluster: ClusterInfo
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    problems: list[str] = field(default_factory=list)

    def mapped(self) -> list[str]:
        """Device ids present under devices/, in numeric order."""
        return sorted(os.listdir(self.sysfs / "devices"), key=int)

    def write(self, attr: str, text: str | bytes) -> int:
        """One open + one write(2) to a sysfs attribute, as a client does; raises OSError."""
        data = text.encode("latin-1") if isinstance(text, str) else text
        fd = os.open(self.sysfs / attr, os.O_WRONLY)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    def read(self, attr: str) -> str:
        return (self.sysfs / attr).read_bytes().decode("latin-1")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _start(tmp: Path, cluster: ClusterInfo, single_major: bool) -> RunningSimulator:
    sysfs = tmp / "sysfs"
    devdir = tmp / "dev"
    sysfs.mkdir(parents=True, exist_ok=True)
    devdir.mkdir(parents=True, exist_ok=True)
    stdout_path = tmp / "krbdsim.stdout"
    stderr_path = tmp / "krbdsim.stderr"
    cmd = [
        sys.executable, "-m", "tests.krbdsim",
        "--sysfs", str(sysfs), "--devdir", str(devdir), "--cluster", str(cluster.path),
    ]  # fmt: skip
    if not single_major:
        cmd.append("--no-single-major")
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        # Own session: a ^C at the terminal must not reach it before we stop it in order.
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    return RunningSimulator(sysfs, devdir, cluster, proc, stdout_path, stderr_path)


def _wait_ready(sim: RunningSimulator) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if "ready" in sim.stdout_path.read_text(errors="replace").splitlines():
            return
        if sim.process.poll() is not None:
            raise RuntimeError(
                f"krbdsim exited with {sim.process.returncode} before ready:\n{sim.stderr()}"
            )
        time.sleep(0.02)
    raise RuntimeError(f"krbdsim not ready after {READY_TIMEOUT}s:\n{sim.stderr()}")


def _stop(sim: RunningSimulator) -> None:
    """SIGTERM, wait, then make sure nothing is left: mount, loop devices, process."""
    proc = sim.process
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            sim.problems.append(f"krbdsim ignored SIGTERM for {STOP_TIMEOUT}s; killed")
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        sim.problems.append(f"krbdsim exited with {proc.returncode}")
    if is_mounted(sim.sysfs):
        sim.problems.append(f"{sim.sysfs} still mounted after krbdsim exited")
        subprocess.run(["fusermount3", "-u", str(sim.sysfs)], capture_output=True, check=False)
        if is_mounted(sim.sysfs):
            subprocess.run(["umount", "-l", str(sim.sysfs)], capture_output=True, check=False)
        if is_mounted(sim.sysfs):
            sim.problems.append(f"could not unmount {sim.sysfs}")
    for device, backing in loops_backed_by(sim.cluster.path).items():
        sim.problems.append(f"{device} (over {backing}) left attached")
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
    for node in sim.devdir.glob("rbd*"):
        sim.problems.append(f"{node} left behind")
        node.unlink(missing_ok=True)


@contextlib.contextmanager
def running_simulator(
    tmp_dir: Path | str, cluster: ClusterInfo, single_major: bool = True
) -> Iterator[RunningSimulator]:
    """Start `python -m tests.krbdsim` with its mount under `tmp_dir`, wait for `ready`, and on
    exit stop it and check the FUSE mount and every loop device over the cluster are gone.

    A leftover is cleaned up and then raised as RuntimeError (unless the body is already
    failing, in which case it is only warned about, so the first error stays visible).
    """
    sim = _start(Path(tmp_dir), cluster, single_major)
    failing = False
    try:
        _wait_ready(sim)
        yield sim
    except BaseException:
        failing = True
        raise
    finally:
        _stop(sim)
        if sim.problems:
            report = "; ".join(sim.problems) + f"\nkrbdsim stderr:\n{sim.stderr()}"
            if failing:
                warnings.warn(report, stacklevel=2)
            else:
                raise RuntimeError(report)
