"""imageapi as a systemd service: the unit file, sd_notify, the delegated cgroup, and a daemon
stop that leaves the node's containers and their mounts running.

This host's PID 1 is not systemd, so the unit cannot run for real: systemd-analyze checks it
offline, and the daemon's side of each systemd interface is driven the way systemd drives it
($NOTIFY_SOCKET, $INVOCATION_ID/$SYSTEMD_EXEC_PID and the xattrs of a delegated cgroup).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import prctl
import pytest

from imageapi import cli
from imageapi.notify import Notifier
from imageapi.runtime.init import DROPPED_CAPS
from tests import hostview
from tests.conftest import Server, start_server
from tests.test_http_layer import Proc, free_port, spawn, spawn_command

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "imageapi.service"
SOCKET_UNIT = REPO / "systemd" / "imageapi.socket"
ENV_FILE = REPO / "systemd" / "imageapi.env"
BASE = "/imageapi/v1"
INSTALLED_SERVER = "/opt/imageapi/bin/imageapi-server"


# -- the unit file -----------------------------------------------------------------------------


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """`Section.Key` -> every value, in order (a unit may repeat a key); comments dropped."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def env_file_args() -> list[str]:
    for line in ENV_FILE.read_text().splitlines():
        if line.startswith("IMAGEAPI_ARGS="):
            return line.partition("=")[2].split()  # systemd splits an unbraced $VAR at spaces
    raise AssertionError(f"no IMAGEAPI_ARGS in {ENV_FILE}")


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd (scripts/test.sh does)"
    # verify insists that ExecStart's program exists: point it at this checkout's server.
    server = REPO / ".venv" / "bin" / "imageapi-server"
    if not server.exists():
        server = Path(sys.executable)
    text = UNIT.read_text()
    assert INSTALLED_SERVER in text
    copy = tmp_path / "imageapi.service"
    copy.write_text(text.replace(INSTALLED_SERVER, str(server)))
    socket_unit = tmp_path / SOCKET_UNIT.name  # beside the service it activates
    shutil.copy(SOCKET_UNIT, socket_unit)
    result = subprocess.run([analyze, "verify", "--man=no", str(copy), str(socket_unit)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and unparsable values, and only says so: demand silence.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        f"rc={result.returncode}\n{result.stdout}{result.stderr}"
    )
    # ...and it does say so: the same unit with a typo is not silent.
    copy.write_text(copy.read_text().replace("KillMode=process", "KillMode=proces"))
    typo = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=60)
    assert "proces" in typo.stderr, typo.stderr


def test_unit_choices() -> None:
    unit = unit_settings()
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert one["Service.ExecStart"] == f"{INSTALLED_SERVER} $IMAGEAPI_ARGS"
    assert one["Service.EnvironmentFile"] == "-/etc/default/imageapi"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.KillMode"] == "process"  # containers survive a daemon restart
    assert one["Service.Delegate"] == "yes"
    assert one["Service.OOMPolicy"] == "continue"  # an OOM kill in a container is not ours
    assert one["Service.TasksMax"] == "infinity"
    assert one["Install.WantedBy"] == "multi-user.target"
    # The env file's default listener is the unit's own default.
    assert f'"IMAGEAPI_ARGS={" ".join(env_file_args())}"' in unit["Service.Environment"]
    assert "--scheme unix --socket-path /run/imageapi.sock" in " ".join(env_file_args())
    # Nothing that makes a mount namespace (the daemon's mounts must be the host's), filters
    # syscalls or forbids privilege gains (containers would inherit it), or deletes /run/imageapi.
    forbidden = {
        "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectSystem", "ProtectHome",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
        "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
        "MountFlags", "RootDirectory", "RootImage", "SystemCallFilter", "SystemCallArchitectures",
        "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute", "RestrictSUIDSGID",
        "ProtectClock", "ProtectHostname", "NoNewPrivileges", "DevicePolicy", "DeviceAllow",
        "IPAddressDeny", "PrivateNetwork", "RuntimeDirectory", "DynamicUser", "User",
    }
    used = {key.split(".", 1)[1] for key in unit if key.startswith("Service.")}
    assert not used & forbidden, sorted(used & forbidden)


