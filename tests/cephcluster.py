"""A real single-node Ceph cluster for tests, from Debian's packages (ceph-mon, ceph-osd,
ceph-common): one monitor, one OSD on a file, no manager, cephx on, loopback only.

Everything lives under one directory — configuration, keys, the monitor's store, the OSD's
bluestore file, logs, admin sockets, pid files — and the daemons are started by this module
itself (nothing here runs systemd). Each cluster listens on an address of its own in
127.0.0.0/8 (random), on Ceph's default ports, so clusters of concurrent test runs never
collide and a client names the monitor by address alone, as the Image API does.

Without a manager, `ceph pg ...` and `ceph -s`'s PG summary have no data: readiness is an
actual write to the pool. Measured on a 2-core VM: ready for I/O in about 3.5 s, about 90 MB.

    python -m tests.cephcluster start DIR     # prints the cluster's facts as JSON, returns
    python -m tests.cephcluster stop DIR      # stops the daemons, removes DIR

or, from Python, `with running_cluster(DIR) as cluster: ...` (the pytest fixture in
tests/conftest.py does that).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
DAEMONS = ("mon.a", "osd.0")
PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common")
# Daemons this process started, by pid: reaped when stopped, so none stays a zombie.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class CephCluster:
    path: Path
    fsid: str
    address: str  # the monitor's (and OSD's) IPv4 address; default ports
    admin_key: str

    @property
    def conf(self) -> Path:
        return self.path / "ceph.conf"

    @property
    def monitors(self) -> list[str]:
        return [self.address]

    def env(self) -> dict[str, str]:
        # CEPH_CONF (and CEPH_ARGS for the keyring) point every CLI tool at this cluster.
        return {**os.environ, "CEPH_CONF": str(self.conf),
                "CEPH_ARGS": f"--keyring {self.path / 'admin.keyring'}"}

    def run(self, *cmd: str, input: bytes | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a Ceph CLI tool (`ceph`, `rbd`, `rados`) as client.admin of this cluster."""
        done = subprocess.run(list(cmd), env=self.env(), input=input, capture_output=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)}: exit {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()}")
        return done

    def text(self, *cmd: str, timeout: float = 60) -> str:
        return self.run(*cmd, timeout=timeout).stdout.decode()

    def ceph_json(self, *cmd: str) -> object:
        return json.loads(self.text("ceph", *cmd, "--format", "json"))

    def daemon_json(self, daemon: str, *cmd: str) -> object:
        """A command on a daemon's admin socket (works while the daemon is up, no auth)."""
        sock = self.path / "run" / f"{daemon}.asok"
        done = subprocess.run(["ceph", "--admin-daemon", str(sock), *cmd], capture_output=True,
                              timeout=30, check=False,
                              env={k: v for k, v in os.environ.items() if k != "CEPH_ARGS"})
        if done.returncode != 0:
            raise ClusterError(f"{daemon} {' '.join(cmd)}: {done.stderr.decode().strip()}")
        return json.loads(done.stdout)

    def add_user(self, name: str, *caps: str) -> str:
        """A cephx user (`client.NAME`) with the caps given; returns its secret."""
        self.run("ceph", "auth", "get-or-create", f"client.{name}", *caps)
        return self.text("ceph", "auth", "get-key", f"client.{name}").strip()

    def pool_state(self, pool: str = "rbd") -> dict[str, list[object]]:
        """Every object of `pool`, all namespaces: version, size, mtime, content digest,
        xattrs and omap — so that a test can prove something wrote nothing. Read through
        librados as client.admin (reads change none of it)."""
        done = subprocess.run(
            [sys.executable, "-c", _POOL_STATE, str(self.conf), self.admin_key, pool],
            capture_output=True, text=True, timeout=120, check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("CEPH_")},
        )  # fmt: skip
        if done.returncode != 0:
            raise ClusterError(f"pool state of {pool}: {done.stderr.strip()}")
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def sessions(self, user: str) -> list[dict[str, object]]:
        """The monitor's sessions of `client.USER`."""
        found = self.daemon_json("mon.a", "sessions")
        assert isinstance(found, list)
        return [s for s in found if s.get("entity_name") == f"client.{user}"]

    def watchers(self) -> list[object]:
        """Every watch the OSD holds, on any object."""
        found = self.daemon_json("osd.0", "dump_watchers")
        assert isinstance(found, list)
        return found

    def pids(self) -> dict[str, int]:
        found = {}
        for daemon in DAEMONS:
            with contextlib.suppress(OSError, ValueError):
                found[daemon] = int((self.path / "run" / f"{daemon}.pid").read_text())
        return {d: p for d, p in found.items() if _alive(p)}

    def stop_daemon(self, daemon: str) -> None:
        """SIGTERM one daemon and wait for it to end (a dead monitor, for failure tests)."""
        pid = self.pids().get(daemon)
        if pid is not None:
            _stop([pid])

    def start_daemon(self, daemon: str) -> None:
        kind, _, ident = daemon.partition(".")
        _spawn(self.path, kind, ident)

    def save(self) -> None:
        data = {k: str(v) for k, v in asdict(self).items()}
        (self.path / "cluster.json").write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CephCluster:
        raw = json.loads((path / "cluster.json").read_text())
        return cls(path=Path(raw["path"]), fsid=raw["fsid"], address=raw["address"],
                   admin_key=raw["admin_key"])


