"""`imageapi-server`: serve the Image API on http, https and/or a unix socket.

All listeners share one app, hence one service and one object graph, in one process and one
event loop: a `uvicorn.Server` per listener, each given a socket this module bound itself
(so the unix socket can be created 0600, and a TCP port is known before anything starts).

Flags and environment variables are those of the original server (`--scheme`, `--host`,
`--port`, `--socket-path`, `--tls-*`; `HOST`, `PORT`, `TLS_*`), plus the directories and
timeouts of `imageapi.config.Settings`.

SIGTERM or SIGINT: stop accepting, let in-flight requests finish, exit 0. A second SIGINT or
SIGTERM stops waiting for them. Running containers and their mounts are left alone.

Socket activation (`systemd/imageapi.socket`, `imageapi.activation`): when the service manager
passes listening sockets, they are the listeners and `--scheme` is not used.

Under systemd (`systemd/imageapi.service`, `Type=notify`): `READY=1` once every listener's
server has started (the app's startup ran, accepting is armed on every socket), `STOPPING=1`
when a signal begins the shutdown; with `Delegate=yes` the daemon first moves itself into a
leaf of its cgroup (`imageapi.delegation`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import uvicorn

from imageapi import activation, delegation
from imageapi.config import DEFAULT_RUN_DIR, Settings
from imageapi.notify import Notifier

log = logging.getLogger("imageapi.server")

SCHEMES = ("http", "https", "unix")
DEFAULT_SOCKET = "/var/run/imageapi.sock"
LOGLEVEL_ENV = "IMAGEAPI_LOGLEVEL"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="imageapi-server",
        description="Serve the Image API v1: attach RBD images, mount them, run containers.",
        epilog=f"Log level: environment variable {LOGLEVEL_ENV} (DEBUG, INFO, WARNING, ...).",
    )
    listen = p.add_argument_group("listeners")
    listen.add_argument(
        "--scheme",
        action="append",
        choices=SCHEMES,
        help="listener to serve; repeat for several (default: unix, the socket alone)",
    )
    listen.add_argument(
        "--host", default=env("HOST", "localhost"), help="http host (env HOST; default localhost)"
    )
    listen.add_argument(
        "--port", type=int, default=env("PORT", "8080"), help="http port (env PORT; default 8080)"
    )
    listen.add_argument(
        "--socket-path",
        type=Path,
        default=Path(DEFAULT_SOCKET),
        help=f"unix socket, created mode 0600 (default {DEFAULT_SOCKET})",
    )
    listen.add_argument(
        "--tls-host", default=env("TLS_HOST"), help="https host (env TLS_HOST; default: --host)"
    )
    listen.add_argument(
        "--tls-port",
        type=int,
        default=env("TLS_PORT", "8443"),
        help="https port (env TLS_PORT; default 8443)",
    )
    listen.add_argument(
        "--tls-certificate",
        type=Path,
        default=env("TLS_CERTIFICATE"),
        help="server certificate, PEM (env TLS_CERTIFICATE)",
    )
    listen.add_argument(
        "--tls-key",
        type=Path,
        default=env("TLS_PRIVATE_KEY"),
        help="server private key, PEM (env TLS_PRIVATE_KEY)",
    )
    listen.add_argument(
        "--tls-ca",
        type=Path,
        default=env("TLS_CA_CERTIFICATE"),
        help="CA of client certificates; when given, clients must present one it signed "
        "(env TLS_CA_CERTIFICATE)",
    )
    dirs = p.add_argument_group("host paths")
    dirs.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help=f"state directory, created 0700 (default {DEFAULT_RUN_DIR})",
    )
    dirs.add_argument("--mount-dir", type=Path, help="mountpoints (default RUN_DIR/mounts)")
    dirs.add_argument("--log-dir", type=Path, help="container logs (default RUN_DIR/logs)")
    dirs.add_argument("--rbd-sysfs", type=Path, help="rbd sysfs root (default /sys/bus/rbd)")
    dirs.add_argument(
        "--rbd-driver",
        choices=("auto", "krbd", "user"),
        help="how rbd images become block devices: krbd (the kernel's rbd module), user "
        "(librbd in a FUSE server per mapping, with a loop device over it), or auto: krbd "
        "when the rbd sysfs root exists, else user (default auto)",
    )
    dirs.add_argument("--dev-dir", type=Path, help="device directory (default /dev)")
    dirs.add_argument(
        "--device-timeout",
        type=float,
        help="seconds to wait for /dev/rbdN after a map (default 10)",
    )
    state = p.add_argument_group("durable state")
    state.add_argument(
        "--no-state",
        action="store_true",
        help="keep no durable record (RUN_DIR/state.db): a restart then forgets every object "
        "(for benchmarks; never on a node)",
    )
    state.add_argument(
        "--drain",
        action="store_true",
        help="instead of serving: recover, then stop every container and tear down every "
        "mount and attachment, and exit (0 once nothing is left)",
    )
    state.add_argument(
        "--recovery-budget",
        type=float,
        help="seconds the recovery before serving may take in all (default 30)",
    )
    box = p.add_argument_group("containers")
    box.add_argument(
        "--stop-timeout",
        type=float,
        help="seconds between a container's stop signal and SIGKILL (default 10)",
    )
    box.add_argument(
        "--cgroup-root",
        type=Path,
        help="cgroup2 directory for the containers' cgroups (default: OUR_CGROUP/imageapi)",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Keep the order given, drop repeats: each scheme is one listener. Unconfigured, only the
    # 0600 socket: the API is root-equivalent, and a TCP port is open to every local user.
    args.scheme = list(dict.fromkeys(args.scheme or ["unix"]))
    for name in ("port", "tls_port"):
        if not 0 <= getattr(args, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')}: not a port number")
    if "https" in args.scheme and not (args.tls_certificate and args.tls_key):
        parser.error("--scheme https needs --tls-certificate and --tls-key")
    for name in ("device_timeout", "stop_timeout", "recovery_budget"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}: must be positive")
    return args


def settings_from(args: argparse.Namespace, cgroup_root: Path | None = None) -> Settings:
    """`cgroup_root`: the default for the containers' cgroups when `--cgroup-root` is not given."""
    given: dict[str, Any] = {"run_dir": args.run_dir}
    if cgroup_root is not None:
        given["cgroup_root"] = cgroup_root
    for name in ("mount_dir", "log_dir", "rbd_sysfs", "rbd_driver", "dev_dir", "device_timeout",
                 "stop_timeout", "cgroup_root", "recovery_budget"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    given["durable"] = not args.no_state
    return Settings(**given)


class RepeatFilter(logging.Filter):
    """Rate-limits records that repeat: per `window` seconds, `burst` identical records (same
    logger, level and message) and `template_burst` of one template with whatever values; the
    rest are counted, and once their window has passed one record says how many were left
    out. A fault that repeats in a tight loop (asyncio logs every failed accept() with its
    traceback) then costs a few lines a minute, not gigabytes; ordinary records, whose values
    differ (`attached %s as %s`), pass. At most `max_kinds` kinds are remembered at a time,
    so a busy daemon's distinct records cost bounded memory."""

    def __init__(
        self, handler: logging.Handler, burst: int = 10, template_burst: int = 1000,
        window: float = 60.0, max_kinds: int = 2048, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        super().__init__()
        self.handler = handler  # where the summaries go
        self.burst, self.template_burst = burst, template_burst
        self.window, self.max_kinds, self.clock = window, max_kinds, clock
        self._lock = threading.Lock()
        # (how, logger, level, text) -> [window start, records in the window, records left out]
        self._kinds: dict[tuple[str, str, int, str], list[Any]] = {}
        self._next_expiry = float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        same = ("same", record.name, record.levelno, record.getMessage())
        like = ("like", record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            due = self._expire(now) if now >= self._next_expiry else []
            # Both counted, always: `&`, not `and`.
            passed = self._count(same, now, self.burst)
            passed &= self._count(like, now, self.template_burst)
        for summary in due:
            self.handler.handle(summary)
        return passed

    def _count(self, kind: tuple[str, str, int, str], now: float, burst: int) -> bool:
        seen = self._kinds.get(kind)
        if seen is None:
            if len(self._kinds) >= self.max_kinds:
                # Forget identical records with nothing left out (at worst they get a new
                # burst), then templates so: few, they hold the ceiling on varying floods.
                for how in ("same", "like"):
                    for quiet in [k for k, v in self._kinds.items() if k[0] == how and not v[2]]:
                        del self._kinds[quiet]
                    if len(self._kinds) < self.max_kinds:
                        break
                if len(self._kinds) >= self.max_kinds:
                    return True  # all of them floods: this one passes, uncounted
            seen = self._kinds[kind] = [now, 0, 0]
            self._next_expiry = min(self._next_expiry, now + self.window)
        seen[1] += 1
        if seen[1] <= burst:
            return True
        seen[2] += 1
        return False

    def flush(self) -> None:
        """Report what was left out so far (at exit)."""
        with self._lock:
            due = self._expire(float("inf"))
        for summary in due:
            self.handler.handle(summary)

    def _expire(self, now: float) -> list[logging.LogRecord]:
        """Lock held: forget the kinds whose window has passed; a summary of each that had
        records left out."""
        due = []
        self._next_expiry = float("inf")
        for kind, (start, _count, left_out) in list(self._kinds.items()):
            if now < start + self.window:
                self._next_expiry = min(self._next_expiry, start + self.window)
                continue
            del self._kinds[kind]
            if left_out:
                how, name, level, text = kind
                what = "repeats of" if how == "same" else "records like"
                summary = logging.LogRecord(
                    name, level, __file__, 0, f"suppressed %d {what} %r in %.0f s",
                    (left_out, text.split("\n", 1)[0][:200], self.window), None,
                )  # fmt: skip
                summary.repeat_summary = True
                due.append(summary)
        return due


def configure_logging() -> list[RepeatFilter]:
    """Logging to stderr, rate-limited per kind of record; returns the filters (to flush)."""
    name = os.environ.get(LOGLEVEL_ENV, "INFO").strip().upper()
    level = logging.getLevelName(name)
    logging.basicConfig(
        level=level if isinstance(level, int) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    filters = []
    for handler in logging.getLogger().handlers:
        repeat = RepeatFilter(handler)
        handler.addFilter(repeat)
        filters.append(repeat)
    if not isinstance(level, int):
        log.warning("%s=%r is not a log level; using INFO", LOGLEVEL_ENV, name)
    return filters


def prepare_dirs(settings: Settings) -> None:
    """Create the state directories; only directories created here get their mode set."""
    for path in (settings.run_dir, settings.mounts, settings.logs):
        if not path.is_dir():
            path.mkdir(mode=0o700, parents=True)
            path.chmod(0o700)  # mkdir's mode is filtered by the umask


@dataclass
class Listener:
    label: str  # e.g. "https://127.0.0.1:8443", "unix:/var/run/imageapi.sock"
    sock: socket.socket
    tls: dict[str, Any] = field(default_factory=dict)  # uvicorn.Config ssl_* arguments
    unix_path: Path | None = None
    unix_ino: int | None = None

    def close(self) -> None:
        self.sock.close()
        path = self.unix_path
        if path is None:
            return
        # Remove the socket file only if it is still ours (not replaced by another server).
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == self.unix_ino:
                path.unlink()


def bind_tcp(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    # Like the original server, listen on one address; prefer IPv4 for "localhost".
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_unix(path: Path) -> tuple[socket.socket, int]:
    """Bind `path` mode 0600, replacing a stale socket file; fail if a server answers on it."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: left by a server that did not clean up
        else:
            raise FileExistsError(f"{path}: another server is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask makes the file 0600 from its creation on: there is no moment in which
        # another user could connect. (No other thread runs yet, so changing it is safe.)
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, os.lstat(path).st_ino


def tcp_label(scheme: str, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "ssl_certfile": os.fspath(args.tls_certificate),
        "ssl_keyfile": os.fspath(args.tls_key),
    }
    if args.tls_ca:
        tls["ssl_ca_certs"] = os.fspath(args.tls_ca)
        tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return tls


def activated_listeners(
    args: argparse.Namespace, sockets: Sequence[socket.socket]
) -> list[Listener]:
    """Listeners on sockets the service manager passed: a unix socket serves plain HTTP; an IP
    socket serves https when --tls-certificate and --tls-key are given, else http. The socket
    files are the manager's: we never remove them."""
    listeners = []
    for sock in sockets:
        if sock.family == socket.AF_UNIX:
            name = sock.getsockname()
            if isinstance(name, bytes):  # an abstract address
                name = "@" + name[1:].decode(errors="replace")
            listeners.append(Listener(f"unix:{name}", sock))
        elif args.tls_certificate and args.tls_key:
            listeners.append(Listener(tcp_label("https", sock), sock, tls_options(args)))
        else:
            listeners.append(Listener(tcp_label("http", sock), sock))
            warn_open(listeners[-1], sock)
    return listeners


def open_listeners(args: argparse.Namespace) -> list[Listener]:
    listeners: list[Listener] = []
    try:
        for scheme in args.scheme:
            if scheme == "http":
                sock = bind_tcp(args.host, args.port)
                listeners.append(Listener(tcp_label("http", sock), sock))
                warn_open(listeners[-1], sock)
            elif scheme == "https":
                sock = bind_tcp(args.tls_host or args.host, args.tls_port)
                listeners.append(Listener(tcp_label("https", sock), sock, tls_options(args)))
            else:
                sock, ino = bind_unix(args.socket_path)
                listeners.append(
                    Listener(
                        f"unix:{args.socket_path}", sock, unix_path=args.socket_path, unix_ino=ino
                    )
                )
    except BaseException:
        close_all(listeners)
        raise
    return listeners


def warn_open(listener: Listener, sock: socket.socket) -> None:
    """Plain http authenticates nobody, and the API is root-equivalent (README, "Security")."""
    try:
        local = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except ValueError:
        local = False
    who = ("any local user, and any container on the host's network," if local
           else "anyone who can reach it")
    log.warning("%s is plain http without authentication: %s can drive this API, which is "
                "root-equivalent; prefer the unix socket or https with --tls-ca",
                listener.label, who)


def close_all(listeners: Sequence[Listener]) -> None:
    for listener in listeners:
        listener.close()


class ListenerServer(uvicorn.Server):
    """One uvicorn server per listener; signals are handled once, for all, by `serve_all`."""

    def __init__(self, config: uvicorn.Config, label: str) -> None:
        super().__init__(config)
        self.label = label
        self.ready = asyncio.Event()  # set once this listener's connections are served

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's version installs handlers per server (the last one installed wins) and
        # re-raises the signal after shutdown, which turns a clean exit into death by SIGTERM.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            log.info("accepting connections on %s", self.label)
            self.ready.set()


# Connections get at most half of the descriptors free at start, and never more than this; the
# other half stays for the daemon's own (a loop device per attachment, a pidfd and log per
# container, the files a request opens).
MAX_CONNECTIONS = 1024
# A connection must have sent a whole request head this long after it was accepted (uvicorn
# arms no timer before the first request: a silent connection stays forever).
REQUEST_HEAD_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle connection stays open after a response

_BUSY_BODY = b'{"code": 503, "message": "too many connections; try again later"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def connection_limit(soft_limit: int, in_use: int) -> int:
    return max(1, min(MAX_CONNECTIONS, (soft_limit - in_use) // 2))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own


class ConnectionGuard:
    """The daemon's HTTP connections over every listener, bounded where they are accepted.

    At the limit, a new connection closes the longest-open one that has no request in progress
    (silent clients cannot lock real ones out), or is answered 503 and closed if every one has
    one. Should the daemon run out of descriptors anyway (its own objects hold them too), an
    idle connection is closed to free one, or else a spare descriptor is given up to accept
    and refuse the waiting connection: asyncio does not see accept() fail, which it would log,
    with a traceback, thousands of times a second.
    """

    def __init__(self, limit: int, head_timeout: float = REQUEST_HEAD_TIMEOUT) -> None:
        self.limit = limit
        self.head_timeout = head_timeout
        self.served: dict[_Guarded, None] = {}  # protocols of open connections, oldest first
        self._accepted: list[socket.socket] = []  # every accepted connection, until closed
        self._closing: set[int] = set()  # id() of those we closed, until they are gone
        self._classes: dict[type, type] = {}
        self._spare: list[int] = []  # the spare descriptor, when we hold it
        self._take_spare()
        weakref.finalize(self, _close_all_fds, self._spare)  # with the servers, in tests

    def _take_spare(self) -> None:
        if not self._spare:
            try:
                self._spare.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                pass  # out of descriptors right now: next time

    def protocol(self, base: type) -> type:
        """`base` (uvicorn's HTTP protocol class) reporting to this guard."""
        if base not in self._classes:
            self._classes[base] = type(f"Guarded{base.__name__}", (_Guarded, base), {"guard": self})
        return self._classes[base]

    def listening(self, sock: socket.socket, tls: bool) -> socket.socket:
        """`sock`, as a socket whose accept() this guard decides (it takes over the fd)."""
        guarded = _GuardedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded.guard, guarded.busy_reply = self, b"" if tls else _BUSY
        return guarded

    def open_connections(self) -> int:
        self._accepted = [conn for conn in self._accepted if conn.fileno() != -1]
        self._closing &= {id(conn) for conn in self._accepted}
        return len(self._accepted) - len(self._closing)

    def admit(self, conn: socket.socket, busy_reply: bytes) -> bool:
        if self.open_connections() >= self.limit and not self._make_room(
            f"{self.limit} connections open (the limit)"
        ):
            log.warning("%d connections open, each with a request in progress: refused one",
                        self.limit)  # fmt: skip
            _refuse(conn, busy_reply)
            return False
        self._accepted.append(conn)
        return True

    def _make_room(self, why: str) -> bool:
        for proto in self.served:
            if proto.busy():
                continue
            del self.served[proto]
            for conn in self._accepted:
                if conn.fileno() == proto.fd:
                    self._closing.add(id(conn))  # its fd goes when asyncio has closed it
            proto.transport.abort()  # now: an idle one has nothing left to send
            log.info("%s: closed an idle connection for a new one", why)
            return True
        return False

    def out_of_fds(self, listener: socket.socket, busy_reply: bytes) -> bool:
        """accept() found no free descriptor: make one free, or refuse the waiting connection
        on the spare. False if neither can be done (asyncio then retries in a second)."""
        if self.open_connections() < len(self._accepted):
            return True  # one we closed is about to free its descriptor
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if self._make_room(f"out of file descriptors (limit {limit})"):
            return True
        log.error("out of file descriptors (limit %d) and no idle connection to close: "
                  "refusing connections", limit)  # fmt: skip
        if not self._spare:
            self._take_spare()  # for next time
            return False
        os.close(self._spare.pop())
        try:
            conn, _addr = socket.socket.accept(listener)
        except OSError:
            pass  # gone meanwhile
        else:
            _refuse(conn, busy_reply)
        self._take_spare()
        return True


def _close_all_fds(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _refuse(conn: socket.socket, reply: bytes) -> None:
    try:
        conn.setblocking(False)
        if reply:
            conn.send(reply)  # a few bytes into an empty send buffer
    except OSError:
        pass  # the client has gone: nothing to tell
    conn.close()


class _GuardedSocket(socket.socket):
    """A listening socket whose accept() asks its guard (asyncio calls accept() on it)."""

    guard: ConnectionGuard
    busy_reply: bytes

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            conn, addr = super().accept()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if not self.guard.out_of_fds(self, self.busy_reply):
                raise
            raise BlockingIOError(errno.EAGAIN, "no descriptor for a connection") from None
        if not self.guard.admit(conn, self.busy_reply):
            # To asyncio: nothing (more) to accept now; it asks again while some are waiting.
            raise BlockingIOError(errno.EAGAIN, "connection refused: too many")
        return conn, addr


class _Guarded:
    """Mixed in before uvicorn's HTTP protocol (httptools or h11): counts the connection for
    its guard and closes it if no request head has come `head_timeout` after it opened."""

    guard: ClassVar[ConnectionGuard]
    fd = -1
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.guard.served[self] = None
        super().connection_made(transport)  # type: ignore[misc]
        self._head_timer = asyncio.get_running_loop().call_later(
            self.guard.head_timeout, self._head_overdue
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.served.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def busy(self) -> bool:
        """A request is in progress (its head has come, its response is not complete)."""
        cycle = getattr(self, "cycle", None)
        return cycle is not None and not cycle.response_complete

    def _head_overdue(self) -> None:
        if getattr(self, "cycle", None) is None:  # no request head so far
            self.transport.close()  # type: ignore[attr-defined]


def make_servers(
    app: Any, listeners: Sequence[Listener], max_connections: int | None = None
) -> list[ListenerServer]:
    """One server per listener, at most `max_connections` (default: from the open-file limit)
    over all of them; each listener's socket is replaced by one the guard accepts on."""
    if max_connections is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        max_connections = connection_limit(soft, open_fds())
    guard = ConnectionGuard(max_connections)
    log.info("at most %d connections at a time", max_connections)
    servers = []
    for i, listener in enumerate(listeners):
        config = uvicorn.Config(
            app,
            # The app is shared: run its startup/shutdown (lifespan) once, with the first server.
            lifespan="on" if i == 0 else "off",
            log_config=None,  # logging is configured once, by configure_logging
            proxy_headers=False,  # nothing sits in front of this daemon to be trusted
            server_header=False,
            timeout_graceful_shutdown=None,  # in-flight kernel calls are allowed to finish
            # Not limit_concurrency: it answers 503 on a connection already accepted (holding
            # its descriptor) and counts per listener; the guard bounds them at accept().
            timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
            **listener.tls,
        )
        config.load()  # now, so a bad certificate or key fails before anything is served
        config.http_protocol_class = guard.protocol(config.http_protocol_class)
        listener.sock = guard.listening(listener.sock, bool(listener.tls))
        servers.append(ListenerServer(config, listener.label))
    return servers


async def serve_all(
    servers: Sequence[ListenerServer],
    listeners: Sequence[Listener],
    notifier: Notifier | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    notifier = notifier or Notifier(None)
    stopping = False

    async def announce_ready() -> None:
        # Only when every listener is served: one listener up is not "ready".
        await asyncio.gather(*(server.ready.wait() for server in servers))
        if not stopping:
            labels = ", ".join(server.label for server in servers)
            notifier.send("READY=1", f"STATUS=accepting connections on {labels}",
                          f"MAINPID={os.getpid()}")

    def on_signal(signum: int) -> None:
        nonlocal stopping
        name = signal.Signals(signum).name
        if stopping:
            log.warning("%s again: not waiting for in-flight requests", name)
            for server in servers:
                server.force_exit = True
            return
        stopping = True
        notifier.send("STOPPING=1", f"STATUS={name}: finishing in-flight requests")
        log.info("%s: no new connections; finishing in-flight requests", name)
        for server in servers:
            server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    ready = asyncio.create_task(announce_ready())
    try:
        await asyncio.gather(
            *(
                server.serve(sockets=[listener.sock])
                for server, listener in zip(servers, listeners, strict=True)
            )
        )
    finally:
        ready.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:  # the kernel caps it at fs.nr_open
        try:
            want = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return soft
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, exc)
        return soft
    log.info("open-file limit raised from %d to %d", soft, want)
    return want


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = configure_logging()
    # First, before anything holds descriptors: every connection, attachment and container
    # needs some, and the helper inherits the limit.
    raise_fd_limit()
    # Before anything is started: the helper (hence every container) must neither inherit
    # $NOTIFY_SOCKET nor be born in the delegated cgroup's top, where processes cannot stay.
    notifier = Notifier.from_environ()
    try:
        activated = activation.take_sockets()
    except activation.ActivationError as exc:
        log.error("cannot start: socket activation: %s", exc)
        return 1
    settings = settings_from(args, delegation.settle())
    try:
        prepare_dirs(settings)
        if activated:
            log.info("socket activation: serving the %d socket(s) passed by the service "
                     "manager; --scheme is not used", len(activated))
            listeners = activated_listeners(args, activated)
        else:
            listeners = open_listeners(args)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    # connexion imports starlette's TestClient at import time, which warns about httpx on
    # every start; a test helper's deprecation is noise in a daemon's log.
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    service = None
    try:
        # Late imports keep `--help` fast and import-light.
        from imageapi.app import create_app
        from imageapi.service import Service

        # Recovery runs here, before anything is served. The sockets are bound already (a
        # taken port fails the start before recovery touches anything), but no connection is
        # accepted, and READY=1 is not sent, until it has ended.
        service = Service(settings)
        if args.drain:
            return _drain(service)
        app = create_app(settings, service)
        servers = make_servers(app, listeners)
        asyncio.run(serve_all(servers, listeners, notifier))
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        close_all(listeners)
        if service is not None:
            service.close()
    log.info("stopped")
    for repeat in repeats:
        repeat.flush()
    return 0


def _drain(service: Any) -> int:
    left = service.drain()
    for what in left:
        log.error("drain: could not remove %s", what)
    log.info("drain: %s", "nothing is left" if not left else f"{len(left)} object(s) are left")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