def test_bounding_set_is_what_containers_keep() -> None:
    """The unit's CapabilityBoundingSet bounds the daemon and, through it, every container:
    it must keep all a container keeps (imageapi/runtime/init.py) and nothing more."""
    kept = {cap for value in unit_settings()["Service.CapabilityBoundingSet"]
            for cap in value.split()}
    assert all(cap.startswith("CAP_") for cap in kept), kept
    names = {cap.removeprefix("CAP_").lower() for cap in kept}
    known = (set(prctl.ALL_CAP_NAMES) - {"last_cap"}) | {"checkpoint_restore"}
    assert names <= known, f"unknown capabilities: {sorted(names - known)}"
    dropped = set(DROPPED_CAPS)
    assert not names & dropped, f"a container may not have these: {sorted(names & dropped)}"
    assert known - dropped <= names, f"containers would lose {sorted(known - dropped - names)}"
    daemon_needs = {"sys_admin", "sys_chroot", "mknod", "setpcap", "net_admin",
                    "dac_override", "fowner"}
    assert daemon_needs <= names


# -- sd_notify ---------------------------------------------------------------------------------


class NotifySocket:
    """The manager's end: a datagram socket in the abstract namespace."""

    def __init__(self) -> None:
        self.name = f"imageapi-test-{uuid.uuid4().hex}"
        self.address = "\0" + self.name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.fillers: list[socket.socket] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self.name}

    def fill(self) -> int:
        """Fill our receive queue, so a sender blocks (in send(2)) until we read. Each sender
        is limited by its own send buffer too; the queue is full when a fresh sender cannot
        add one datagram."""
        count = 0
        while True:
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            filler.setblocking(False)
            filler.connect(self.address)
            self.fillers.append(filler)
            sent = 0
            try:
                while True:
                    filler.send(b"FILLER=1")
                    sent += 1
            except BlockingIOError:
                pass
            count += sent
            if sent == 0:
                return count
            assert len(self.fillers) < 100, "the queue does not fill up"

    def receive(self, timeout: float = 30) -> list[str]:
        """The next notice that is not one of ours, as its lines."""
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(4096)
            if data != b"FILLER=1":
                return data.decode().split("\n")

    def drain_fillers(self, expected: int) -> list[str]:
        """Read our `expected` fillers (they were queued first), then the next notice."""
        self.sock.settimeout(30)
        for i in range(expected):
            data = self.sock.recv(4096)
            assert data == b"FILLER=1", f"a notice overtook filler {i}/{expected}: {data!r}"
        return self.receive()

    def pending(self) -> bytes | None:
        self.sock.setblocking(False)
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return None

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


def socket_fds(pid: int) -> dict[int, int]:
    """inode -> fd of every socket `pid` holds."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found[int(link[8:-1])] = int(fd)
    return found


def unix_sockets() -> list[dict[str, Any]]:
    rows = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            rows.append({"flags": int(parts[3], 16), "type": int(parts[4], 16),
                         "state": int(parts[5], 16), "inode": int(parts[6]),
                         "path": parts[7] if len(parts) > 7 else ""})
    return rows


def tcp_listening(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    found.add(int(parts[9]))
    return found


def polled_fds(pid: int) -> set[int]:
    """Every fd registered in one of `pid`'s epoll instances (the event loop's selector)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("tfd:"):
                        found.add(int(line.split()[1]))
        except OSError:
            continue
    return found


def connected_datagram_socket(pid: int) -> int | None:
    """The fd of a connected unix datagram socket of `pid` — the daemon has only one: the one
    it opens to send a notice."""
    fds = socket_fds(pid)
    for row in unix_sockets():
        if row["inode"] in fds and row["type"] == socket.SOCK_DGRAM and row["state"] == 3:
            return fds[row["inode"]]
    return None