_POOL_STATE = """
import hashlib, json, sys
from imageapi.rbdfuse import bindings
rados, _ = bindings.load()
conf, key, pool = sys.argv[1:4]
cluster = rados.Rados(conffile=conf, rados_id="admin", conf={"key": key})
cluster.connect()
lister = cluster.open_ioctx(pool)
lister.set_namespace(rados.LIBRADOS_ALL_NSPACES)
io = cluster.open_ioctx(pool)
state = {}
for obj in lister.list_objects():
    io.set_namespace(obj.nspace)
    data = io.read(obj.key, 64 << 20)
    version = io.get_last_version()
    size, mtime = io.stat(obj.key)
    xattrs = {k: v.hex() for k, v in io.get_xattrs(obj.key)}
    with rados.ReadOpCtx() as op:
        values, _ = io.get_omap_vals(op, "", "", 100000)
        io.operate_read_op(op, obj.key)
        omap = {k: (v or b"").hex() for k, v in values}
    state[obj.nspace + "/" + obj.key] = [version, size, str(tuple(mtime)),
                                         hashlib.sha256(data).hexdigest(), xattrs, omap]
cluster.shutdown()
print(json.dumps(state, sort_keys=True))
"""


def missing_tools() -> list[str]:
    return [t for t in ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd",
                        "rados") if shutil.which(t) is None]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pick_address() -> str:
    # 127.0.0.1 and systemd-resolved's 127.0.0.53/54 are left alone.
    rng = random.SystemRandom()
    return f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def _config(path: Path, fsid: str, address: str) -> str:
    # Directories are absolute: the daemons are started with cwd=/ like real daemons.
    return f"""[global]
fsid = {fsid}
mon_host = {address}
public_addr = {address}
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = {path}/run
admin_socket = {path}/run/$name.asok
pid_file = {path}/run/$name.pid
log_file = {path}/log/$name.log
mon_cluster_log_file = {path}/log/cluster.log
crash_dir = {path}/crash
log_to_stderr = false
err_to_stderr = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_allow_pool_delete = true
osd_crush_chooseleaf_type = 0
# A single monitor decides fast; the default 1 s would be paid by every map change.
paxos_propose_interval = 0.1

[mon]
mon_data = {path}/mon/$cluster-$id
keyring = {path}/mon/keyring

[osd]
osd_data = {path}/osd/$cluster-$id
keyring = {path}/osd/$cluster-$id/keyring
osd_objectstore = bluestore
bluestore_block_path = {path}/osd/block
bluestore_block_size = 4294967296
bluestore_block_create = true
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
bdev_aio_poll_ms = 20
osd_memory_target = 1073741824
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 2
"""


def _spawn(path: Path, kind: str, ident: str) -> None:
    """Start one daemon in the foreground of its own session; it writes its pid file."""
    log = open(path / "log" / f"{kind}.{ident}.stdout", "ab")  # noqa: SIM115
    with log:
        proc = subprocess.Popen(
            [f"ceph-{kind}", "-f", "-c", str(path / "ceph.conf"), "-i", ident],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
            start_new_session=True,  # a Ctrl-C of the test run is not theirs
        )
    _CHILDREN[proc.pid] = proc
    pid_file = path / "run" / f"{kind}.{ident}.pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        if time.monotonic() > deadline:
            raise ClusterError(f"{kind}.{ident} wrote no pid file: see {path / 'log'}")
        time.sleep(0.01)