def wait_until(predicate: Any, what: str, proc: Proc, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert proc.popen.poll() is None, f"server exited {proc.popen.returncode}:\n{proc.log}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{proc.log}"
        time.sleep(0.005)


def test_ready_only_once_every_listener_is_served(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """READY=1 must not precede any listener's server. The proof does not trust the daemon's
    log or timing: our notify queue is full before the daemon starts, so its READY send blocks
    inside send(2), with the event loop (the only thread that arms listeners) stopped there.
    While it is stuck we look at the kernel's view of the process: every listening socket
    must already be registered in the event loop's epoll set. Then we read, and READY=1 is
    the first notice after our fillers."""
    fillers = notify_socket.fill()
    port = free_port()
    sock_path = tmp_path / "api.sock"
    proc = spawn(tmp_path, "--scheme", "http", "--host", "127.0.0.1", "--port", str(port),
                 "--scheme", "unix", "--socket-path", str(sock_path), env=notify_socket.env)
    pid = proc.popen.pid
    try:
        notice_fd = wait_until(lambda: connected_datagram_socket(pid), "the READY send", proc)
        # The daemon is inside Notifier.send now, and cannot get out until we read.
        listening = tcp_listening(port) | {
            row["inode"] for row in unix_sockets()
            if row["path"] == str(sock_path) and row["flags"] & 0x10000  # __SO_ACCEPTCON
        }
        fds = socket_fds(pid)
        listen_fds = {fds[inode] for inode in listening if inode in fds}
        assert len(listen_fds) == 2, f"listening sockets of the daemon: {listen_fds}"
        armed = polled_fds(pid)
        assert listen_fds <= armed, (
            f"READY was being sent while listener fds {sorted(listen_fds - armed)} were not "
            f"polled yet (polled: {sorted(armed)})"
        )
        assert connected_datagram_socket(pid) == notice_fd, "the send was not held back"
        notice = notify_socket.drain_fillers(fillers)
        assert "READY=1" in notice and f"MAINPID={pid}" in notice, notice
        status = next(line for line in notice if line.startswith("STATUS="))
        assert f"http://127.0.0.1:{port}" in status and f"unix:{sock_path}" in status, status
        # Ready means answering, on every listener.
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path))) as client:
            assert client.get(f"http://imageapi{BASE}/mount").json() == []
        assert httpx.get(f"http://127.0.0.1:{port}{BASE}/mount").json() == []
        assert notify_socket.pending() is None, "a second notice before any signal"
    finally:
        code = proc.stop()
    assert code == 0, proc.log
    assert "STOPPING=1" in notify_socket.receive(), proc.log


class RecordingNotifier(Notifier):
    """Records each notice with, at that moment, whether each server was serving."""

    def __init__(self, servers: list[cli.ListenerServer]) -> None:
        super().__init__(None)
        self.servers = servers
        self.notices: list[tuple[tuple[str, ...], list[bool]]] = []

    def send(self, *fields: str) -> bool:
        serving = [bool(s.started and s.servers and all(x.is_serving() for x in s.servers))
                   for s in self.servers]
        self.notices.append((fields, serving))
        if fields[0] == "READY=1":  # done: let every server shut down
            for server in self.servers:
                server.should_exit = True
        return True


async def lifespan_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


@pytest.mark.parametrize("slow", [0, 1, 2])
def test_ready_waits_for_the_slowest_listener(slow: int) -> None:
    """In process, deterministic: one listener's server starts late (the first one runs the
    app's startup); READY=1 still comes only when all of them serve."""

    class Slow(cli.ListenerServer):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await asyncio.sleep(0.3)
            await super().startup(sockets=sockets)

    listeners = [cli.Listener(f"test{i}", cli.bind_tcp("127.0.0.1", 0)) for i in range(3)]
    try:
        servers = cli.make_servers(lifespan_app, listeners)
        servers[slow] = Slow(servers[slow].config, servers[slow].label)
        notifier = RecordingNotifier(servers)
        asyncio.run(asyncio.wait_for(cli.serve_all(servers, listeners, notifier), 30))
    finally:
        cli.close_all(listeners)
    assert len(notifier.notices) == 1, notifier.notices
    fields, serving = notifier.notices[0]
    assert fields[0] == "READY=1" and serving == [True, True, True], notifier.notices
    assert f"MAINPID={os.getpid()}" in fields


def test_stopping_on_sigterm_and_no_inherited_notify_socket(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    proc = spawn(tmp_path, "--scheme", "unix", "--socket-path", str(tmp_path / "api.sock"),
                 env=notify_socket.env)
    try:
        assert "READY=1" in notify_socket.receive(), proc.log
        helpers = hostview.descendants(proc.popen.pid)
        assert helpers, "no container helper"
        for pid in helpers:  # only the daemon may talk to the manager (NotifyAccess=main)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(b"NOTIFY_SOCKET=")], pid
        environ = Path(f"/proc/{proc.popen.pid}/environ").read_bytes()
        assert b"NOTIFY_SOCKET=" in environ  # (the initial environment, as exec'd)
        assert notify_socket.pending() is None
        proc.popen.send_signal(signal.SIGTERM)
        notice = notify_socket.receive()
        assert notice[0] == "STOPPING=1", notice
        assert any(line.startswith("STATUS=SIGTERM") for line in notice), notice
    finally:
        code = proc.stop()
    assert code == 0, proc.log
    assert notify_socket.pending() is None, "a notice after STOPPING=1"


def test_notifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    quiet = Notifier.from_environ()
    assert not quiet.enabled and quiet.send("READY=1") is False
    # A path socket; the variable leaves the environment.
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        notifier = Notifier.from_environ()
        assert "NOTIFY_SOCKET" not in os.environ
        assert notifier.send("READY=1", "STATUS=up") is True
        assert manager.recv(4096) == b"READY=1\nSTATUS=up"
    # Gone manager: a warning, not an exception.
    assert notifier.send("STOPPING=1") is False
    assert Notifier("relative/name").enabled is False


# -- socket activation ------------------------------------------------------------------------

# Runs a command the way systemd starts an activated service: the given descriptors become
# 3, 4, ... and LISTEN_PID/LISTEN_FDS name them (for this very pid: exec keeps it).
ACTIVATE = """
import fcntl, os, sys
split = sys.argv.index("--")
fds = [int(fd) for fd in sys.argv[1:split]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ...
for n, fd in enumerate(high):
    os.dup2(fd, 3 + n)  # inheritable
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
os.execv(sys.argv[split + 1], sys.argv[split + 1:])
"""


def activated(*sockets: socket.socket | int) -> dict[str, Any]:
    """spawn() arguments that pass `sockets` (or descriptors) as systemd would."""
    fds = [s if isinstance(s, int) else s.fileno() for s in sockets]
    return {"wrapper": [sys.executable, "-c", ACTIVATE, *map(str, fds), "--"], "pass_fds": fds}


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_socket_activation_serves_the_passed_sockets(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    unix_path = tmp_path / "api.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix_path.chmod(0o600)
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    unused = tmp_path / "flag.sock"
    before = os.lstat(unix_path).st_ino
    # The listener flags are not used when sockets are passed.
    proc = spawn(tmp_path, "--scheme", "unix", "--socket-path", str(unused), "--scheme", "http",
                 "--port", str(free_port()), env=notify_socket.env, **activated(unix, tcp))
    try:
        notice = notify_socket.receive()
        assert "READY=1" in notice, proc.log
        assert f"STATUS=accepting connections on unix:{unix_path}, http://127.0.0.1:{port}" in (
            notice), notice
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(unix_path)), timeout=10) as c:
            assert c.get(f"http://localhost{BASE}/container").json() == []
        assert httpx.get(f"http://127.0.0.1:{port}{BASE}/attach/rbd", timeout=10).json() == []
        assert not unused.exists()
        assert "--scheme is not used" in proc.log
        # Neither the variables nor the sockets reach the helper (hence any container).
        helpers = hostview.descendants(proc.popen.pid)
        assert helpers, "no container helper"
        for pid in helpers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(b"LISTEN_")], pid
            assert not {inode(unix), inode(tcp)} & set(socket_fds(pid)), pid
    finally:
        code = proc.stop()
    assert code == 0, proc.log
    # The socket is the manager's: still there, the same one, and clients still queue on it
    # while no daemon runs (what makes a restart invisible to them).
    assert os.lstat(unix_path).st_ino == before
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(unix_path))
    unix.close()
    tcp.close()