def _tool(cmd: Sequence[str], timeout: float = 60) -> str:
    done = subprocess.run(list(cmd), capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)}: exit {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()


def _gen_key() -> str:
    return _tool(["ceph-authtool", "--gen-print-key"]).strip()


def start(path: Path, address: str | None = None) -> CephCluster:
    """Create and start a cluster in the empty (or absent) directory `path`; returns once a
    write to pool `rbd` has succeeded. On failure everything started is stopped again."""
    missing = missing_tools()
    if missing:
        raise ClusterError("needs " + ", ".join(missing) + " (apt-get install "
                           + " ".join(PACKAGES) + ")")
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise ClusterError(f"{path} is not empty")
    fsid = str(uuid.uuid4())
    address = address or _pick_address()
    for sub in ("run", "log", "crash", "mon/ceph-a", "osd/ceph-0"):
        (path / sub).mkdir(parents=True)
    conf = path / "ceph.conf"
    conf.write_text(_config(path, fsid, address))
    try:
        return _bootstrap(path, conf, fsid, address)
    except BaseException:
        _stop_all(path)
        raise


def _bootstrap(path: Path, conf: Path, fsid: str, address: str) -> CephCluster:
    admin_key, osd_key, osd_uuid = _gen_key(), _gen_key(), str(uuid.uuid4())
    mon_keyring = path / "mon" / "keyring"
    # The monitor's initial keyring: its own key and client.admin's, imported at mkfs.
    mon_keyring.write_text(
        f"[mon.]\n\tkey = {_gen_key()}\n\tcaps mon = \"allow *\"\n"
        f"[client.admin]\n\tkey = {admin_key}\n\tcaps mon = \"allow *\"\n"
        f"\tcaps osd = \"allow *\"\n\tcaps mgr = \"allow *\"\n"
    )
    admin = path / "admin.keyring"
    admin.write_text(f"[client.admin]\n\tkey = {admin_key}\n")
    (path / "osd/ceph-0/keyring").write_text(f"[osd.0]\n\tkey = {osd_key}\n")
    for keyring in (mon_keyring, admin, path / "osd/ceph-0/keyring"):
        keyring.chmod(0o600)
    monmap = path / "monmap"
    _tool(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
           f"[v2:{address}:3300,v1:{address}:6789]", str(monmap)])
    _tool(["ceph-mon", "-c", str(conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
           "--keyring", str(mon_keyring)])
    monmap.unlink()
    _spawn(path, "mon", "a")
    # The OSD's mkfs is local (bluestore on its file): it runs while the monitor comes up, and
    # so must not ask the monitor for configuration (it would fail if that came too late).
    mkfs = subprocess.Popen(
        ["ceph-osd", "-c", str(conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
         "--no-mon-config"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cluster = CephCluster(path=path, fsid=fsid, address=address, admin_key=admin_key)
    cluster.save()
    secrets = json.dumps({"cephx_secret": osd_key}).encode()
    cluster.run("ceph", "osd", "new", osd_uuid, "0", "-i", "-", input=secrets)
    _, err = mkfs.communicate(timeout=60)
    if mkfs.returncode != 0:
        raise ClusterError(f"ceph-osd --mkfs: exit {mkfs.returncode}: {err.decode().strip()}")
    _spawn(path, "osd", "0")
    cluster.run("ceph", "osd", "pool", "create", "rbd", "8", "8")
    _wait_for_osd_up(cluster)
    cluster.run("rbd", "pool", "init", "rbd")
    _wait_for_io(cluster)
    return cluster


def _wait_for_osd_up(cluster: CephCluster) -> None:
    """Before the first client op: one sent while no OSD is up waits for the client's next
    objecter tick (5 s) to see a newer map."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        stat = cluster.ceph_json("osd", "stat")
        if isinstance(stat, dict) and stat.get("num_up_osds") == 1:
            return
        if time.monotonic() > deadline or not cluster.pids().get("osd.0"):
            raise ClusterError(f"osd.0 did not come up within {READY_TIMEOUT:g} s: "
                               f"see {cluster.path / 'log'}")
        time.sleep(0.05)


def _wait_for_io(cluster: CephCluster) -> None:
    """A write to pool rbd succeeds once the OSD is up and the pool's PGs are active."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        done = cluster.run("rados", "-p", "rbd", "--rados-osd-op-timeout", "5",
                           "put", "imageapi-probe", "/dev/null", check=False, timeout=30)
        if done.returncode == 0:
            cluster.run("rados", "-p", "rbd", "rm", "imageapi-probe")
            return
        if time.monotonic() > deadline or not cluster.pids().get("osd.0"):
            raise ClusterError(f"the cluster did not take a write within {READY_TIMEOUT:g} s: "
                               f"{done.stderr.decode(errors='replace').strip()}; "
                               f"see {cluster.path / 'log'}")
        time.sleep(0.1)


def _stop(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
    for pid in pids:
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait()


def _stop_all(path: Path) -> None:
    """Stop every daemon of the cluster in `path`: by pid file, and any process whose command
    line names its configuration (one that died before writing its pid file, a mkfs)."""
    pids = set()
    for pid_file in (path / "run").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(pid_file.read_text()))
    conf = os.fsencode(path / "ceph.conf")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if conf in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    pids.add(int(entry))
    _stop(sorted(p for p in pids if _alive(p)))


def stop(path: Path) -> None:
    """Stop the cluster in `path` and remove the directory."""
    path = path.resolve()
    if not (path / "ceph.conf").exists():
        raise ClusterError(f"{path} holds no cluster")
    _stop_all(path)
    shutil.rmtree(path)


@contextlib.contextmanager
def running_cluster(path: Path) -> Iterator[CephCluster]:
    cluster = start(path)
    try:
        yield cluster
    finally:
        stop(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print("usage: python -m tests.cephcluster start|stop DIR", file=sys.stderr)
        return 2
    path = Path(args[1])
    try:
        if args[0] == "start":
            began = time.monotonic()
            cluster = start(path)
            data = {k: str(v) for k, v in asdict(cluster).items() if k != "admin_key"}
            data["seconds"] = f"{time.monotonic() - began:.2f}"
            print(json.dumps(data, indent=2))
        else:
            stop(path)
    except ClusterError as exc:
        print(f"cephcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