@pytest.mark.parametrize("case", ["file", "datagram", "not-listening"])
def test_socket_activation_refuses_what_it_cannot_serve(tmp_path: Path, case: str) -> None:
    if case == "file":
        passed: Any = open(tmp_path / "file", "w")  # noqa: SIM115 - closed below
        expected = "not a socket"
    elif case == "datagram":
        passed = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        passed.bind(str(tmp_path / "dgram.sock"))
        expected = "not a listening stream socket"
    else:
        passed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        expected = "not a listening stream socket"
    unused = tmp_path / "flag.sock"
    try:
        proc = spawn(tmp_path, "--scheme", "unix", "--socket-path", str(unused),
                     **activated(passed.fileno()))
    finally:
        passed.close()
    try:
        code = proc.popen.wait(30)
        proc.drained.wait(5)
    finally:
        proc.stop()  # a no-op once it has exited
    assert code == 1, proc.log
    assert f"socket activation: file descriptor 3 (LISTEN_FDS): {expected}" in proc.log
    assert not unused.exists()


def test_socket_activation_variables_for_another_process_are_ignored(tmp_path: Path) -> None:
    """$LISTEN_PID names another process (the variables were inherited): bind as told."""
    path = tmp_path / "api.sock"
    proc = spawn(tmp_path, "--scheme", "unix", "--socket-path", str(path),
                 env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    try:
        proc.wait_for("accepting connections on", count=1)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=10) as c:
            assert c.get(f"http://localhost{BASE}/container").json() == []
        for pid in hostview.descendants(proc.popen.pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(b"LISTEN_")], pid
    finally:
        code = proc.stop()
    assert code == 0, proc.log
    assert not path.exists()


# -- the default listener of the unit ----------------------------------------------------------


def test_unit_default_listener_alone(tmp_path: Path) -> None:
    """The unit's default flags (the env file's IMAGEAPI_ARGS) serve the API on the socket
    alone: no TCP port, a 0600 socket."""
    sock_path = tmp_path / "imageapi.sock"
    args = [str(sock_path) if a == "/run/imageapi.sock" else a for a in env_file_args()]
    assert args.count(str(sock_path)) == 1 and "--port" not in args
    proc = spawn(tmp_path, *args)
    try:
        proc.wait_for("accepting connections on", count=1)
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path)), timeout=10) as c:
            assert c.get(f"http://localhost{BASE}/container").json() == []
            assert c.get(f"http://localhost{BASE}/attach/rbd").json() == []
        inodes = socket_fds(proc.popen.pid)
        tcp = [line for table in ("/proc/net/tcp", "/proc/net/tcp6")
               for line in Path(table).read_text().splitlines()[1:]
               if int(line.split()[9]) in inodes]
        assert tcp == [], f"the daemon holds TCP sockets: {tcp}"
        assert proc.log.count("accepting connections on") == 1
    finally:
        code = proc.stop()
    assert code == 0, proc.log
    assert not sock_path.exists()


# -- the delegated cgroup ----------------------------------------------------------------------


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"{pid} has no cgroup2 cgroup")


def remove_cgroup(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        while sub.exists():
            try:
                sub.rmdir()
            except OSError:
                assert time.monotonic() < deadline, f"{sub} stays busy: {sub.read_text()}"
                time.sleep(0.05)
    path.rmdir()


@pytest.mark.parametrize("case", ["delegated", "not-exec-pid", "no-xattr"])
def test_daemon_moves_into_a_leaf_of_its_delegated_cgroup(tmp_path: Path, case: str) -> None:
    """As systemd starts it with Delegate=yes — in a cgroup marked trusted.delegate=1 with the
    unit's invocation id, $INVOCATION_ID set and $SYSTEMD_EXEC_PID its own pid — the daemon
    (and so its helper) runs in <cgroup>/daemon and puts containers in <cgroup>/imageapi.
    Otherwise it stays where it was started."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mount = hostview.cgroup2_mount()
    if mount is None:
        pytest.skip("needs a cgroup2 hierarchy")
    unit = mount / f"imageapi-test-{os.getpid()}-{time.monotonic_ns()}"
    invocation = uuid.uuid4().hex
    unit.mkdir()
    proc = None
    try:
        if case != "no-xattr":
            os.setxattr(unit, "trusted.delegate", b"1")
            os.setxattr(unit, "trusted.invocation_id", invocation.encode())
        exec_pid = "$$" if case != "not-exec-pid" else "1"
        # Like systemd: put the process in the unit's cgroup, then exec the daemon.
        wrapper = (f'echo $$ > {unit}/cgroup.procs && SYSTEMD_EXEC_PID={exec_pid} '
                   f'INVOCATION_ID={invocation} exec "$@"')
        (tmp_path / "dev").mkdir()
        proc = spawn_command([
            "sh", "-c", wrapper, "sh", sys.executable, "-m", "imageapi",
            "--run-dir", str(tmp_path / "run"), "--rbd-sysfs", str(tmp_path / "none"),
            "--dev-dir", str(tmp_path / "dev"),
            "--scheme", "unix", "--socket-path", str(tmp_path / "api.sock"),
        ])
        proc.wait_for("accepting connections on")
        pid = proc.popen.pid
        helpers = hostview.descendants(pid)
        assert helpers
        unit_rel = "/" + str(unit.relative_to(mount))
        if case == "delegated":
            for p in (pid, *helpers):
                assert cgroup_of(p) == f"{unit_rel}/daemon", p
            assert (unit / "cgroup.procs").read_text() == "", "processes left in the inner node"
            assert f"containers' cgroups in {unit}/imageapi" in proc.log, proc.log
        else:
            for p in (pid, *helpers):
                assert cgroup_of(p) == unit_rel, p
            assert not (unit / "daemon").exists()
            assert "delegated" not in proc.log
    finally:
        if proc is not None:
            code = proc.stop()
            assert code == 0, proc.log
        remove_cgroup(unit)


# -- SIGTERM leaves the node running -----------------------------------------------------------


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def unit_drops() -> list[str]:
    """Capabilities the unit's bounding set leaves out, as setpriv names them."""
    kept = {cap.removeprefix("CAP_").lower()
            for value in unit_settings()["Service.CapabilityBoundingSet"] for cap in value.split()}
    return sorted(set(prctl.ALL_CAP_NAMES) - {"last_cap"} - kept)


def start_bounded_server(run_dir: Path, *extra: str) -> Server:
    """conftest.start_server, under the unit's capability bounding set (systemd applies it the
    same way: to the process it executes, and so to all that process starts)."""
    drops = "--bounding-set=" + ",".join(f"-{cap}" for cap in unit_drops())
    return start_server(run_dir, *extra, wrapper=["setpriv", drops])


def bounding_set(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapBnd")


def test_sigterm_leaves_containers_and_mounts_running(
    sim: Any, cluster: Any, cgroup_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A daemon stop (systemctl stop/restart: SIGTERM to the daemon only, KillMode=process)
    must not end the node's OS: the container keeps running on its mounts, the rbd stays
    mapped. Then everything is taken down by hand, so nothing leaks. The daemon runs under the
    unit's capability bounding set, so the rbd map, the mounts and the container start are
    proven to work with it."""
    scope = tmp_path_factory.getbasetemp()
    before = hostview.Snapshot.take(scope)
    mapped_before = sim.mapped()
    run_dir = tmp_path_factory.mktemp("imageapi-sigterm") / "run"
    server = start_bounded_server(
        run_dir, "--rbd-sysfs", str(sim.sysfs), "--dev-dir", str(sim.devdir),
        "--device-timeout", "5", "--stop-timeout", "2", "--cgroup-root", str(cgroup_root),
    )
    rbd_spec = {"monitors": list(cluster.monitors), "pool": "rbd", "image": "systemd.sqsh",
                "options": {"ro": True, "name": cluster.key_name, "secret": cluster.secret}}
    mount = {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "rbd": {
        "fs_type": "squashfs", "mount_options": ["ro"], "rbd": rbd_spec}}]}}
    pid = 0
    overlay: dict[str, Any] = {}
    try:
        r = httpx.post(f"{server.url}{BASE}/container", timeout=60, json={
            "name": "node-os", "mount": mount, "command": "/bin/sleep 1000", "state": "running",
        })
        assert r.status_code == 201, r.text
        container = r.json()
        pid = container["pid"]
        dropped = sum(1 << getattr(prctl, f"CAP_{cap.upper()}") for cap in unit_drops())
        assert bounding_set(server.proc.pid) & dropped == 0
        assert bounding_set(pid) & dropped == 0
        assert bounding_set(pid) & (1 << prctl.CAP_SYS_ADMIN)
        overlay = container["mount"]["overlay"]
        rbd_mount = overlay["lower"][0]["rbd"]
        device_id = str(rbd_mount["rbd"]["device_id"])
        mountpoints = [rbd_mount["mountpoint"], overlay["mountpoint"]]  # bottom first
        helpers = hostview.descendants(server.proc.pid) - {pid}
        helper = [h for h in helpers if hostview.comm(h) == "imageapi-helper"]
        assert len(helper) == 1, {h: hostview.comm(h) for h in helpers}

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log_text()

        assert process_alive(pid), "the container died with the daemon"
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [
            b"/bin/sleep", b"1000"]
        # Its root is still the image: the overlay on the squashfs on the rbd.
        assert "imageapi-test" in Path(f"/proc/{pid}/root/etc/os-release").read_text()
        mounted = {m[0] for m in hostview.mounts()}
        for mp in mountpoints:
            assert mp in mounted, f"{mp} was unmounted when the daemon stopped"
        assert device_id in sim.mapped(), "the rbd was unmapped when the daemon stopped"
        # The helper stays while its containers run — it reaps them and keeps their consoles
        # alive — but serves nothing more: its spare init ends.
        deadline = time.monotonic() + 10
        while any(process_alive(h) for h in set(helpers) - set(helper)):
            assert time.monotonic() < deadline, "the spare init outlived the daemon"
            time.sleep(0.05)
        assert process_alive(helper[0])
        subprocess.run(["nsenter", "-t", str(pid), "-a", "/bin/sh", "-c",
                        "echo console-after-stop > /dev/console"], check=True, timeout=10)
        log = Path(container["logfile"])
        while "console-after-stop" not in log.read_text():
            assert time.monotonic() < deadline + 10, "the console went dead with the daemon"
            time.sleep(0.05)
        assert process_alive(pid)
        os.kill(pid, signal.SIGKILL)
        # It ended while no daemon listened: the helper keeps its exit status for the next.
        time.sleep(0.5)
        assert process_alive(helper[0]), "the helper forgot an exit nobody had heard of"
        server = start_bounded_server(
            run_dir, "--rbd-sysfs", str(sim.sysfs), "--dev-dir", str(sim.devdir),
            "--device-timeout", "5", "--stop-timeout", "2", "--cgroup-root", str(cgroup_root),
        )
        assert f"reconnected to the container helper (pid {helper[0]})" in server.log_text()
        again = httpx.get(f"{server.url}{BASE}/container/byname/node-os", timeout=10).json()
        assert again["id"] == container["id"] and again["state"] == "dead"
        assert "killed by SIGKILL" in log.read_text()
        r = httpx.delete(f"{server.url}{BASE}/container/byname/node-os", timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{server.url}{BASE}/mount", timeout=10).json() == []
        pid = 0
        assert server.stop() == 0
        # Nothing runs and nothing is left to tell: the helper ends by itself.
        deadline = time.monotonic() + 10
        while process_alive(helper[0]):
            assert time.monotonic() < deadline, "the helper outlived its last container"
            time.sleep(0.05)
    finally:
        server.stop()
        # Take it down by hand, top first, as the daemon would have on DELETE.
        if pid and process_alive(pid):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_alive(pid):
                assert time.monotonic() < deadline, f"container {pid} does not die"
                time.sleep(0.02)
        mounted = {m[0] for m in hostview.mounts()}
        if overlay:
            for mp in (overlay["mountpoint"], overlay["lower"][0]["rbd"]["mountpoint"]):
                if mp in mounted:
                    subprocess.run(["umount", mp], check=True)
            device = str(overlay["lower"][0]["rbd"]["rbd"]["device_id"])
            if device in sim.mapped():
                sim.write("remove_single_major", device)
        shutil.rmtree(run_dir / "mounts", ignore_errors=True)
    assert sim.mapped() == mapped_before
    assert before.diff(hostview.Snapshot.take(scope)) == []
